"""What every benchmark shares: the result row, the JSON and PNG writers, and
interleaved repetition.

Each benchmark ``bench/NAME.py`` has ``run(quick: bool) -> list[Row]``: every
figure is a ratio of a value to a baseline measured in the same run, on the same
traffic, with runs interleaved and repeated and the median kept. It writes its own
``bench/results/NAME.json`` (and a PNG where a picture reads faster);
``python -m bench`` runs them all and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (from /proc/PID/stat's ppid):
    all of a server's processes, whatever it forks."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


@dataclass
class Row:
    benchmark: str
    figure: str
    unit: str
    baseline_name: str
    baseline: float
    value_name: str
    value: float
    runs: int
    goal: str = ""  # e.g. ">= 0.9" for value/baseline; "" when only reported
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("nan")

    @property
    def met(self) -> bool | None:
        if not self.goal:
            return None
        op, target = self.goal.split()
        return self.ratio >= float(target) if op == ">=" else self.ratio <= float(target)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import os

    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def write(name: str, rows: Sequence[Row], extra: dict[str, Any] | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(),
                                "rows": [r.to_dict() for r in rows], **(extra or {})},
                               indent=1) + "\n")
    return path


def interleaved(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Run each variant ``repeats`` times, round-robin (so drift in the machine's
    load hits all alike), and return the median of each."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(fn())
    return {name: statistics.median(values) for name, values in samples.items()}


def quick_parser(doc: str | None) -> argparse.ArgumentParser:
    """The command line of a benchmark run alone (python -m bench.NAME [--quick])."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short round")
    return ap


def run_alone(run: Callable[[bool], Sequence[Row]], doc: str | None) -> None:
    """python -m bench.NAME [--quick]: run it and print its rows."""
    print_rows(run(quick_parser(doc).parse_args().quick))


def print_rows(rows: Sequence[Row]) -> None:
    """A benchmark run alone (python -m bench.NAME) prints its rows like this."""
    for r in rows:
        print(f"{r.figure:<58} {r.baseline:>12.4g} {r.value:>12.4g} {r.ratio:>7.3f} "
              f"{r.goal:>7} ({r.value_name} vs {r.baseline_name}, {r.unit})")


def bar_plot(path: Path, title: str, labels: list[str], values: list[float],
             unit: str) -> Path | None:
    """A bar chart; None when matplotlib is missing (the JSON still has it all)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(labels, values, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][
        :len(values)])
    ax.bar_label(bars, fmt="%.3g")
    ax.set_ylabel(unit)
    ax.set_title(title)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
