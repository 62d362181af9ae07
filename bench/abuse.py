"""Abuse: an honest openconnect session's iperf3 TCP throughput through the relay
while another client namespace floods the listener with TLS connect/disconnect
cycles, against the same session's throughput without the flood.

The flood is tests/flood_client.py's ``cycles`` loop run for a fixed time: its
source is banned after the first strikes (the relay's default ``[abuse]``
thresholds), after which every attempt is reset at accept, before any TLS work.
Figures: the honest session's Mbit/s with the flood vs without; the flood's
refused attempts/s (vs its attempts/s); the relay process's CPU per Gbit of the
honest traffic with and without the flood. Variants run round-robin, repeated,
medians kept.

    python -m bench.abuse [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import common
from bench.common import RESULTS, Row
from bench.forwarding import cpu_seconds, iperf, start_iperf
from relay.netns import Topology, relay_ip
from relay.netns import run as ns_run

NAME = "abuse"
ROOT = Path(__file__).resolve().parent.parent
# Seconds per iperf3 run, and rounds of each variant: as bench/forwarding.py.
FULL_SECONDS, QUICK_SECONDS = 10, 3
FULL_REPEATS, QUICK_REPEATS = 3, 1
# The flood starts this long before iperf3 and ends with it, so the whole
# measured run is under flood (the first run's includes the ban being earned).
FLOOD_LEAD = 1.0
# Cycles per flood_client.cycles call between looks at the clock: a batch of
# refused attempts takes a few ms, a batch before the ban a few hundred.
FLOOD_BATCH = 20
# Seconds to wait for the flood process's report after its time is up.
FLOOD_GRACE = 30
FLOOD_CLIENT, HONEST_CLIENT = 1, 2
LISTEN_PORT = 443


def flood_child(host: str, port: int, seconds: float) -> None:
    """TLS connect/disconnect cycles for ``seconds``; prints one JSON line."""
    sys.path.insert(0, str(ROOT / "tests"))
    from flood_client import cycles

    completed = refused = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        got = cycles(FLOOD_BATCH, host, port)
        completed += got["completed"]
        refused += got["refused"]
    print(json.dumps({"completed": completed, "refused": refused,
                      "seconds": time.monotonic() - t0}), flush=True)


def run(quick: bool) -> list[Row]:
    seconds = QUICK_SECONDS if quick else FULL_SECONDS
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    topo = Topology(prefix=f"bab{os.getpid() % 10000}", clients=2)
    floods: list[dict[str, float]] = []
    cpu: dict[str, list[float]] = {"quiet": [], "flood": []}
    try:
        topo.create()
        data = topo.workdir / "relay-data"
        relay = topo.start_relay(data)
        honest = topo.connect_openconnect(HONEST_CLIENT, data)
        start_iperf(topo)

        def measure(flood: bool) -> Callable[[], float]:
            def go() -> float:
                proc = None
                if flood:
                    proc = subprocess.Popen(
                        ["ip", "netns", "exec", topo.client_ns(FLOOD_CLIENT), sys.executable,
                         "-m", "bench.abuse", "--flood-child", relay_ip(FLOOD_CLIENT),
                         str(LISTEN_PORT), str(FLOOD_LEAD + seconds)],
                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
                    time.sleep(FLOOD_LEAD)
                pids = common.process_tree(relay.pid)  # the control plane and its workers
                before = cpu_seconds(pids)
                try:
                    mbit = iperf(topo, HONEST_CLIENT, False, seconds)
                finally:
                    after = cpu_seconds(pids)
                    if proc is not None:
                        out, _ = proc.communicate(timeout=FLOOD_GRACE)
                        floods.append(json.loads(out))
                used = sum(after[p] - before[p] for p in before if p in after)
                cpu["flood" if flood else "quiet"].append(used / (mbit * seconds / 1e3))
                return mbit
            return go

        medians = common.interleaved({"quiet": measure(False), "flood": measure(True)},
                                     repeats)
        survived = honest.poll() is None
        bans = ns_run([sys.executable, "-m", "relay.cli", "ban", "list", "--json",
                       "--data-dir", str(data)]).stdout.splitlines()
    finally:
        topo.destroy()
    attempts = statistics.median((f["completed"] + f["refused"]) / f["seconds"] for f in floods)
    refused = statistics.median(f["refused"] / f["seconds"] for f in floods)
    cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
    honest_name = "honest session, no flood"
    rows = [
        Row(NAME, "honest session TCP throughput under a connect flood", "Mbit/s",
            honest_name, medians["quiet"], "honest session, flood", medians["flood"], repeats),
        Row(NAME, "flood connection attempts refused", "attempts/s", "flood attempts",
            attempts, "refused", refused, repeats),
        Row(NAME, "relay CPU per Gbit of honest traffic, flood vs none", "CPU s per Gbit",
            honest_name, cpu_medians["quiet"], "honest session, flood", cpu_medians["flood"],
            repeats, higher_is_better=False),
    ]
    common.write(NAME, rows, {"seconds_per_run": seconds, "floods": floods,
                              "honest_session_survived": survived,
                              "bans": [json.loads(b) for b in bans]})
    common.bar_plot(RESULTS / f"{NAME}.png", "Honest session's iperf3 TCP through the relay",
                    ["no flood", f"connect flood ({refused:.0f} refused/s)"],
                    [medians["quiet"], medians["flood"]], "Mbit/s")
    return rows


def main() -> None:
    ap = common.quick_parser(__doc__)
    ap.add_argument("--flood-child", nargs=3, metavar=("HOST", "PORT", "SECONDS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flood_child:
        host, port, secs = args.flood_child
        flood_child(host, int(port), float(secs))
        return
    common.print_rows(run(args.quick))


if __name__ == "__main__":
    main()
