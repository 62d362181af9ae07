"""DTLS: iperf3 through the relay over DTLS, through the relay over TLS, and
through Debian's ocserv over DTLS, from the stock openconnect client, with and
without loss on the clients' links, on one namespace topology.

::

    client-1 ── openconnect (DTLS) ───────▶ relay serve :443 TCP+UDP   ┐
    client-2 ── openconnect --no-dtls ────▶ relay serve :443 TCP       ├ relay ns ── internet
    client-3 ── openconnect (DTLS) ───────▶ ocserv :4443 TCP+UDP       ┘          (iperf3 -s)

Loss: ebpf/loss.c on each client's link (both directions, each packet dropped
with the chosen probability), the same on the three links at a time; the machine
has no netem. Figures: TCP Mbit/s from the client to the iperf3 server at 0% and
1% loss (TCP over TLS over TCP suffers twice from each loss: the tunnel's TCP
retransmits and stalls the inner flows behind it); small-packet UDP packets/s
over DTLS at 0% loss; the servers' CPU per unit of traffic. Variants run
round-robin, repeated, medians kept. The DTLS channels must stay up the whole
run: the benchmark fails if either DTLS client fell back to TLS.

    python -m bench.dtls [--quick]
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable

from bench import common
from bench.common import RESULTS, Row
from bench.forwarding import (
    OCSERV_PORT,
    START_TIMEOUT,
    connect_ocserv,
    cpu_seconds,
    iperf,
    ns_pids,
    start_iperf,
    start_ocserv,
)
from relay.netns import Topology, wait_for
from relay.netns import run as ns_run

NAME = "dtls"
# Seconds per iperf3 run and rounds of each variant, as bench/forwarding.py.
FULL_SECONDS, QUICK_SECONDS = 10, 3
FULL_REPEATS, QUICK_REPEATS = 3, 1
# Loss on each client link, per direction: none, and 1% (the lossy path;
# a busy Wi-Fi or mobile link loses about that much).
LOSSES = (0.0, 0.01)
RELAY_DTLS, RELAY_TLS, OCSERV_DTLS = 1, 2, 3
CLIENT_LOG = "openconnect-{}.log"
# What openconnect prints once its DTLS channel is up, and when it gives it up.
DTLS_UP = "Established DTLS connection"
DTLS_DEAD = "DTLS Dead Peer Detection detected dead peer"


def tun_mtu(topo: Topology, i: int) -> int:
    out = ns_run(["ip", "-o", "link", "show", "dev", "tun0"], topo.client_ns(i)).stdout.split()
    return int(out[out.index("mtu") + 1])


def run(quick: bool) -> list[Row]:
    seconds = QUICK_SECONDS if quick else FULL_SECONDS
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    topo = Topology(prefix=f"bdt{os.getpid() % 10000}", clients=3)
    try:
        topo.create()
        data = topo.workdir / "relay-data"
        relay = topo.start_relay(data)
        topo.connect_openconnect(RELAY_DTLS, data)
        topo.connect_openconnect(RELAY_TLS, data, extra=["--no-dtls"])
        start_ocserv(topo, udp=True)
        connect_ocserv(topo, OCSERV_DTLS)
        for i in (RELAY_DTLS, OCSERV_DTLS):
            wait_for(lambda i=i: DTLS_UP in topo.log(CLIENT_LOG.format(i)), START_TIMEOUT,
                     f"client {i}'s DTLS channel")
        start_iperf(topo)
        mtus = {i: tun_mtu(topo, i) for i in (RELAY_DTLS, RELAY_TLS, OCSERV_DTLS)}
        cpu: dict[str, list[float]] = {}

        def variant(k: str, server: str, client: int, udp: bool) -> Callable[[], float]:
            def measure() -> float:
                # The relay: its control plane and workers.
                pids = ns_pids(topo.relay_ns, "ocserv") if server == "ocserv" else \
                    common.process_tree(relay.pid)
                before = cpu_seconds(pids)
                try:
                    value = iperf(topo, client, udp, seconds)
                finally:
                    after = cpu_seconds(pids)
                used = sum(after[p] - before[p] for p in before if p in after)
                per_unit = used * 1e6 / (value * seconds) if udp else \
                    used / (value * seconds / 1e3)
                cpu.setdefault(k, []).append(per_unit)
                return value
            return measure

        medians: dict[str, float] = {}
        for loss in LOSSES:
            for i in (RELAY_DTLS, RELAY_TLS, OCSERV_DTLS):
                topo.inject_loss(topo.client_ns(i), "eth0", loss)
            variants = {}
            for name, server, client, udp in (
                    ("relay-dtls", "relay", RELAY_DTLS, False),
                    ("relay-tls", "relay", RELAY_TLS, False),
                    ("ocserv-dtls", "ocserv", OCSERV_DTLS, False),
                    # Small packets over DTLS: on the clean link only.
                    *((("relay-dtls", "relay", RELAY_DTLS, True),
                       ("ocserv-dtls", "ocserv", OCSERV_DTLS, True)) if loss == 0 else ())):
                k = key(name, loss, udp)
                variants[k] = variant(k, server, client, udp)
            medians.update(common.interleaved(variants, repeats))
        fallbacks = {i: topo.log(CLIENT_LOG.format(i)).count(DTLS_DEAD)
                     for i in (RELAY_DTLS, OCSERV_DTLS)}
        if any(fallbacks.values()):
            raise RuntimeError(f"a DTLS channel fell back to TLS during the run: {fallbacks}")
    finally:
        topo.destroy()
    cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
    rows = figures(medians, cpu_medians, repeats)
    common.write(NAME, rows, {"seconds_per_run": seconds, "losses": LOSSES,
                              "ocserv_port": OCSERV_PORT, "tun_mtu": {
                                  "relay-dtls": mtus[RELAY_DTLS], "relay-tls": mtus[RELAY_TLS],
                                  "ocserv-dtls": mtus[OCSERV_DTLS]},
                              "medians": medians, "cpu_per_unit": cpu_medians})
    labels = ["relay, DTLS", "relay, TLS", "ocserv, DTLS"]
    for loss in LOSSES:
        common.bar_plot(RESULTS / f"{NAME}-tcp-loss{loss * 100:g}.png",
                        f"iperf3 TCP through the tunnel, {loss:.0%} loss (Mbit/s)", labels,
                        [medians[key(n, loss, False)]
                         for n in ("relay-dtls", "relay-tls", "ocserv-dtls")], "Mbit/s")
    return rows


def key(name: str, loss: float, udp: bool) -> str:
    return f"{name}/loss{loss * 100:g}/{'udp' if udp else 'tcp'}"


def figures(m: dict[str, float], cpu: dict[str, float], runs: int) -> list[Row]:
    dtls_, tls, oc = "relay, DTLS", "relay, TLS", "ocserv, DTLS"
    rows = []
    for loss in LOSSES:
        pct = f"{loss:.0%} loss"
        r_d, r_t, r_o = (key(n, loss, False) for n in ("relay-dtls", "relay-tls", "ocserv-dtls"))
        rows += [
            Row(NAME, f"TCP throughput, {pct}, relay DTLS vs ocserv DTLS", "Mbit/s", oc, m[r_o],
                dtls_, m[r_d], runs, ">= 1.0" if loss == 0 else ""),
            Row(NAME, f"TCP throughput, {pct}, relay DTLS vs relay TLS", "Mbit/s", tls, m[r_t],
                dtls_, m[r_d], runs, ">= 3" if loss > 0 else ""),
            Row(NAME, f"TCP throughput, {pct}: server CPU, relay DTLS vs ocserv DTLS",
                "CPU s per Gbit", oc, cpu[r_o], dtls_, cpu[r_d], runs, higher_is_better=False),
        ]
    u_d, u_o = key("relay-dtls", 0.0, True), key("ocserv-dtls", 0.0, True)
    rows += [
        Row(NAME, "UDP 64 B packets received over DTLS, relay vs ocserv", "packets/s", oc,
            m[u_o], dtls_, m[u_d], runs),
        Row(NAME, "UDP 64 B packets over DTLS: server CPU, relay vs ocserv", "CPU us per packet",
            oc, cpu[u_o], dtls_, cpu[u_d], runs, higher_is_better=False),
    ]
    return rows


def main() -> None:
    common.run_alone(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
