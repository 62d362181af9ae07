"""Run the benchmark suite and print one table of ratios.

    ./run.sh bench [--quick] [NAME ...]      (NAME: hotpath, drain, shipping, openvpn,
                                              forwarding, dtls, capture, abuse, hostile,
                                              bans, search, directory, fleet, scale)

Each benchmark writes bench/results/NAME.json (and a PNG where it helps); the
table of every row lands in bench/results/summary.json. A benchmark that fails is
reported and the others still run; the exit status says whether any failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback

from bench.common import RESULTS, Row, machine

BENCHMARKS = ("hotpath", "drain", "shipping", "forwarding", "dtls", "openvpn", "capture",
              "abuse", "hostile", "bans", "search", "directory", "fleet", "scale")


def table(rows: list[Row]) -> str:
    lines = [f"{'benchmark':<11} {'figure':<52} {'baseline':>12} {'value':>12} {'ratio':>7} "
             f"{'goal':>8} {'runs':>4}"]
    for r in rows:
        met = {True: " ok", False: " MISSED", None: ""}[r.met]
        lines.append(f"{r.benchmark:<11} {r.figure[:52]:<52} {r.baseline:>12.4g} "
                     f"{r.value:>12.4g} {r.ratio:>7.3f} {r.goal:>8} {r.runs:>4}{met}")
        lines.append(f"{'':<11}   {r.value_name} vs {r.baseline_name}, {r.unit}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the short version (a few minutes)")
    ap.add_argument("names", nargs="*", choices=(*BENCHMARKS, []), metavar="NAME",
                    help=f"only these ({', '.join(BENCHMARKS)})")
    args = ap.parse_args()
    rows: list[Row] = []
    failed: list[str] = []
    seconds: dict[str, int] = {}
    for name in args.names or BENCHMARKS:
        print(f"==> bench {name}{' (quick)' if args.quick else ''}", flush=True)
        t0 = time.monotonic()
        try:
            module = importlib.import_module(f"bench.{name}")
            rows.extend(module.run(args.quick))
        except Exception:
            traceback.print_exc()
            failed.append(name)
        seconds[name] = round(time.monotonic() - t0)
        print(f"    {name}: {seconds[name]} s", flush=True)
    print()
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = RESULTS / "summary.json"
    previous = json.loads(summary.read_text()) if summary.exists() and args.names else {}
    if previous.get("quick", args.quick) != args.quick:
        previous = {}  # never mix quick and full figures in one table
    # A partial run (NAME ...) replaces its own rows and keeps the others.
    seconds = {**previous.get("seconds_by_benchmark", {}), **seconds}
    kept = [r for r in previous.get("rows", []) if r["benchmark"] not in
            {r.benchmark for r in rows}]
    summary.write_text(json.dumps(
        {"machine": machine(), "quick": args.quick, "seconds": sum(seconds.values()),
         "seconds_by_benchmark": seconds, "failed": failed,
         "rows": [r.to_dict() for r in rows] + kept}, indent=1) + "\n")
    print(f"\nwrote {summary}; {sum(seconds[n] for n in args.names or BENCHMARKS)} s in all")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
