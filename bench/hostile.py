"""Hostile: an honest openconnect session's iperf3 TCP throughput through the relay
while the attacks of issue 13 run at once, against the same session's throughput
without them, and the relay's memory before, during and after.

The attacks, each from a client namespace of its own and each looping for the
whole measured run:

- a TLS connect/disconnect flood (bench/abuse.py's flood child): its source is
  banned after the first strikes, then reset at accept;
- slowloris: connections that stop in the middle of the ClientHello and hold
  their handshake slot until the relay's deadline;
- a client that opens a tunnel and then sends DPD requests as fast as TCP takes
  them without ever reading the replies (closed at the link's hard cap);
- forged OpenVPN ``P_CONTROL_HARD_RESET_CLIENT_V2`` datagrams from thousands of
  spoofed addresses (raw sockets), answered statelessly without state.

The attackers run at the lowest CPU priority (nice 19): on one machine they share
the cores with the relay and the honest iperf3, where a real attacker's CPU is its
own. Figures: the honest session's Mbit/s under attack vs quiet (goal >= 0.9), the
relay's resident memory after the attack rounds vs before them and its peak
(VmHWM) during them. Variants run round-robin, repeated, medians kept.

    python -m bench.hostile [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import common
from bench.common import RESULTS, Row
from bench.forwarding import iperf, start_iperf
from relay.netns import Topology, client_ip, relay_ip
from relay.netns import run as ns_run

NAME = "hostile"
ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
# Seconds per iperf3 run, and rounds of each variant: as bench/abuse.py.
FULL_SECONDS, QUICK_SECONDS = 10, 4
FULL_REPEATS, QUICK_REPEATS = 3, 1
# The attacks start this long before iperf3 and end with it, so the whole
# measured run is under attack.
ATTACK_LEAD = 1.5
# Seconds to wait for an attack child's report after its time is up.
ATTACK_GRACE = 60
HONEST, FLOOD, SLOWLORIS, NON_READER, FORGER = 1, 2, 3, 4, 5
CSTP_PORT, OPENVPN_PORT = 443, 1194
# Forged sources: part of RFC 2544's block that no namespace uses; the relay's
# replies route back to the forger's namespace and die there.
FORGED = "198.18.128.0/17"
# Slowloris connections per round (each holds a handshake slot until the
# relay's handshake deadline) and how long a round holds them.
SLOWLORIS_CONNECTIONS = 64
SLOWLORIS_HOLD_S = 2.0
# Bytes of DPD requests one never-reading connection may send before giving up
# (far past the relay's cap: the relay closes it first).
NON_READER_LIMIT = 64 << 20
# Forged resets per burst (distinct sources), bursts back to back.
FORGED_BURST = 2000
# The attackers share the machine's two cores with the relay and the honest iperf3;
# a real attacker's CPU is its own. At the lowest priority they still flood with
# whatever CPU is left, and the honest session's loss measures the relay's cost.
ATTACKER_NICE = 19


def _tests_on_path() -> None:
    sys.path.insert(0, str(TESTS))


# The first bytes of a TLS ClientHello: the relay waits for the rest until its
# handshake deadline.
PARTIAL_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def slowloris_round(host: str) -> tuple[int, int]:
    """SLOWLORIS_CONNECTIONS connections that stop in their ClientHello, held for
    SLOWLORIS_HOLD_S; (opened, refused)."""
    socks, refused = [], 0
    for _ in range(SLOWLORIS_CONNECTIONS):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect((host, CSTP_PORT))
            s.sendall(PARTIAL_CLIENT_HELLO)
            socks.append(s)
        except OSError:
            refused += 1
            s.close()
    time.sleep(SLOWLORIS_HOLD_S)
    for s in socks:
        s.close()
    return len(socks), refused


def attack_child(kind: str, host: str, seconds: float) -> None:
    """Loop one attack for ``seconds``; print one JSON line of counts."""
    _tests_on_path()
    counts: dict[str, float] = {}

    def add(key: str, n: float = 1) -> None:
        counts[key] = counts.get(key, 0) + n

    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if kind == "slowloris":
            opened, refused = slowloris_round(host)
            add("opened", opened)
            add("refused", refused)
        elif kind == "non-reader":
            from hostile_client import dpd_flood

            try:
                result = dpd_flood(host, CSTP_PORT, NON_READER_LIMIT)
            except OSError:  # refused at accept once banned
                add("refused")
                time.sleep(0.05)
                continue
            add("closed-by-relay" if result.startswith("closed") else "not-closed")
        elif kind == "forged-resets":
            from openvpn_hostile import datagram, reset, sources

            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            for src in sources(FORGED, FORGED_BURST):
                raw.sendto(datagram(src, (host, OPENVPN_PORT), reset(os.urandom(8))),
                           (host, 0))
            raw.close()
            add("sent", FORGED_BURST)
        else:
            raise SystemExit(f"unknown attack {kind!r}")
    counts["seconds"] = time.monotonic() - t0
    print(json.dumps(counts), flush=True)


def memory_kib(pids: list[int]) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of processes together, in KiB: the relay's control
    plane and workers (their peaks summed: an upper bound of the peak of the sum,
    as they need not peak at once)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a short-lived child (tc, nft) gone since the tree was read
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in out:
                out[key] += int(value.split()[0])
    return out


def reset_peak(pids: list[int]) -> None:
    """Start VmHWM afresh at the current RSS (proc(5): clear_refs value 5)."""
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


ATTACKS = ("flood", "slowloris", "non-reader", "forged-resets")
ATTACK_CLIENT = {"flood": FLOOD, "slowloris": SLOWLORIS, "non-reader": NON_READER,
                 "forged-resets": FORGER}


def run(quick: bool, attacks: tuple[str, ...] = ATTACKS) -> list[Row]:
    seconds = QUICK_SECONDS if quick else FULL_SECONDS
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    topo = Topology(prefix=f"bho{os.getpid() % 10000}", clients=FORGER)
    reports: dict[str, list[dict[str, float]]] = {}
    peaks: list[int] = []
    try:
        topo.create()
        # Replies to forged sources go back to the forger's namespace, as a
        # spoofer's do on the internet: to hosts that never asked.
        ns_run(["ip", "route", "add", FORGED, "via", client_ip(FORGER)], topo.relay_ns)
        data = topo.workdir / "relay-data"
        relay = topo.start_relay(data)
        honest = topo.connect_openconnect(HONEST, data)
        start_iperf(topo)
        iperf(topo, HONEST, False, 1)  # warm-up: the first run pays for slow start
        before = memory_kib(common.process_tree(relay.pid))

        def measure(attack: bool) -> Callable[[], float]:
            def go() -> float:
                procs: list[tuple[str, subprocess.Popen[str]]] = []
                if attack:
                    reset_peak(common.process_tree(relay.pid))
                    for kind in attacks:
                        client = ATTACK_CLIENT[kind]
                        child = (["-m", "bench.abuse", "--flood-child", relay_ip(client),
                                  str(CSTP_PORT), str(ATTACK_LEAD + seconds)]
                                 if kind == "flood" else
                                 ["-m", "bench.hostile", "--attack", kind, relay_ip(client),
                                  str(ATTACK_LEAD + seconds)])
                        procs.append((kind, subprocess.Popen(
                            ["ip", "netns", "exec", topo.client_ns(client), "nice", "-n",
                             str(ATTACKER_NICE), sys.executable, *child],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)))
                    time.sleep(ATTACK_LEAD)
                try:
                    return iperf(topo, HONEST, False, seconds)
                finally:
                    for kind, proc in procs:
                        out, _ = proc.communicate(timeout=ATTACK_GRACE)
                        reports.setdefault(kind, []).append(json.loads(out))
                    if attack:
                        peaks.append(memory_kib(common.process_tree(relay.pid))["VmHWM"])
            return go

        medians = common.interleaved({"quiet": measure(False), "attack": measure(True)},
                                     repeats)
        after = memory_kib(common.process_tree(relay.pid))
        survived = honest.poll() is None and relay.poll() is None
    finally:
        topo.destroy()
    mib = 1024.0
    rows = [
        Row(NAME, "honest session TCP throughput under all attacks at once", "Mbit/s",
            "honest session, no attack", medians["quiet"], "honest session, attacks",
            medians["attack"], repeats, goal=">= 0.9"),
        Row(NAME, "relay resident memory after the attack rounds vs before", "MiB",
            "before", before["VmRSS"] / mib, "after", after["VmRSS"] / mib, repeats,
            higher_is_better=False),
        Row(NAME, "relay peak memory during an attack round vs before", "MiB",
            "before", before["VmRSS"] / mib, "peak under attack", max(peaks) / mib, repeats,
            higher_is_better=False),
    ]
    summary = {kind: {key: round(statistics.median(r.get(key, 0) for r in runs), 1)
                      for key in sorted({k for r in runs for k in r})}
               for kind, runs in reports.items()}
    common.write(NAME, rows, {"seconds_per_run": seconds, "attacks": summary,
                              "honest_session_and_relay_survived": survived,
                              "memory_kib": {"before": before, "after": after,
                                             "peaks": peaks}})
    common.bar_plot(RESULTS / f"{NAME}.png", "Honest session's iperf3 TCP through the relay",
                    ["no attack", "all attacks at once"],
                    [medians["quiet"], medians["attack"]], "Mbit/s")
    return rows


def main() -> None:
    ap = common.quick_parser(__doc__)
    ap.add_argument("--only", nargs="+", choices=ATTACKS, default=ATTACKS, metavar="ATTACK",
                    help=f"run only these attacks ({', '.join(ATTACKS)}): which one costs what")
    ap.add_argument("--attack", nargs=3, metavar=("KIND", "HOST", "SECONDS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.attack:
        kind, host, secs = args.attack
        attack_child(kind, host, float(secs))
        return
    common.print_rows(run(args.quick, tuple(args.only)))


if __name__ == "__main__":
    main()
