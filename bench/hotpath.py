"""Packets per second of the C hot path (relay.serve.hotpath) against its pure-Python twin
(relay.serve.hotpath_py) on a realistic client->internet mix: mostly non-HTTP TCP (TLS
application data, pure ACKs, other binary protocols), some HTTP requests (some
pipelined), some TLS ClientHellos; IPv4 and IPv6.

Both run side by side in the same process, alternating, for several rounds; the
median of each is reported with the ratio. Modes: ``per-packet`` (one inspect()
call per packet, what the datapath does today), ``batch-64`` (inspect_batch() on
receive buffers of 64 packets), and per-packet on each traffic class alone.

    python -m bench.hotpath [--quick] [--packets N] [--rounds R] [-o FILE]

Prints a table, writes JSON and, when matplotlib is importable, a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the packet builders shared with the tests

from hotpath_packets import TAG, client_hello, extension, http_request, ipv4, ipv6  # noqa: E402

from bench.common import RESULTS, Row  # noqa: E402
from relay.serve import hotpath, hotpath_py  # noqa: E402

BATCH = 64  # packets per receive buffer in batch mode
FULL_PACKETS, FULL_ROUNDS = 20000, 7
QUICK_PACKETS, QUICK_ROUNDS = 5000, 3
MIN_ROUND = 0.2  # seconds per measurement, so that timer and scheduler noise stay small
UAS = [
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36",
    "curl/8.1.2",
    "Wget/1.21.3",
]


def mix(n: int, rng: random.Random) -> tuple[list[bytearray], list[str]]:
    """n packets: 60% TLS application data, 20% pure ACKs, 10% other binary TCP,
    5% HTTP requests (1 in 5 pipelined), 5% ClientHellos; 1 in 4 over IPv6."""
    packets, classes = [], []
    for _ in range(n):
        build = ipv6 if rng.random() < 0.25 else ipv4
        r = rng.random()
        if r < 0.60:
            size = rng.choice([80, 200, 600, 1200, 1380])
            data = b"\x17\x03\x03" + (size - 5).to_bytes(2) + rng.randbytes(size - 5)
            pkt, cls = build(data, dport=443), "non-http"
        elif r < 0.80:
            pkt, cls = build(b"", dport=443), "non-http"
        elif r < 0.90:
            pkt, cls = build(rng.randbytes(rng.choice([48, 300, 1000])), dport=22), "non-http"
        elif r < 0.95:
            host = f"www.site{rng.randrange(50)}.example"
            req = http_request(
                rng.choice(["GET", "GET", "GET", "POST"]),
                f"/path/{rng.randrange(10**6)}?q=1",
                host=host,
                ua=rng.choice(UAS),
                headers=(("Accept", "text/html,*/*;q=0.8"), ("Accept-Language", "en-US,en;q=0.5")),
            )
            if rng.random() < 0.2:
                req += http_request("GET", "/favicon.ico", host=host, ua=rng.choice(UAS))
            pkt, cls = build(req, dport=rng.choice([80, 80, 8080])), "http"
        else:
            hello = client_hello(
                f"cdn{rng.randrange(50)}.example.net".encode(),
                extensions_before=extension(10, b"\x00\x04\x00\x1d\x00\x17")
                + extension(13, bytes(20)),
                extensions_after=extension(51, rng.randbytes(70)) + extension(21, bytes(180)),
            )
            pkt, cls = build(hello, dport=443), "tls"
        packets.append(pkt)
        classes.append(cls)
    return packets, classes


def per_packet(impl) -> Callable[[list[bytearray]], None]:
    inspect = impl.inspect

    def run(packets: list[bytearray]) -> None:
        for p in packets:
            inspect(p, TAG)

    return run


def batches(packets: list[bytearray]) -> list[tuple[bytearray, array]]:
    out = []
    for i in range(0, len(packets), BATCH):
        buf, spans = bytearray(), array("I")
        for p in packets[i : i + BATCH]:
            spans.extend((len(buf), len(p)))
            buf += p
        out.append((buf, spans))
    return out


def batched(impl) -> Callable[[list[tuple[bytearray, array]]], None]:
    inspect_batch, new_seen = impl.inspect_batch, impl.new_seen

    def run(chunks: list[tuple[bytearray, array]]) -> None:
        # One session per pass over the mix: each destination reported once, as
        # the session's destination set wants them.
        seen = new_seen()
        for buf, spans in chunks:
            inspect_batch(buf, spans, TAG, seen)

    return run


def measure(c_run, py_run, data, n: int, rounds: int) -> dict:
    """Alternate C and Python for ``rounds`` rounds, each repeating its workload
    for at least MIN_ROUND seconds; packets/s medians and their ratio."""
    reps = {}
    for run in (c_run, py_run):
        t0 = time.perf_counter()
        run(data)
        reps[run] = max(1, math.ceil(MIN_ROUND / (time.perf_counter() - t0)))
    c_pps, py_pps = [], []
    for _ in range(rounds):
        for run, out in ((c_run, c_pps), (py_run, py_pps)):
            t0 = time.perf_counter()
            for _ in range(reps[run]):
                run(data)
            out.append(n * reps[run] / (time.perf_counter() - t0))
    c, py = statistics.median(c_pps), statistics.median(py_pps)
    return {"c_pps": c, "py_pps": py, "ratio": c / py, "c_runs": c_pps, "py_runs": py_pps}


def plot(results: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no PNG written"
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(results))
    ax.bar([x - 0.2 for x in xs], [r["c_pps"] for r in results], 0.4,
           label="C (relay.serve.hotpath)")
    ax.bar([x + 0.2 for x in xs], [r["py_pps"] for r in results], 0.4, label="Python twin")
    for x, r in zip(xs, results, strict=True):
        ax.annotate(f"{r['ratio']:.1f}x", (x, r["c_pps"]), ha="center", va="bottom")
    ax.set_xticks(list(xs), [r["mode"] for r in results])
    ax.set_yscale("log")
    ax.set_ylabel("packets/s (median)")
    ax.set_title("Hot path: C vs pure-Python twin")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"wrote {path}"


def run(quick: bool) -> list[Row]:
    """The suite's entry (python -m bench): C vs the twin, per packet and batched."""
    n, rounds = (QUICK_PACKETS, QUICK_ROUNDS) if quick else (FULL_PACKETS, FULL_ROUNDS)
    results = bench(n, rounds, RESULTS / "hotpath.json")
    rows = []
    for r in results:
        if r["mode"] in ("per-packet", f"batch-{BATCH}", "non-http only"):
            rows.append(Row("hotpath", f"packets/s, {r['mode']}", "packets/s",
                            "Python twin", r["py_pps"], "C", r["c_pps"], rounds,
                            goal=">= 20" if r["mode"] != "non-http only" else ""))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=FULL_PACKETS)
    ap.add_argument("--rounds", type=int, default=FULL_ROUNDS)
    ap.add_argument("--quick", action="store_true", help="a short run")
    ap.add_argument("-o", "--output", type=Path, default=RESULTS / "hotpath.json")
    args = ap.parse_args()
    if args.quick:
        args.packets, args.rounds = QUICK_PACKETS, QUICK_ROUNDS
    bench(args.packets, args.rounds, args.output)


def bench(n_packets: int, rounds: int, output: Path) -> list[dict]:
    packets, classes = mix(n_packets, random.Random(20240611))
    counts = {c: classes.count(c) for c in ("non-http", "http", "tls")}
    c_results = [hotpath.inspect(bytearray(p), TAG) for p in packets]
    assert c_results == [hotpath_py.inspect(bytearray(p), TAG) for p in packets]
    stamped = sum(r.stamped for r in c_results)

    results = []
    cases = [
        ("per-packet", per_packet, packets),
        (f"batch-{BATCH}", batched, batches(packets)),
    ]
    for cls in counts:
        cases.append(
            (
                f"{cls} only",
                per_packet,
                [p for p, k in zip(packets, classes, strict=True) if k == cls],
            )
        )
    for mode, wrap, data in cases:
        n = sum(len(s) // 2 for _, s in data) if wrap is batched else len(data)
        r = measure(wrap(hotpath), wrap(hotpath_py), data, n, rounds)
        results.append({"mode": mode, "packets": n, **r})

    print(
        f"mix: {n_packets} packets {counts}, {stamped} User-Agents stamped per pass; "
        f"median of {rounds} alternating rounds"
    )
    print(f"{'mode':<16}{'C pkt/s':>14}{'Python pkt/s':>15}{'ratio':>9}")
    for r in results:
        print(f"{r['mode']:<16}{r['c_pps']:>14,.0f}{r['py_pps']:>15,.0f}{r['ratio']:>8.1f}x")

    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "hotpath",
        "mix": {"packets": n_packets, **counts, "batch": BATCH},
        "rounds": rounds,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "results": results,
    }
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    print(plot(results, output.with_suffix(".png")))
    return results


if __name__ == "__main__":
    main()
