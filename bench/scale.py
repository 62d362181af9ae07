"""Scale: many clients at once and thousands of idle sessions, the relay beside
Debian's ocserv in the same run, on one namespace topology.

::

    client-1..C   openconnect ──TLS──▶ relay serve :443    ┐
    client-C+1..2C openconnect ──TLS──▶ ocserv     :4443   ├ relay ns ── internet ns
    client-2C+1   bench/cstp_swarm.py, stock openconnect -S ┘  (iperf3 -s, one per client)

- **Throughput with 1, 4 and 8 clients**: that many stock openconnect clients
  (``--no-dtls``, each in its own namespace) run iperf3 at once, TCP and 64-byte
  UDP unthrottled, each towards its own iperf3 server; the sum of what the servers
  received, the server's CPU per Gbit, and the server's cores busy (CPU seconds of
  all its processes over the wall seconds of the run).
- **Idle sessions at 1,000 and 5,000**: bench/cstp_swarm.py opens them (the
  set-up rate), proves every tunnel carries an echo request and its reply, then
  holds them, answering DPD and sending keepalives as openconnect does: the
  servers' CPU seconds per second over a quiet window, and their memory (RSS and
  PSS of all their processes, idle vs before) per session.
- **The swarm against stock openconnect**: as many stock openconnect 9 clients at
  the first count, run with ``--script-tun`` (no tun device: the traffic goes to a
  script, here a ``sleep`` that holds the socket), against a freshly started
  relay: its memory per session and idle CPU with them vs with the swarm.

The server's processes are the process tree of its main process (``relay serve``;
ocserv's main, sec-mod and a worker per session), so a relay of several
processes is measured whole. The swarm connects from a /17 the swarm's namespace
routes to itself, a handful of sessions per address, so no per-source limit is
what is measured; each stock openconnect of the check gets its own source
address by a route per relay address (the relay namespace answers on a /18).

    python -m bench.scale [--quick]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import common
from bench.common import RESULTS, Row, process_tree
from bench.cstp_swarm import DEFAULT_CONCURRENCY, DEFAULT_PER_SOURCE
from bench.forwarding import (
    IPERF_GRACE,
    IPERF_PORT,
    OCSERV_PASSWORD,
    OCSERV_PORT,
    OCSERV_USER,
    START_TIMEOUT,
    connect_ocserv,
    iperf_command,
    iperf_result,
    start_iperf,
    start_ocserv,
)
from relay.fdlimit import FD_RESERVE, raise_nofile
from relay.netns import (
    INTERNET_IP,
    Topology,
    client_ip,
    relay_ip,
)
from relay.netns import run as ns_run
from relay.tlsconf import SELF_SIGNED_CERT, pin_sha256

NAME = "scale"
ROOT = Path(__file__).resolve().parent.parent
# Concurrent stock clients in the throughput rows: the 1, 4 and 8.
FULL_CLIENTS, QUICK_CLIENTS = (1, 4, 8), (1, 4)
# Idle sessions held at once: the 1,000 and 5,000; quick mode 200 and 1,000.
FULL_SESSIONS, QUICK_SESSIONS = (1000, 5000), (200, 1000)
# Seconds per iperf3 run and rounds of each variant: as bench/forwarding.py.
FULL_SECONDS, QUICK_SECONDS = 10, 3
FULL_REPEATS, QUICK_REPEATS = 3, 1
# The quiet window idle CPU is measured over: the minute (the relay's
# session checkpoint, every 60 s, falls in it); quick mode one DPD interval, so
# every session sends a keepalive and a DPD request in it.
FULL_QUIET_S, QUICK_QUIET_S = 60, 30
# After the sessions are open and pinged, before the quiet window: the servers'
# set-up work (records, reverse lookups, worker start-up) has ended by then.
SETTLE_S = 5
# The servers announce the relay's default DPD and keepalive intervals (its
# [server] dpd and keepalive), ocserv's set to the same, so the swarm behaves alike
# towards both: a keepalive every 20 s, a DPD exchange every 30 s, per session.
DPD_S, KEEPALIVE_S = 30, 20
# Sessions either server must hold: the largest count, the throughput clients and
# room for a session closing while the next opens.
MAX_SESSIONS = max(FULL_SESSIONS) + 1000
# The relay's pool stays its default /16 (65,534 addresses, plenty); ocserv's is
# the /19 past its usual /24 (8,190 addresses).
OCSERV_SCALE_POOL = "10.212.0.0/19"
# The admission rate the swarm meets: the relay's default [abuse] rate_total (200
# connections/s, burst 400) and ocserv's sample rate-limit-ms (100: 10/s) are
# policies, and the set-up rate would be the configured cap; both are lifted so
# the rows measure what each server can set up. Every per-source limit stays at
# its default: the swarm spreads over enough addresses not to meet them.
UNCAPPED_RATE = 1_000_000
# The swarm's sources: the upper half of RFC 2544's 198.18.0.0/15 that no
# Topology namespace uses; the relay namespace's addresses the stock clients of
# the check connect to: the /18 below it.
SWARM_SOURCES = ipaddress.IPv4Network("198.18.128.0/17")
CHECK_SERVER_ADDRESSES = ipaddress.IPv4Network("198.18.64.0/18")
# Stock openconnect clients starting at once in the check: each is a process doing
# a TLS handshake and a login, so a few dozen keep both cores busy.
CHECK_CONCURRENCY = 32
# Seconds per session allowed for the swarm's commands and the check's start-up,
# on top of START_TIMEOUT: ~1 ms of CPU per TLS handshake, slower on a loaded box.
SECONDS_PER_SESSION = 0.1
METRICS_URL = "http://127.0.0.1:9810/metrics"  # the relay's [metrics] listen default


# -- processes ------------------------------------------------------------------------


@dataclass
class Memory:
    rss_kib: int  # resident pages, shared ones counted in every process mapping them
    pss_kib: int  # each shared page split between the processes sharing it
    # Anonymous pages (heap, stacks), each split between the processes sharing it:
    # only a server's own forks share them, so summed over its processes each
    # page counts once, and no other process on the machine moves the figure.
    anon_kib: int
    pte_kib: int  # page tables (VmPTE), kernel memory each process costs
    processes: int


def memory(pids: list[int]) -> Memory:
    """The memory of ``pids`` together, from /proc/PID/smaps_rollup and status."""
    fields = {"Rss": 0, "Pss": 0, "Pss_Anon": 0, "VmPTE": 0}
    n = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text() + \
                Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        n += 1
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name in fields:
                fields[name] += int(value.split()[0])
    return Memory(fields["Rss"], fields["Pss"], fields["Pss_Anon"], fields["VmPTE"], n)


def cpu_total(pids: list[int]) -> float:
    """CPU seconds ``pids`` have run, all their threads, to the nanosecond
    (/proc/PID/task/TID/schedstat): /proc/PID/stat counts in clock ticks (10 ms)
    per process, and a worker that wakes for microseconds a keepalive would stay
    at zero in it however many there are."""
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue
    return total / 1e9


def per_session(mem: Memory, before: Memory, n: int) -> dict[str, float]:
    return {f"{k}_kib_per_session": (getattr(mem, f"{k}_kib") - getattr(before, f"{k}_kib")) / n
            for k in ("rss", "pss", "anon", "pte")}


def relay_sessions(topo: Topology) -> int:
    """Sessions the relay says it holds (relay_sessions_active, all protocols)."""
    text = ns_run(["curl", "-sS", "-m", "10", METRICS_URL], topo.relay_ns).stdout
    return int(sum(float(m.group(1)) for m in re.finditer(
        r"^relay_sessions_active\{[^}]*\} (\S+)$", text, re.M)))


def ocserv_workers(pids: list[int]) -> int:
    """ocserv's worker processes (one per connection)."""
    count = 0
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().startswith("ocserv-worker"):
                count += 1
        except FileNotFoundError:
            continue
    return count


# -- the servers ------------------------------------------------------------------------


def start_relay(topo: Topology, data: Path, name: str) -> subprocess.Popen[bytes]:
    return topo.start_relay(
        data, name=name,
        server_keys=f"max_sessions = {MAX_SESSIONS}\n",
        abuse_keys=f"rate_total = {UNCAPPED_RATE}.0\nburst_total = {UNCAPPED_RATE}\n")


def restart_relay(topo: Topology, relay: subprocess.Popen[bytes], data: Path,
                  name: str) -> subprocess.Popen[bytes]:
    """A fresh relay: memory per session measured from a heap that never held
    sessions (a heap that did would reuse what the last ones freed)."""
    os.killpg(relay.pid, signal.SIGTERM)
    relay.wait(START_TIMEOUT)
    return start_relay(topo, data, name)


# Every swarm session logs in as the same user: with predictable-ips ocserv starts
# each one's address search at the address that user's name hashes to, and walks
# past every address in use (O(n) per session, O(n^2) in all), so it picks at
# random instead.
OCSERV_SCALE_SETTINGS: dict[str, str | int] = {
    "max-clients": MAX_SESSIONS, "rate-limit-ms": 0, "dpd": DPD_S, "keepalive": KEEPALIVE_S,
    "predictable-ips": "false"}


# -- throughput -------------------------------------------------------------------------


def traffic(topo: Topology, clients: list[int], udp: bool, seconds: int,
            pids: list[int]) -> tuple[float, float, float]:
    """iperf3 from every client at once, each to its own server: the sum of what
    the servers received (Mbit/s or packets/s), the CPU seconds ``pids`` used,
    and the wall seconds that took."""
    before, t0 = cpu_total(pids), time.monotonic()
    procs = [subprocess.Popen(["ip", "netns", "exec", topo.client_ns(c),
                               *iperf_command(udp, seconds, IPERF_PORT + k)],
                              stdout=subprocess.PIPE, text=True)
             for k, c in enumerate(clients)]
    outs = [p.communicate(timeout=seconds + IPERF_GRACE)[0] for p in procs]
    wall, used = time.monotonic() - t0, cpu_total(pids) - before
    if any(p.returncode for p in procs):
        raise RuntimeError(f"iperf3 failed: {[o[-300:] for o in outs]}")
    return sum(iperf_result(o, udp) for o in outs), used, wall


def throughput(topo: Topology, counts: tuple[int, ...], seconds: int, repeats: int,
               pids: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Every (server, client count, protocol) round-robin, repeated: medians of
    the value, the CPU per unit and the cores busy."""
    most = max(counts)
    samples: dict[str, dict[str, list[float]]] = {}

    def variant(server: str, n: int, udp: bool) -> Callable[[], float]:
        first = 1 if server == "relay" else most + 1
        clients = list(range(first, first + n))

        def measure() -> float:
            value, used, wall = traffic(topo, clients, udp, seconds, pids[server])
            # CPU per unit: seconds per Gbit (TCP), microseconds per packet (UDP).
            per_unit = used * 1e6 / (value * seconds) if udp else used / (value * seconds / 1e3)
            s = samples.setdefault(key(server, n, udp), {"cpu_per_unit": [], "cores": []})
            s["cpu_per_unit"].append(per_unit)
            s["cores"].append(used / wall)
            return value
        return measure

    variants = {key(server, n, udp): variant(server, n, udp)
                for n in counts for udp in (False, True) for server in ("relay", "ocserv")}
    medians = common.interleaved(variants, repeats)
    return {k: {"value": v, **{name: statistics.median(xs) for name, xs in samples[k].items()}}
            for k, v in medians.items()}


def key(server: str, n: int, udp: bool) -> str:
    return f"{server}/{n}/{'udp' if udp else 'tcp'}"


# -- idle sessions ----------------------------------------------------------------------


class Swarm:
    """bench/cstp_swarm.py in the swarm's namespace, driven over its pipes."""

    def __init__(self, topo: Topology, ns: int, port: int, user: str, password: str,
                 log_name: str) -> None:
        self.log = open(topo.workdir / log_name, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", topo.client_ns(ns), sys.executable, "-m", "bench.cstp_swarm",
             "--host", relay_ip(ns), "--port", str(port), "--user", user, "--password",
             password, "--source", str(SWARM_SOURCES[1]), "--ping", INTERNET_IP,
             "--max-sessions", str(MAX_SESSIONS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)

    def command(self, line: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        reply = self.proc.stdout.readline() if ready else ""
        if not reply:
            raise RuntimeError(f"cstp_swarm gave no answer to {line!r} within {timeout:.0f} s "
                               f"(exit status {self.proc.poll()})")
        return json.loads(reply)

    def close(self) -> None:
        self.command("close", START_TIMEOUT)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(START_TIMEOUT)
        self.log.close()


def quiet_cpu(pids: list[int], seconds: float) -> float:
    """CPU seconds per second ``pids`` used over ``seconds`` of nothing but idle
    sessions."""
    before, t0 = cpu_total(pids), time.monotonic()
    time.sleep(seconds)
    return (cpu_total(pids) - before) / (time.monotonic() - t0)


def idle_sessions(topo: Topology, server: str, root: int, swarm: Swarm,
                  counts: tuple[int, ...], quiet_s: float,
                  count_on_server: Callable[[list[int]], int]) -> dict[str, Any]:
    """Open the swarm's sessions up to each count, ping through every tunnel, then
    the quiet window: set-up rate, idle CPU and memory per session at each count,
    and the server's own count of its sessions."""
    pids = process_tree(root)
    before = memory(pids)
    out: dict[str, Any] = {"before": asdict(before), "idle_cpu_no_sessions":
                           quiet_cpu(pids, quiet_s)}
    opened = 0
    for n in counts:
        timeout = START_TIMEOUT + (n - opened) * SECONDS_PER_SESSION
        setup_cpu0 = cpu_total(process_tree(root))
        got = swarm.command(f"open {n - opened}", timeout)
        if got["failed"] or got["open"] != n:
            raise RuntimeError(f"{server}: the swarm opened {got['open']} of {n} sessions: "
                               f"{got['failed']}")
        setup_cpu = cpu_total(process_tree(root)) - setup_cpu0
        pinged = swarm.command("ping", timeout)
        if pinged["replied"] != n:
            raise RuntimeError(f"{server}: {n - pinged['replied']} of {n} tunnels carried no "
                               "echo request and reply")
        time.sleep(SETTLE_S)
        swarm.command("status", START_TIMEOUT)  # DPD answer times from here on
        pids = process_tree(root)
        idle_cpu = quiet_cpu(pids, quiet_s)
        pids = process_tree(root)
        mem = memory(pids)
        status = swarm.command("status", START_TIMEOUT)
        if status["lost"]:
            raise RuntimeError(f"{server}: sessions lost while idle: {status}")
        out[str(n)] = {
            "setup_rate": (n - opened) / got["seconds"], "setup": got,
            "setup_server_cpu_seconds": setup_cpu, "ping": pinged, "idle_cpu": idle_cpu,
            "memory": asdict(mem), **per_session(mem, before, n),
            "server_sessions": count_on_server(pids), "swarm": status}
        opened = n
    return out


def stock_clients(topo: Topology, ns: int, data: Path, root: int, n: int,
                  quiet_s: float) -> dict[str, Any]:
    """``n`` stock openconnect clients with --script-tun against the relay, each
    from its own source address: the relay's idle CPU and memory per session."""
    pids = process_tree(root)
    before = memory(pids)
    ns_run(["ip", "-batch", "-"], topo.client_ns(ns), input="".join(
        f"route add {CHECK_SERVER_ADDRESSES[k + 1]}/32 via {relay_ip(ns)} "
        f"src {SWARM_SOURCES[k + 1]}\n" for k in range(n)))
    up = topo.workdir / "openconnect-up"
    up.touch()
    # --script-tun hands the tunnel to the script over a socket (VPNFD): the
    # script notes that the session is up, then holds the socket open.
    script = f"echo up >> {up}; exec sleep 2147483647"
    pin = pin_sha256(data / SELF_SIGNED_CERT)

    def count_up() -> int:
        return up.read_text().count("up")

    procs = []
    t0 = time.monotonic()
    deadline = t0 + START_TIMEOUT + n * SECONDS_PER_SESSION * 10
    while len(procs) < n or count_up() < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count_up()} of {n} stock openconnect clients came up in time")
        exited = [p for p in procs if p.poll() is not None]
        if exited:
            raise RuntimeError(f"{len(exited)} stock openconnect clients exited; the first: "
                               f"{topo.log(f'stock-{procs.index(exited[0])}.log')[-800:]}")
        if len(procs) < n and len(procs) - count_up() < CHECK_CONCURRENCY:
            k = len(procs)
            procs.append(topo.spawn(topo.client_ns(ns), [
                "openconnect", "--protocol=anyconnect", "--servercert", pin, "--user",
                f"stock-{k}", "--passwd-on-stdin", "--non-inter", "--no-dtls", "--script-tun",
                "--script", script, f"https://{CHECK_SERVER_ADDRESSES[k + 1]}/"],
                f"stock-{k}.log", stdin=b"any password\n"))
        else:
            time.sleep(0.05)
    setup_s = time.monotonic() - t0
    time.sleep(SETTLE_S)
    pids = process_tree(root)
    idle_cpu = quiet_cpu(pids, quiet_s)
    mem = memory(process_tree(root))
    if any(p.poll() is not None for p in procs):
        raise RuntimeError("stock openconnect clients exited while idle")
    return {"before": asdict(before), "setup_seconds": setup_s, "idle_cpu": idle_cpu,
            "memory": asdict(mem), **per_session(mem, before, n),
            "server_sessions": relay_sessions(topo)}


# -- the run ------------------------------------------------------------------------------


def run(quick: bool) -> list[Row]:
    counts = QUICK_CLIENTS if quick else FULL_CLIENTS
    sessions = QUICK_SESSIONS if quick else FULL_SESSIONS
    seconds = QUICK_SECONDS if quick else FULL_SECONDS
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    quiet_s = QUICK_QUIET_S if quick else FULL_QUIET_S
    # The servers and the swarm inherit this; each raises its own soft limit too.
    problem = raise_nofile(2 * MAX_SESSIONS + FD_RESERVE)
    if problem:
        raise RuntimeError(problem)
    most = max(counts)
    swarm_ns = 2 * most + 1
    topo = Topology(prefix=f"bsc{os.getpid() % 10000}", clients=swarm_ns)
    try:
        topo.create()
        # The swarm's sources route to its namespace and are its own there.
        ns_run(["ip", "route", "add", "local", str(SWARM_SOURCES), "dev", "lo"],
               topo.client_ns(swarm_ns))
        ns_run(["ip", "route", "add", str(SWARM_SOURCES), "via", client_ip(swarm_ns)],
               topo.relay_ns)
        ns_run(["ip", "route", "add", "local", str(CHECK_SERVER_ADDRESSES), "dev", "lo"],
               topo.relay_ns)
        data = topo.workdir / "relay-data"
        relay = start_relay(topo, data, "relay")
        ocserv = start_ocserv(topo, pool=OCSERV_SCALE_POOL, settings=OCSERV_SCALE_SETTINGS)
        for i in range(1, most + 1):
            topo.connect_openconnect(i, data, extra=["--no-dtls"])
        for i in range(most + 1, 2 * most + 1):
            connect_ocserv(topo, i)
        start_iperf(topo, most)
        tput = throughput(topo, counts, seconds, repeats,
                          {"relay": process_tree(relay.pid), "ocserv": process_tree(ocserv.pid)})
        # The throughput clients' sessions end here: left alone, the relay's would
        # reconnect to the fresh relay and count among its idle sessions.
        ended = [p for p in topo.procs if p.args[4:5] == ["openconnect"]]
        for proc in ended:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in ended:
            proc.wait(START_TIMEOUT)

        relay = restart_relay(topo, relay, data, "relay-swarm")
        swarm = Swarm(topo, swarm_ns, 443, "swarm", "any password", "swarm-relay.log")
        idle = {"relay": idle_sessions(topo, "relay", relay.pid, swarm, sessions, quiet_s,
                                       lambda _: relay_sessions(topo))}
        swarm.close()
        swarm = Swarm(topo, swarm_ns, OCSERV_PORT, OCSERV_USER, OCSERV_PASSWORD,
                      "swarm-ocserv.log")
        idle["ocserv"] = idle_sessions(topo, "ocserv", ocserv.pid, swarm, sessions, quiet_s,
                                       ocserv_workers)
        swarm.close()

        relay = restart_relay(topo, relay, data, "relay-stock")
        stock = stock_clients(topo, swarm_ns, data, relay.pid, sessions[0], quiet_s)
    finally:
        topo.destroy()
    measured = {
        "seconds_per_run": seconds, "quiet_seconds": quiet_s, "dpd_s": DPD_S,
        "keepalive_s": KEEPALIVE_S, "swarm_concurrency": DEFAULT_CONCURRENCY,
        "swarm_sessions_per_source": DEFAULT_PER_SOURCE, "throughput": tput, "idle": idle,
        "stock_openconnect": stock}
    try:
        rows = figures(tput, idle, stock, counts, sessions, repeats)
    except Exception:
        common.write(NAME, [], measured)  # the measurements outlive a figure gone wrong
        raise
    common.write(NAME, rows, measured)
    plot(tput, idle, counts, sessions)
    return rows


def figures(tput: dict[str, dict[str, float]], idle: dict[str, Any], stock: dict[str, Any],
            counts: tuple[int, ...], sessions: tuple[int, ...], runs: int) -> list[Row]:
    rows = []
    for n in counts:
        clients = f"{n} client{'s' if n > 1 else ''}"
        for udp, what, unit in ((False, "TCP throughput", "Mbit/s"),
                                (True, "UDP 64 B packets received", "packets/s")):
            r, o = tput[key("relay", n, udp)], tput[key("ocserv", n, udp)]
            rows.append(Row(NAME, f"{what}, {clients}, relay vs ocserv", unit, "ocserv",
                            o["value"], "relay", r["value"], runs, ">= 1.0"))
            if not udp:
                rows.append(Row(NAME, f"{what}, {clients}: server CPU, relay vs ocserv",
                                "CPU s per Gbit", "ocserv", o["cpu_per_unit"], "relay",
                                r["cpu_per_unit"], runs, higher_is_better=False))
            # One client's traffic is one connection: a relay of several processes
            # still forwards it in one; the goal is for concurrent clients.
            rows.append(Row(NAME, f"{what}, {clients}: cores busy in the relay",
                            "CPU s per s", "one core", 1.0, "relay", r["cores"], runs,
                            ">= 1.0" if n > 1 else ""))
    rel, oc = idle["relay"], idle["ocserv"]
    for n in sessions:
        s = str(n)
        rows += [
            Row(NAME, f"memory per idle session, {n:,} sessions, relay vs ocserv",
                "KiB anonymous (PSS)", "ocserv", oc[s]["anon_kib_per_session"], "relay",
                rel[s]["anon_kib_per_session"], 1, higher_is_better=False),
            Row(NAME, f"memory per idle session, {n:,} sessions, relay vs budget",
                "KiB RSS", "64 KiB budget", 64.0, "relay", rel[s]["rss_kib_per_session"], 1,
                "<= 1.0", higher_is_better=False),
            Row(NAME, f"CPU of {n:,} idle sessions, relay vs ocserv", "CPU s per s", "ocserv",
                oc[s]["idle_cpu"], "relay", rel[s]["idle_cpu"], 1, higher_is_better=False),
        ]
        # DPD requests go only after dpd seconds with nothing received, and ocserv's
        # sessions receive their tun devices' IPv6 chatter for a minute after they
        # open: a short quiet window may hold none of theirs.
        if "dpd_rtt_ms_max" in oc[s]["swarm"] and "dpd_rtt_ms_max" in rel[s]["swarm"]:
            rows.append(Row(NAME, f"slowest DPD answer of {n:,} idle sessions, relay vs ocserv",
                            "ms", "ocserv", oc[s]["swarm"]["dpd_rtt_ms_max"], "relay",
                            rel[s]["swarm"]["dpd_rtt_ms_max"], 1, higher_is_better=False))
    previous = 0
    for n in sessions:
        s = str(n)
        rows.append(Row(NAME, f"session set-up rate, {previous:,} to {n:,} sessions, relay "
                        "vs ocserv", "sessions/s", "ocserv", oc[s]["setup_rate"], "relay",
                        rel[s]["setup_rate"], 1))
        previous = n
    first = str(sessions[0])
    rows += [
        Row(NAME, f"relay memory per idle session, {sessions[0]:,}, swarm vs stock clients",
            "KiB RSS", "stock openconnect -S", stock["rss_kib_per_session"], "cstp_swarm",
            rel[first]["rss_kib_per_session"], 1, higher_is_better=False),
        Row(NAME, f"relay CPU of {sessions[0]:,} idle sessions, swarm vs stock clients",
            "CPU s per s", "stock openconnect -S", stock["idle_cpu"], "cstp_swarm",
            rel[first]["idle_cpu"], 1, higher_is_better=False),
    ]
    return rows


def plot(tput: dict[str, dict[str, float]], idle: dict[str, Any], counts: tuple[int, ...],
         sessions: tuple[int, ...]) -> Path | None:
    """Relay beside ocserv: TCP and small-packet UDP by client count, memory per
    idle session by session count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    panels = [
        ("TCP, Mbit/s", [f"{n}" for n in counts],
         {s: [tput[key(s, n, False)]["value"] for n in counts] for s in ("relay", "ocserv")},
         "concurrent clients"),
        ("UDP 64 B, packets/s", [f"{n}" for n in counts],
         {s: [tput[key(s, n, True)]["value"] for n in counts] for s in ("relay", "ocserv")},
         "concurrent clients"),
        ("memory per idle session, KiB RSS", [f"{n:,}" for n in sessions],
         {s: [idle[s][str(n)]["rss_kib_per_session"] for n in sessions]
          for s in ("relay", "ocserv")}, "idle sessions"),
    ]
    width = 0.38
    for ax, (title, labels, values, xlabel) in zip(axes, panels, strict=True):
        xs = range(len(labels))
        for j, (server, color) in enumerate((("relay", "#4c72b0"), ("ocserv", "#dd8452"))):
            bars = ax.bar([x + (j - 0.5) * width for x in xs], values[server], width,
                          label=server, color=color)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(list(xs), labels)
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
    axes[0].legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{NAME}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 and 4 clients, 200 and 1,000 sessions, short rounds")
    common.print_rows(run(ap.parse_args().quick))


if __name__ == "__main__":
    sys.exit(main())
