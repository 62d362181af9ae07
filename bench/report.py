"""bench/results/summary.json as the Markdown table the README carries:
``python -m bench.report``."""

from __future__ import annotations

import json

from bench.common import RESULTS


def markdown() -> str:
    summary = json.loads((RESULTS / "summary.json").read_text())
    m = summary["machine"]
    mode = "quick" if summary["quick"] else "full"
    lines = [
        f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, "
        f"Python {m['python']} ({mode} run, {summary['seconds']} s).",
        "",
        "| benchmark | figure | baseline | value | ratio | goal | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        goal = r["goal"] and f"{r['goal']} {'met' if r['met'] else 'missed'}"
        lines.append(
            f"| {r['benchmark']} | {r['figure']} ({r['unit']}) | {r['baseline_name']}: "
            f"{r['baseline']:.4g} | {r['value_name']}: {r['value']:.4g} | {r['ratio']:.3f} "
            f"| {goal} | {r['runs']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
