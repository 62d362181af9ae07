"""OpenVPN forwarding: iperf3 through the relay's OpenVPN and through Debian's
``openvpn`` server, from the stock ``openvpn`` client, on one namespace topology.

::

    client-1 ── openvpn (UDP) ──▶ relay serve :1194     ┐
    client-2 ── openvpn (UDP) ──▶ openvpn --server :1195 ├ relay ns ── internet ns (iperf3 -s)
                                                        ┘

Both are `dev tun`, AES-256-GCM, the same MTU; the reference server accepts any
user name and password like the relay. Figures: TCP Mbit/s and small-packet UDP
packets/s received by the iperf3 server, and the servers' CPU per unit of
traffic. Variants run round-robin, repeated, medians kept.

Then, in this process, the data channel alone: packets per second of the C one
(relay.serve.datachannel) against its pure-Python twin
(relay.protocols.openvpn.datachannel), opening (decrypt, replay window) and
sealing (encrypt) batches of 64 packets, for each cipher, of the UDP benchmark's
92-byte packets and of 1400-byte ones; alternating, median of several rounds.

    python -m bench.openvpn [--quick]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from array import array
from collections.abc import Callable

from bench import common
from bench.common import RESULTS, Row
from bench.forwarding import (
    FULL_REPEATS,
    FULL_SECONDS,
    QUICK_REPEATS,
    QUICK_SECONDS,
    START_TIMEOUT,
    UDP_PAYLOAD,
    cpu_seconds,
    iperf,
    ns_pids,
    start_iperf,
)
from relay.netns import Topology, relay_command, relay_ip, wait_for
from relay.netns import run as ns_run
from relay.protocols.openvpn.datachannel import DataChannel, PyDataChannel
from relay.protocols.openvpn.keys import DATA_CIPHERS, DataKeys
from relay.protocols.openvpn.wire import MAX_PACKET_BYTES
from relay.serve.datachannel import CDataChannel
from relay.tlsconf import ensure_self_signed

NAME = "openvpn"
# The reference server's port beside the relay's 1194 in the same namespace.
REFERENCE_PORT = 1195
# Its pool: another block than the relay's 10.211.0.0/16.
REFERENCE_NET, REFERENCE_MASK, REFERENCE_POOL = "10.213.0.0", "255.255.255.0", "10.213.0.0/24"
# The relay's default tunnel MTU, given to the reference server too.
TUNNEL_MTU = 1400
RELAY_CLIENT, REFERENCE_CLIENT = 1, 2
# The data channel alone: packets per batch (a UDP receive of a busy session is
# about this: the relay takes up to 128 per recvmmsg), the UDP benchmark's packet
# (64 bytes of payload in IP and UDP) and a full one, rounds, and the time each
# measurement repeats its workload for, so that timer and scheduler noise stay small.
DC_BATCH = 64
DC_SIZES = (UDP_PAYLOAD + 28, 1400)
DC_BATCHES = 40
FULL_DC_ROUNDS, QUICK_DC_ROUNDS = 7, 3
DC_MIN_ROUND_S = 0.2


def start_reference(topo: Topology) -> None:
    """Debian's openvpn in server mode: its own self-signed certificate, any
    credentials accepted, its pool masqueraded towards the uplink."""
    d = topo.workdir / "ovpn-ref"
    d.mkdir()
    cert, key = ensure_self_signed(d, "openvpn.bench.test")
    conf = d / "server.conf"
    conf.write_text(f"""\
port {REFERENCE_PORT}
proto udp
dev tun
topology subnet
server {REFERENCE_NET} {REFERENCE_MASK}
ca {cert}
cert {cert}
key {key}
dh none
verify-client-cert none
script-security 3
auth-user-pass-verify /bin/true via-env
username-as-common-name
duplicate-cn
data-ciphers AES-256-GCM
tun-mtu {TUNNEL_MTU}
push "redirect-gateway def1"
keepalive 10 60
verb 3
""")
    ns_run(["nft", "-f", "-"], topo.relay_ns, input=(
        "table ip bench_openvpn {\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    ip saddr {REFERENCE_POOL} oifname "{topo.uplink}" masquerade\n'
        "  }\n"
        "}\n"))
    topo.spawn(topo.relay_ns, ["openvpn", "--config", str(conf)], "openvpn-server.log")
    wait_for(lambda: "Initialization Sequence Completed" in topo.log("openvpn-server.log"),
             START_TIMEOUT, "the reference openvpn server")


def reference_client_config(topo: Topology) -> str:
    cert = (topo.workdir / "ovpn-ref" / "tls" / "cert.pem").read_text()
    return (f"client\ndev tun\nproto udp\nremote {relay_ip(REFERENCE_CLIENT)} {REFERENCE_PORT}\n"
            "nobind\ndata-ciphers AES-256-GCM\nverb 3\n"
            f"<auth-user-pass>\nbench\nbench\n</auth-user-pass>\n<ca>\n{cert}</ca>\n")


def connect(topo: Topology, i: int, config: str) -> None:
    path = topo.workdir / f"client-{i}.ovpn"
    path.write_text(config)
    path.chmod(0o600)
    proc = topo.spawn(topo.client_ns(i), ["openvpn", "--config", str(path)],
                      f"openvpn-{i}.log")
    wait_for(lambda: topo.tunnel_ip(i) is not None or proc.poll() is not None,
             START_TIMEOUT, f"openvpn in client {i} to configure tun0")
    if proc.poll() is not None:
        raise RuntimeError(f"openvpn client {i} exited: {topo.log(f'openvpn-{i}.log')}")


def _channel(make: Callable[[], DataChannel], keys: DataKeys) -> DataChannel:
    ch = make()
    ch.install(0, keys)
    return ch


def _workload(cipher: str, size: int) -> tuple[DataKeys, bytearray, array[int],
                                                list[tuple[bytes, array[int]]]]:
    """The server's keys, a batch of payloads, and DC_BATCHES batches of packets
    the client sealed (fresh packet ids, so that each opens as new)."""
    server = DataKeys.from_key2(cipher, os.urandom(256))
    client = DataKeys(cipher, server.decrypt_key, server.decrypt_iv, server.encrypt_key,
                      server.encrypt_iv)
    payloads, spans = bytearray(), array("I")
    for _ in range(DC_BATCH):
        spans.extend((len(payloads), size))
        payloads += b"\x45" + os.urandom(size - 1)
    sealer = _channel(CDataChannel, client)
    sealed = []
    for _ in range(DC_BATCHES):
        out = sealer.seal(0, 0, payloads, spans, tcp=False)
        sealed.append((bytes(out.data[:out.size]), out.spans))
    return server, payloads, spans, sealed


def _opening(make: Callable[[], DataChannel], server: DataKeys,
             sealed: list[tuple[bytes, array[int]]]) -> Callable[[], None]:
    def one() -> None:
        ch = _channel(make, server)  # a fresh window: every packet opens as new
        for pkts, spans in sealed:
            opened = ch.open(bytearray(pkts), spans, MAX_PACKET_BYTES)
            assert opened.counts[0] == DC_BATCH
    return one


def _sealing(make: Callable[[], DataChannel], server: DataKeys, payloads: bytearray,
             spans: array[int]) -> Callable[[], None]:
    def one() -> None:
        ch = _channel(make, server)
        for _ in range(DC_BATCHES):
            ch.seal(0, 0, payloads, spans, tcp=False)
    return one


def datachannel(rounds: int) -> dict[str, dict[str, float]]:
    """Packets/s of opening and of sealing, C and Python, alternating rounds."""
    results: dict[str, dict[str, float]] = {}
    for cipher in DATA_CIPHERS:
        for size in DC_SIZES:
            server, payloads, spans, sealed = _workload(cipher, size)
            for what, runs in (
                    ("open", {"c": _opening(CDataChannel, server, sealed),
                              "python": _opening(PyDataChannel, server, sealed)}),
                    ("seal", {"c": _sealing(CDataChannel, server, payloads, spans),
                              "python": _sealing(PyDataChannel, server, payloads, spans)})):
                pps = _alternate(runs, DC_BATCHES * DC_BATCH, rounds)
                results[f"{what} {cipher} {size} B"] = pps
                print(f"  data channel {what:<4} {cipher:<17} {size:>5} B: C "
                      f"{pps['c']:>12,.0f} pkt/s, Python {pps['python']:>10,.0f} pkt/s, "
                      f"{pps['c'] / pps['python']:.1f}x", flush=True)
    return results


def _alternate(runs: dict[str, Callable[[], None]], packets: int,
               rounds: int) -> dict[str, float]:
    """Each run repeated for about DC_MIN_ROUND_S, the runs alternating for
    ``rounds`` rounds: the median packets/s of each."""
    reps = {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, round(DC_MIN_ROUND_S / (time.perf_counter() - t0)))
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            samples[name].append(packets * reps[name] / (time.perf_counter() - t0))
    return {name: statistics.median(v) for name, v in samples.items()}


def datachannel_rows(results: dict[str, dict[str, float]], rounds: int) -> list[Row]:
    """Per packet in batches, C vs the twin: both directions of the UDP benchmark's
    packet with the goal (where per-packet costs are what batching removes), the
    full-size ones (where the cipher itself takes more of the time) reported."""
    rows = []
    for key, pps in results.items():
        what, cipher, size = key.split(" ", 2)
        small = size == f"{DC_SIZES[0]} B"
        rows.append(Row(NAME, f"data channel {what}, batch-{DC_BATCH}, {cipher}, {size}",
                        "packets/s", "Python twin", pps["python"], "C", pps["c"], rounds,
                        ">= 20" if small else ""))
    return rows


def run(quick: bool) -> list[Row]:
    rows, extra = traffic(quick)
    dc_rounds = QUICK_DC_ROUNDS if quick else FULL_DC_ROUNDS
    results = datachannel(dc_rounds)
    rows += datachannel_rows(results, dc_rounds)
    common.write(NAME, rows, {**extra, "data_channel_pps": results,
                              "data_channel_batch": DC_BATCH})
    return rows


def traffic(quick: bool) -> tuple[list[Row], dict[str, object]]:
    """iperf3 through the relay's OpenVPN and Debian's, as the module says."""
    seconds = QUICK_SECONDS if quick else FULL_SECONDS
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    topo = Topology(prefix=f"bov{os.getpid() % 10000}", clients=2)
    try:
        topo.create()
        data = topo.workdir / "relay-data"
        relay = topo.start_relay(data)
        conf = str(topo.workdir / "relay.toml")
        relay_config = ns_run([*relay_command(), "client-config", "openvpn", "--proto", "udp",
                               "--dev", "tun", "--remote", relay_ip(RELAY_CLIENT), "--config",
                               conf], topo.relay_ns).stdout
        connect(topo, RELAY_CLIENT, relay_config)
        start_reference(topo)
        connect(topo, REFERENCE_CLIENT, reference_client_config(topo))
        start_iperf(topo)
        cpu: dict[str, list[float]] = {}

        def variant(server: str, client: int, udp: bool) -> Callable[[], float]:
            def measure() -> float:
                # The relay: its control plane and workers.
                pids = common.process_tree(relay.pid) if server == "relay" else \
                    ns_pids(topo.relay_ns, "openvpn")
                before = cpu_seconds(pids)
                value = iperf(topo, client, udp, seconds)
                after = cpu_seconds(pids)
                used = sum(after[p] - before[p] for p in before if p in after)
                per_unit = used * 1e6 / (value * seconds) if udp else \
                    used / (value * seconds / 1e3)
                cpu.setdefault(key(server, udp), []).append(per_unit)
                return value
            return measure

        variants = {key(server, udp): variant(server, client, udp)
                    for udp in (False, True)
                    for server, client in (("relay", RELAY_CLIENT),
                                           ("openvpn", REFERENCE_CLIENT))}
        medians = common.interleaved(variants, repeats)
    finally:
        topo.destroy()
    cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
    rows = []
    for udp, what, unit, cpu_unit in ((False, "TCP throughput", "Mbit/s", "CPU s per Gbit"),
                                      (True, f"UDP {UDP_PAYLOAD} B packets received",
                                       "packets/s", "CPU us per packet")):
        rows += [
            Row(NAME, f"{what}, relay vs openvpn server", unit, "Debian openvpn server",
                medians[key("openvpn", udp)], "relay (OpenVPN)", medians[key("relay", udp)],
                repeats, ">= 1.0"),
            Row(NAME, f"{what}: server CPU, relay vs openvpn", cpu_unit,
                "Debian openvpn server", cpu_medians[key("openvpn", udp)], "relay (OpenVPN)",
                cpu_medians[key("relay", udp)], repeats, "<= 1.0", higher_is_better=False),
        ]
    extra: dict[str, object] = {"seconds_per_run": seconds, "medians": medians,
                                "cpu_per_unit": cpu_medians}
    for udp, unit in ((False, "Mbit/s"), (True, "packets/s")):
        proto = "udp" if udp else "tcp"
        common.bar_plot(RESULTS / f"{NAME}-{proto}.png",
                        f"iperf3 {proto.upper()} through OpenVPN ({unit})",
                        ["relay", "openvpn server"],
                        [medians[key("relay", udp)], medians[key("openvpn", udp)]], unit)
    return rows, extra


def key(server: str, udp: bool) -> str:
    return f"{server}/{'udp' if udp else 'tcp'}"


def main() -> None:
    common.run_alone(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
