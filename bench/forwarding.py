"""Forwarding: iperf3 through the relay (capture on, capture off) and through
Debian's ocserv, from the stock openconnect client, on one namespace topology.

::

    client-1 ── openconnect ──TLS──▶ relay serve :443   ┐
    client-2 ── openconnect ──TLS──▶ ocserv     :4443  ├ relay ns ── internet ns (iperf3 -s)
                                                       ┘

Both servers run in the same relay namespace and both tunnels are CSTP over
TLS/TCP (the relay's client runs with --no-dtls, ocserv is given no UDP port;
bench/dtls.py compares the DTLS channels). Figures: TCP Mbit/s
and small-packet UDP packets/s received by the iperf3 server, client towards the
internet; and the CPU time the servers' own processes used per unit of traffic
(from /proc/PID/stat, taken just before and after each iperf3 run). Variants run
round-robin, repeated, medians kept.

    python -m bench.forwarding [--quick]
"""

from __future__ import annotations

import ipaddress
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench import common
from bench.common import RESULTS, Row
from relay.netns import (
    INTERNET_IP,
    VPNC_SCRIPT,
    Topology,
    relay_command,
    relay_ip,
    wait_for,
)
from relay.netns import run as ns_run
from relay.tlsconf import SELF_SIGNED_CERT, ensure_self_signed, pin_sha256

NAME = "forwarding"
# Seconds per iperf3 run: 10 s lets TCP's window settle for most of the run;
# quick mode's 3 s is still well past slow start on a namespace link.
FULL_SECONDS, QUICK_SECONDS = 10, 3
# Rounds of every variant: 3 gives a median that one noisy run cannot move.
FULL_REPEATS, QUICK_REPEATS = 3, 1
# "Small-packet" UDP: 64 bytes of payload (a 92-byte IP packet), sent unthrottled
# (-b 0) so the tunnel, not iperf3's pacing, sets the rate.
UDP_PAYLOAD = 64
# ocserv's port beside the relay's 443 in the same namespace.
OCSERV_PORT = 4443
# ocserv's address pool: another block than the relay's 10.211.0.0/16.
OCSERV_POOL = "10.212.0.0/24"
# The relay's default tunnel MTU, given to ocserv too so both carry the same
# segment size.
TUNNEL_MTU = 1400
# Seconds to wait for a server to listen or a tunnel to come up.
START_TIMEOUT = 30
# iperf3 gets this much longer than the run before it is considered hung.
IPERF_GRACE = 30
# iperf3's default port, where its server listens in the internet namespace.
IPERF_PORT = 5201
OCSERV_USER, OCSERV_PASSWORD = "bench", "bench-password"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RELAY_CLIENT, OCSERV_CLIENT = 1, 2


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """utime + stime of each process (all its threads), in seconds."""
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        # After the ")" of comm, field 3 (state) is index 0: utime is 14, stime 15.
        out[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def ns_pids(ns: str, comm_prefix: str) -> list[int]:
    """Processes in ``ns`` whose name starts with ``comm_prefix``."""
    pids = []
    for pid in ns_run(["ip", "netns", "pids", ns], check=False).stdout.split():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text()
        except FileNotFoundError:
            continue
        if comm.startswith(comm_prefix):
            pids.append(int(pid))
    return pids


def start_ocserv(topo: Topology, udp: bool = False, pool: str = OCSERV_POOL,
                 settings: dict[str, str | int] | None = None) -> subprocess.Popen[bytes]:
    """ocserv on OCSERV_PORT of the relay namespace: plain auth, its own
    self-signed certificate, ``pool`` its address pool, masqueraded towards the
    uplink; with ``udp``, DTLS on UDP OCSERV_PORT (its default PSK-NEGOTIATE for
    openconnect), else no UDP. ``settings`` replace or add ocserv.conf keys
    (bench/scale.py's thousands of sessions). Returns its main process."""
    d = topo.workdir / "ocserv"
    d.mkdir()
    cert, key = ensure_self_signed(d, "ocserv.bench.test")
    passwd = d / "ocpasswd"
    subprocess.run(["ocpasswd", "-c", str(passwd), OCSERV_USER],
                   input=f"{OCSERV_PASSWORD}\n{OCSERV_PASSWORD}\n", text=True, check=True,
                   capture_output=True)
    net = ipaddress.IPv4Network(pool)
    keys: dict[str, str | int] = {
        "auth": f'"plain[passwd={passwd}]"', "tcp-port": OCSERV_PORT,
        **({"udp-port": OCSERV_PORT} if udp else {}),
        "run-as-user": "root", "run-as-group": "root", "socket-file": f"{d}/ocserv.sock",
        "pid-file": f"{d}/ocserv.pid", "server-cert": str(cert), "server-key": str(key),
        "isolate-workers": "false", "max-clients": 16, "max-same-clients": 0,
        "keepalive": 32400, "dpd": 90, "mobile-dpd": 1800, "try-mtu-discovery": "false",
        "mtu": TUNNEL_MTU, "cookie-timeout": 300, "deny-roaming": "false",
        "auth-timeout": 240, "device": "vpns", "predictable-ips": "true",
        "ipv4-network": str(net.network_address), "ipv4-netmask": str(net.netmask),
        **(settings or {})}
    conf = d / "ocserv.conf"
    conf.write_text("".join(f"{k} = {v}\n" for k, v in keys.items()))
    ns_run(["nft", "-f", "-"], topo.relay_ns, input=(
        "table ip bench_ocserv {\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    ip saddr {pool} oifname "{topo.uplink}" masquerade\n'
        "  }\n"
        "}\n"))
    proc = topo.spawn(topo.relay_ns, ["ocserv", "-f", "-c", str(conf)], "ocserv.log")
    wait_for(lambda: ns_run(["ss", "-ltn", f"sport = :{OCSERV_PORT}"], topo.relay_ns)
             .stdout.count("LISTEN") > 0, START_TIMEOUT, "ocserv to listen")
    return proc


def connect_ocserv(topo: Topology, i: int = OCSERV_CLIENT) -> None:
    """The stock openconnect client in client namespace ``i``, pinned to ocserv's
    certificate."""
    proc = topo.spawn(topo.client_ns(i), [
        "openconnect", "--protocol=anyconnect", "--servercert",
        pin_sha256(topo.workdir / "ocserv" / SELF_SIGNED_CERT), "--user", OCSERV_USER,
        "--passwd-on-stdin", "--non-inter", "--script", VPNC_SCRIPT, "--interface", "tun0",
        f"https://{relay_ip(i)}:{OCSERV_PORT}/"], f"openconnect-{i}.log",
        stdin=f"{OCSERV_PASSWORD}\n".encode())
    wait_for(lambda: topo.tunnel_ip(i) is not None or proc.poll() is not None,
             START_TIMEOUT, "openconnect to ocserv to configure tun0")
    if proc.poll() is not None:
        raise RuntimeError(f"openconnect to ocserv exited: {topo.log(f'openconnect-{i}.log')}")


def start_iperf(topo: Topology, servers: int = 1) -> None:
    """The iperf3 servers every forwarding benchmark measures against: one per
    concurrent client (an iperf3 server runs one test at a time), on
    IPERF_PORT and the ports after it."""
    ports = range(IPERF_PORT, IPERF_PORT + servers)
    for port in ports:
        topo.spawn(topo.internet_ns, ["iperf3", "-s", "-B", INTERNET_IP, "-p", str(port)],
                   f"iperf3-{port}.log")
    wait_for(lambda: ns_run(["ss", "-ltn", f"sport >= :{ports[0]} and sport <= :{ports[-1]}"],
                            topo.internet_ns).stdout.count("LISTEN") == servers,
             START_TIMEOUT, "iperf3 to listen")


def iperf_command(udp: bool, seconds: int, port: int = IPERF_PORT) -> list[str]:
    """An iperf3 client towards the server on ``port``: TCP, or small UDP packets
    sent unthrottled."""
    args = ["-u", "-l", str(UDP_PAYLOAD), "-b", "0"] if udp else []
    return ["iperf3", "-c", INTERNET_IP, "-p", str(port), "-J", "-t", str(seconds), *args]


def iperf_result(out: str, udp: bool) -> float:
    """Mbit/s received (TCP) or packets/s received (UDP) by the iperf3 server,
    from the client's JSON."""
    result = json.loads(out)
    if "error" in result:
        raise RuntimeError(f"iperf3: {result['error']}")
    end = result["end"]
    if udp:
        s = end["sum"]
        return (s["packets"] - s["lost_packets"]) / s["seconds"]
    return end["sum_received"]["bits_per_second"] / 1e6


def iperf(topo: Topology, client: int, udp: bool, seconds: int) -> float:
    """Mbit/s received (TCP) or packets/s received (UDP) by the iperf3 server."""
    out = ns_run(iperf_command(udp, seconds), topo.client_ns(client),
                 timeout=seconds + IPERF_GRACE).stdout
    return iperf_result(out, udp)


def run(quick: bool) -> list[Row]:
    seconds = QUICK_SECONDS if quick else FULL_SECONDS
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    topo = Topology(prefix=f"bfw{os.getpid() % 10000}", clients=2)
    try:
        topo.create()
        data = topo.workdir / "relay-data"
        relay = topo.start_relay(data)
        conf = str(topo.workdir / "relay.toml")
        topo.connect_openconnect(RELAY_CLIENT, data, extra=["--no-dtls"])
        start_ocserv(topo)
        connect_ocserv(topo)
        start_iperf(topo)

        def logging(state: str) -> None:
            ns_run([*relay_command(), "logging", state, "--config", conf], topo.relay_ns)

        def server_pids(server: str) -> list[int]:
            if server == "ocserv":
                # ocserv-main, ocserv-sm and the session's ocserv-worker.
                return ns_pids(topo.relay_ns, "ocserv")
            return common.process_tree(relay.pid)  # the control plane and its workers

        cpu: dict[str, list[float]] = {}

        def variant(server: str, client: int, udp: bool, off: bool = False
                    ) -> Callable[[], float]:
            def measure() -> float:
                if off:
                    logging("off")
                pids = server_pids(server)
                before = cpu_seconds(pids)
                try:
                    value = iperf(topo, client, udp, seconds)
                finally:
                    after = cpu_seconds(pids)
                    if off:
                        logging("on")
                used = sum(after[p] - before[p] for p in before if p in after)
                # CPU per unit: seconds per Gbit (TCP), microseconds per packet (UDP).
                per_unit = used / (value * seconds / 1e3) if not udp else \
                    used * 1e6 / (value * seconds)
                cpu.setdefault(key(server, udp, off), []).append(per_unit)
                return value
            return measure

        variants = {}
        for udp in (False, True):
            variants[key("relay", udp, False)] = variant("relay", RELAY_CLIENT, udp)
            variants[key("relay", udp, True)] = variant("relay", RELAY_CLIENT, udp, off=True)
            variants[key("ocserv", udp, False)] = variant("ocserv", OCSERV_CLIENT, udp)
        medians = common.interleaved(variants, repeats)
        stats = ns_run([*relay_command(), "logging", "status", "--json", "--config", conf],
                    topo.relay_ns).stdout
    finally:
        topo.destroy()
    cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
    rows = figures(medians, cpu_medians, repeats)
    common.write(NAME, rows, {"seconds_per_run": seconds, "udp_payload": UDP_PAYLOAD,
                              "tunnel_mtu": TUNNEL_MTU, "medians": medians,
                              "cpu_per_unit": cpu_medians,
                              "capture_status_after": json.loads(stats)})
    for udp, unit in ((False, "Mbit/s"), (True, "packets/s")):
        proto = "udp" if udp else "tcp"
        common.bar_plot(RESULTS / f"{NAME}-{proto}.png",
                        f"iperf3 {proto.upper()} through the tunnel ({unit})",
                        ["relay, logging on", "relay, logging off", "ocserv"],
                        [medians[key("relay", udp, False)], medians[key("relay", udp, True)],
                         medians[key("ocserv", udp, False)]], unit)
    return rows


def key(server: str, udp: bool, off: bool) -> str:
    return f"{server}{'-logging-off' if off else ''}/{'udp' if udp else 'tcp'}"


def figures(m: dict[str, float], cpu: dict[str, float], runs: int) -> list[Row]:
    on, off, oc = "relay, logging on", "relay, logging off", "ocserv"
    rows = []
    for udp, what, unit, cpu_unit in (
            (False, "TCP throughput", "Mbit/s", "CPU s per Gbit"),
            (True, f"UDP {UDP_PAYLOAD} B packets received", "packets/s",
             "CPU us per packet")):
        r_on, r_off, r_oc = key("relay", udp, False), key("relay", udp, True), \
            key("ocserv", udp, False)
        rows += [
            Row(NAME, f"{what}, logging on vs off", unit, off, m[r_off], on, m[r_on], runs,
                ">= 0.9"),
            Row(NAME, f"{what}, relay vs ocserv", unit, oc, m[r_oc], on, m[r_on], runs,
                ">= 1.0"),
            Row(NAME, f"{what}: server CPU, relay vs ocserv", cpu_unit, oc, cpu[r_oc], on,
                cpu[r_on], runs, higher_is_better=False),
            Row(NAME, f"{what}: server CPU, logging on vs off", cpu_unit, off, cpu[r_off], on,
                cpu[r_on], runs, higher_is_better=False),
        ]
    return rows


def main() -> None:
    common.run_alone(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
