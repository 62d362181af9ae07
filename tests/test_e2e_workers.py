"""End to end: relay serve with several datapath workers (issue 15), stock clients
in namespaces. Sessions spread over the workers, each page stamped, every record
and packet attributed (the capture sees every queue), DTLS channels and OpenVPN
floats reaching the worker that owns their session whatever the kernel's hash
says; a worker SIGKILLed mid-session: its sessions' disconnect records say so,
the others carry on, it is started again and takes new sessions; a reload
enforced in every worker; the metrics summed with per-worker gauges; SIGTERM
reaching every worker."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import records, scrape, wait_records
from test_e2e_cstp import client_tcp_port
from test_e2e_openvpn import OPENVPN_PORT, REBIND, client_port, openvpn_version, start_openvpn

from relay.netns import Topology, client_ip, relay_ip, run, wait_for
from relay.packetlog import segments

pytestmark = pytest.mark.netns

DTLS_UP = "Established DTLS connection"


def relay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], capture_output=True,
                          text=True, timeout=60, check=True)


def live_sessions(data: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in
            relay_cli("sessions", "--json", "--data-dir", str(data)).stdout.splitlines()]


def status(data: Path) -> dict[str, Any]:
    return json.loads(relay_cli("status", "--json", "--data-dir", str(data)).stdout)  # type: ignore[no-any-return]


def session_of(data: Path, i: int) -> dict[str, Any]:
    """Client namespace ``i``'s open session."""
    [s] = [s for s in live_sessions(data) if s["client_ip"] == client_ip(i)]
    return s


def metric(topo: Topology, name: str, **labels: str) -> float:
    return scrape(topo).get((name, tuple(sorted(labels.items()))), 0.0)


def workers(n: int) -> str:
    return f"workers = {n}\n"


def stamped(agent: str, session_id: str) -> str:
    """``agent`` as the web server logs it: its last 8 characters overwritten by
    the session's tag."""
    return f'"{agent[:-8]}{session_id[:8]}"'


def test_sessions_spread_over_the_workers_each_stamped_recorded_and_attributed(
        make_topology: Callable[..., Topology]) -> None:
    openvpn_version()
    topo = make_topology(5)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data, server_keys=workers(4))
    # New TCP connections go to the worker with the fewest: three openconnect
    # clients (DTLS on, openconnect's default) and an OpenVPN TCP client, one
    # after the other, take one worker each; an OpenVPN UDP client goes where
    # the kernel's hash of its address says.
    for i in (1, 2, 3):
        topo.connect_openconnect(i, data)
    start_openvpn(topo, data, "tcp", "tun", i=4)
    start_openvpn(topo, data, "udp", "tun", i=5)
    by_client = {i: session_of(data, i) for i in range(1, 6)}
    assert sorted(by_client[i]["worker"] for i in (1, 2, 3, 4)) == [0, 1, 2, 3]
    assert by_client[5]["worker"] in (0, 1, 2, 3)
    st = status(data)
    assert [w["sessions"] for w in st["workers"]] == [
        sum(s["worker"] == w for s in by_client.values()) for w in range(4)]
    assert len({w["pid"] for w in st["workers"]} | {st["pid"]}) == 5
    # Each DTLS channel reached its session's worker (the App-ID steers its
    # ClientHello, then its address its records): with four workers the hash
    # alone would have found the owner of all three one time in 64.
    for i in (1, 2, 3):
        wait_for(lambda i=i: DTLS_UP in topo.log(f"openconnect-{i}.log"), 30,
                 f"openconnect {i}'s DTLS")
    wait_for(lambda: metric(topo, "relay_dtls_channels_up") == 3, 20, "three DTLS channels")

    # A page from each, its User-Agent stamped with its own session's tag.
    for i in range(1, 6):
        assert "hello from the internet namespace" in topo.curl(i, "/", "-A",
                                                                f"spread-{i}/1.0 (X11)")
    sessions = {i: by_client[i]["session_id"] for i in range(1, 6)}
    topo.access_log(*(stamped(f"spread-{i}/1.0 (X11)", sessions[i]) for i in range(1, 6)))

    # Every session's packets, both ways, in the packet log with its client's
    # address: the capture on the device sees every worker's queue.
    def attributed() -> bool:
        seen: dict[str, set[str]] = {sid: set() for sid in sessions.values()}
        for r in segments.iter_records(data):
            if r["session_id"] in seen and (r["src_port"] == 80 or r["dst_port"] == 80):
                seen[r["session_id"]].add(r["direction"])
        return all(len(d) == 2 for d in seen.values())

    wait_for(attributed, 20, "packet records of every session both ways")
    ports = {i: client_tcp_port(topo, i) for i in (1, 2, 3)}
    ports |= {4: client_port(topo, "tcp", 4), 5: client_port(topo, "udp", 5)}
    for i, sid in sessions.items():
        mine = [r for r in segments.iter_records(data) if r["session_id"] == sid]
        assert {(r["client_ip"], r["client_port"]) for r in mine} == {(client_ip(i), ports[i])}

    # The clients go; every session has its one connect and one disconnect record.
    topo.stop_all()
    wait_records(data, "disconnect", 5)
    connects, disconnects = records(data, "connect"), records(data, "disconnect")
    assert sorted(r["session_id"] for r in connects) == sorted(sessions.values())
    assert sorted(r["session_id"] for r in disconnects) == sorted(sessions.values())
    for rec in disconnects:
        assert rec["packets"]["in"] > 0 and rec["packets"]["out"] > 0
        assert rec["reason"] != "worker-lost"


def test_an_openvpn_client_that_floats_keeps_its_session_on_its_worker(
        make_topology: Callable[..., Topology]) -> None:
    """Its data packets carry the peer id whose top byte names its worker: from a
    new address they still reach the session there, which moves (three times,
    over four workers: the hash alone would have kept all three moves on the
    owner one time in 64)."""
    openvpn_version()
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data, server_keys=workers(4))
    client = start_openvpn(topo, data, "udp", "tun")
    port = client_port(topo, "udp")
    sid = session_of(data, 1)["session_id"]
    worker = session_of(data, 1)["worker"]
    for n, new in enumerate((40001, 40002, 40003), 1):
        run(["nft", "delete", "table", "ip", "rebind"], topo.client_ns(1), check=False)
        run(["nft", "-f", "-"], topo.client_ns(1), input=REBIND.format(
            relay=relay_ip(1), relay_port=OPENVPN_PORT, port=port, new=new))
        assert "hello" in topo.curl(1, "/", "-A", f"float-{n}/1.0 (X11)")
        moved = wait_records(data, "client-float", n)[-1]
        assert (moved["session_id"], moved["to"]) == (sid, {"ip": client_ip(1), "port": new})
        assert session_of(data, 1)["worker"] == worker
        topo.access_log(stamped(f"float-{n}/1.0 (X11)", sid))
        # The capture attributes the packets from the new address to the session.
        wait_for(lambda new=new: any(  # type: ignore[misc]
            r["session_id"] == sid and r["dst_port"] == 80 and r["client_port"] == new
            for r in segments.iter_records(data)), 20, f"packet records at port {new}")
    assert metric(topo, "relay_openvpn_floats_total") == 3
    client.send_signal(signal.SIGTERM)
    client.wait(15)
    [disconnect] = wait_records(data, "disconnect", 1)
    assert disconnect["reason"] == "client-disconnect: exit notification (OCC_EXIT)"
    assert [f["to"]["port"] for f in disconnect["floats"]] == [40001, 40002, 40003]


def test_a_killed_worker_closes_its_sessions_and_serves_again(
        make_topology: Callable[..., Topology]) -> None:
    """Two workers, openconnect and openvpn clients on both; the worker of the
    first is SIGKILLed mid-session. Its sessions, and only those, get
    disconnect records saying so; the others carry on; the worker is started
    again and serves; every session has exactly one connect and one disconnect
    record when the relay stops."""
    openvpn_version()
    topo = make_topology(5)
    data = topo.workdir / "data"
    topo.start_web()
    relay = topo.start_relay(data, server_keys=workers(2))
    # New TCP connections go to the worker with the fewest (the first of equals):
    # openconnect 1 to worker 0, openconnect 2 to worker 1, openvpn over TCP 3 to
    # worker 0; openvpn over UDP 4 where the hash of its address says.
    clients = {1: topo.connect_openconnect(1, data), 2: topo.connect_openconnect(2, data)}
    clients[3] = start_openvpn(topo, data, "tcp", "tun", i=3)
    clients[4] = start_openvpn(topo, data, "udp", "tun", i=4)
    before = {i: session_of(data, i) for i in (1, 2, 3, 4)}
    assert [before[i]["worker"] for i in (1, 2, 3)] == [0, 1, 0]
    for i in (1, 2, 3, 4):
        topo.curl(i, "/big.bin", "-o", "/dev/null")
    dead_worker = before[1]["worker"]
    victims = {i for i, s in before.items() if s["worker"] == dead_worker}
    others = set(before) - victims
    dead_pid = status(data)["workers"][dead_worker]["pid"]

    os.kill(dead_pid, signal.SIGKILL)
    lost = wait_records(data, "disconnect", len(victims))
    assert sorted(r["session_id"] for r in lost) == \
        sorted(before[i]["session_id"] for i in victims)
    for rec in lost:
        assert rec["reason"] == "worker-lost"
        assert rec["error"] == (f"worker {dead_worker} (pid {dead_pid}) was killed by "
                                "SIGKILL; counters are from the session's last checkpoint")
        assert rec["virtual_ip"] in {before[i]["virtual_ip"] for i in victims}
    assert re.search(rf"relay: ERROR: worker {dead_worker} \(pid {dead_pid}\) was killed "
                     rf"by SIGKILL; {len(victims)} session\(s\) closed; starting it again",
                     topo.log("relay.log"))
    # The other worker's sessions never noticed: same session, a stamped page each.
    for i in others:
        agent = f"survivor-{i}/1.0 (X11)"
        assert "hello from the internet namespace" in topo.curl(i, "/", "-A", agent)
        assert session_of(data, i)["session_id"] == before[i]["session_id"]
        topo.access_log(stamped(agent, before[i]["session_id"]))
        assert clients[i].poll() is None
    assert relay.poll() is None
    # openconnect learns its session is gone (its cookie is spent) and ends.
    clients[1].wait(60)

    def restarted() -> dict[str, Any]:
        return status(data)["workers"][dead_worker]  # type: ignore[no-any-return]

    wait_for(lambda: restarted()["up"], 60, "the worker to serve again")
    assert restarted()["restarts"] == 1 and restarted()["pid"] != dead_pid
    assert metric(topo, "relay_worker_restarts_total", worker=str(dead_worker)) == 1
    # The openvpn client over TCP reconnects, a new session, and fetches a page.
    wait_for(lambda: topo.log("openvpn-3.log").count("Initialization Sequence Completed") == 2,
             60, "openvpn over TCP to reconnect")
    again = session_of(data, 3)
    assert again["session_id"] != before[3]["session_id"]
    assert "hello" in topo.curl(3, "/", "-A", "reconnected/1.0 (X11)")
    topo.access_log(stamped("reconnected/1.0 (X11)", again["session_id"]))
    # A new client: the restarted worker holds it or the reconnected one (whichever
    # came to the worker with the fewest connections after the restart).
    topo.connect_openconnect(5, data)
    assert "hello" in topo.curl(5, "/", "-A", "again/1.0 (X11)")
    topo.access_log(stamped("again/1.0 (X11)", session_of(data, 5)["session_id"]))
    assert dead_worker in {session_of(data, i)["worker"] for i in (3, 5)}
    assert restarted()["sessions"] >= 1

    # Every session, lost or not, has one connect and one disconnect record.
    relay.send_signal(signal.SIGTERM)
    relay.wait(30)
    opened = [r["session_id"] for r in records(data, "connect")]
    closed = [r["session_id"] for r in records(data, "disconnect")]
    assert len(opened) == len(set(opened)) and sorted(opened) == sorted(closed)
    assert set(opened) >= {s["session_id"] for s in before.values()} | {again["session_id"]}


def test_a_reload_reaches_every_worker(make_topology: Callable[..., Topology]) -> None:
    """A shorter TLS handshake deadline, reloaded, ends stalled connections in
    both workers (each logs it); before the reload they stay."""
    topo = make_topology(1)
    data = topo.workdir / "data"
    relay = topo.start_relay(data, server_keys=workers(2))
    conf = topo.workdir / "relay.toml"
    stalled_script = (
        "import socket, sys, time\n"
        "socks = []\n"
        "for _ in range(4):\n"
        "    socks.append(socket.create_connection((sys.argv[1], 443)))\n"
        "    time.sleep(0.5)\n"  # admitted before the next: each goes to the least busy
        "time.sleep(60)\n")
    before = topo.log("relay.log")
    holder = topo.spawn(topo.client_ns(1), [sys.executable, "-c", stalled_script, relay_ip(1)],
                        "stalled.log")
    wait_for(lambda: metric(topo, "relay_handshakes_in_progress") == 4, 20,
             "four stalled connections")
    assert [w["sessions"] for w in status(data)["workers"]] == [0, 0]
    conf.write_text(conf.read_text().replace("[server]\n", '[server]\nhandshake_timeout = "2s"\n'))
    relay.send_signal(signal.SIGHUP)
    wait_for(lambda: metric(topo, "relay_handshakes_in_progress") == 0, 20,
             "the stalled connections to be dropped")
    new = topo.log("relay.log")[len(before):]
    assert "config reloaded" in new
    for w in (0, 1):
        assert len(re.findall(rf"relay: worker {w}: WARNING: refused {client_ip(1)}:\d+: no TLS "
                              r"handshake within 2 s", new)) == 2, new
    holder.kill()


def test_metrics_are_summed_over_the_workers_and_sigterm_reaches_every_worker(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(2)
    data = topo.workdir / "data"
    topo.start_web()
    relay = topo.start_relay(data, server_keys=workers(2))
    clients = [topo.connect_openconnect(i, data, extra=["--no-dtls"]) for i in (1, 2)]
    for i in (1, 2):
        assert int(topo.curl(i, "/big.bin", "-o", "/dev/null", "-w", "%{size_download}")) \
            == 4 * 1024 * 1024
    live = {i: session_of(data, i) for i in (1, 2)}
    assert {s["worker"] for s in live.values()} == {0, 1}
    m = scrape(topo)
    # The sums hold both workers' traffic: each session moved 4 MiB out.
    out = m[("relay_bytes_total", (("direction", "out"),))]
    assert out >= sum(s["bytes_out"] for s in live.values()) > 8 * 1024 * 1024
    assert m[("relay_packets_total", (("direction", "in"),))] >= \
        sum(s["packets_in"] for s in live.values())
    for w in ("0", "1"):
        assert m[("relay_worker_up", (("worker", w),))] == 1
        assert m[("relay_worker_sessions", (("worker", w),))] == 1
        assert m[("relay_worker_restarts_total", (("worker", w),))] == 0
        assert m[("relay_worker_cpu_seconds_total", (("worker", w),))] > 0
        assert m[("relay_worker_resident_bytes", (("worker", w),))] > 1 << 20
    assert m[("relay_sessions_active", (("protocol", "SSL-VPN"),))] == 2

    # SIGTERM to the control plane: every worker ends its sessions (their records
    # say so) and exits, and the relay stops.
    pids = [w["pid"] for w in status(data)["workers"]]
    relay.send_signal(signal.SIGTERM)
    relay.wait(30)
    assert relay.returncode == 0
    gone = records(data, "disconnect")
    assert sorted(r["session_id"] for r in gone) == sorted(s["session_id"] for s in live.values())
    assert {r["reason"] for r in gone} == {"relay-shutdown"}
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    for client in clients:
        client.wait(30)
    assert "stopped" in topo.log("relay.log")
    with socket.socket() as probe:  # nothing listens any more
        assert probe.connect_ex(("127.0.0.1", 9)) != 0
