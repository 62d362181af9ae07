"""End to end: the stock openconnect client through ``relay serve`` in namespaces."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Callable

import pytest
from conftest import REAP_TIMEOUT_S, records, wait_records

from relay.netns import RELAY_UPLINK_IP, Topology, client_ip, relay_ip, run, wait_for

pytestmark = pytest.mark.netns

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def openconnect_version() -> str:
    out = subprocess.run(["openconnect", "--version"], capture_output=True, text=True).stdout
    return re.search(r"version (v\S+)", out).group(1)  # type: ignore[union-attr]


def client_tcp_port(topo: Topology, i: int) -> int:
    """The source port of openconnect's TLS connection, as the client sees it."""
    out = run(["ss", "-Htn", "state", "established", "dst", f"{relay_ip(i)}:443"],
              topo.client_ns(i)).stdout.split()
    return int(out[2].rsplit(":", 1)[1])


def test_page_through_the_tunnel_and_both_records(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    client = topo.connect_openconnect(1, data)
    port = client_tcp_port(topo, 1)
    vip = topo.tunnel_ip(1)

    assert "hello from the internet namespace" in topo.curl(1, "/", "-A", "e2e-test/1.0")
    big = topo.curl(1, "/big.bin", "-o", "/dev/null", "-w", "%{size_download}")
    assert int(big) == 4 * 1024 * 1024
    # The web server saw the relay's NAT address, not the client's (and the
    # User-Agent stamped with the session's tag).
    topo.access_log(f'{RELAY_UPLINK_IP} "GET / HTTP/1.1" 200 "e2e-')

    client.send_signal(signal.SIGINT)
    client.wait(15)
    [connect] = wait_records(data, "connect", 1)
    [disconnect] = wait_records(data, "disconnect", 1)

    for rec in (connect, disconnect):
        assert RFC3339_MS.match(rec["time"])
        assert rec["session_id"] == connect["session_id"]
        assert len(rec["session_id"]) >= 22 and re.fullmatch(r"[A-Za-z0-9_-]+", rec["session_id"])
        assert rec["server"]["id"] == "relay-1" and rec["server"]["ip"] == relay_ip(1)
        assert rec["server"]["hostname"]
        assert rec["client"]["ip"] == client_ip(1) and rec["client"]["port"] == port
        assert "hostname" in rec["client"]
        assert rec["protocol"] == "SSL-VPN"
        assert rec["client_software"]["name"] == "Open AnyConnect VPN Agent"
        assert rec["client_software"]["version"] == openconnect_version()
        assert rec["virtual_ip"] == vip
    assert disconnect["packets"]["in"] > 100 and disconnect["packets"]["out"] > 2000
    assert disconnect["bytes"]["out"] > 4 * 1024 * 1024 > disconnect["bytes"]["in"] > 0
    assert disconnect["duration_s"] > 0
    assert disconnect["reason"].startswith("client-disconnect")
    assert disconnect["error"] is None

    # The log is private, and the CLI prints exactly what is stored.
    log_dir = data / "connlog"
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700
    for f in log_dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    out = subprocess.run([sys.executable, "-m", "relay.cli", "logs", "connections", "--json",
                          "--data-dir", str(data)], capture_output=True, text=True, check=True)
    assert [json.loads(line) for line in out.stdout.splitlines()] == [connect, disconnect]
    text = subprocess.run([sys.executable, "-m", "relay.cli", "logs", "connections",
                           "--data-dir", str(data)], capture_output=True, text=True, check=True)
    assert connect["session_id"] in text.stdout and "client-disconnect" in text.stdout


def test_five_clients_at_once(make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(5)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    clients = [topo.connect_openconnect(i, data, wait=False) for i in range(1, 6)]
    for i in range(1, 6):
        wait_for(lambda i=i: topo.tunnel_up(i), 30, f"client {i}")
    vips = {i: topo.tunnel_ip(i) for i in range(1, 6)}
    assert len(set(vips.values())) == 5
    ports = {i: client_tcp_port(topo, i) for i in range(1, 6)}
    for i in range(1, 6):
        topo.curl(i, "/", "-A", f"client-{i}-agent/1.0")
    topo.access_log(*(f'"client-{i}-a' for i in range(1, 6)))
    for c in clients:
        c.send_signal(signal.SIGINT)
    for c in clients:
        c.wait(15)
    connects = wait_records(data, "connect", 5)
    disconnects = wait_records(data, "disconnect", 5)
    assert len({r["session_id"] for r in connects}) == 5
    assert len({r["session_id"][:8] for r in connects}) == 5
    by_ip = {r["client"]["ip"]: r for r in disconnects}
    for i in range(1, 6):
        rec = by_ip[client_ip(i)]
        assert rec["client"]["port"] == ports[i]
        assert rec["virtual_ip"] == vips[i]
        assert rec["packets"]["in"] > 0 and rec["packets"]["out"] > 0
        assert rec["bytes"]["in"] > 0 and rec["bytes"]["out"] > 0
    assert {r["session_id"] for r in disconnects} == {r["session_id"] for r in connects}


def test_client_killed_with_sigkill_gets_its_disconnect_record(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    client = topo.connect_openconnect(1, data)
    topo.curl(1, "/")
    os.killpg(client.pid, signal.SIGKILL)
    client.wait(REAP_TIMEOUT_S)
    [rec] = wait_records(data, "disconnect", 1, timeout=15)
    assert rec["reason"] in ("connection-closed", "connection-lost")
    assert rec["packets"]["in"] > 0


def test_relay_killed_and_restarted_closes_the_sessions_it_left_open(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(2)
    data = topo.workdir / "data"
    topo.start_web()
    relay = topo.start_relay(data)
    c1 = topo.connect_openconnect(1, data)
    c2 = topo.connect_openconnect(2, data)
    topo.curl(1, "/")
    topo.curl(2, "/")
    connects = wait_records(data, "connect", 2)
    os.killpg(relay.pid, signal.SIGKILL)
    relay.wait(REAP_TIMEOUT_S)
    assert records(data, "disconnect") == []

    topo.start_relay(data, name="relay-2")
    disconnects = wait_records(data, "disconnect", 2)
    assert {r["session_id"] for r in disconnects} == {r["session_id"] for r in connects}
    for rec in disconnects:
        assert rec["reason"] == "relay-restart"
        assert "killed or crashed" in rec["error"]
    # The clients' reconnects with their old cookie are refused (401), so they
    # end instead of looping; a new client is served by the new relay.
    for c in (c1, c2):
        c.wait(60)
    topo.connect_openconnect(1, data, name="openconnect-again.log")
    topo.curl(1, "/")
    assert len(wait_records(data, "connect", 3)) == 3


def test_silent_client_is_ended_as_a_dead_peer(make_topology: Callable[..., Topology]) -> None:
    """A client that stops sending anything (stopped, its TCP connection still
    acknowledged by its kernel) is ended after three DPD intervals of silence."""
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data, server_keys='dpd = "2s"\nkeepalive = "2s"\n')
    client = topo.connect_openconnect(1, data)
    topo.curl(1, "/")
    os.killpg(client.pid, signal.SIGSTOP)
    try:
        [rec] = wait_records(data, "disconnect", 1, timeout=30)
    finally:
        os.killpg(client.pid, signal.SIGKILL)
        client.wait(REAP_TIMEOUT_S)
    assert rec["reason"] == "dead-peer"
    silence = re.fullmatch(r"no data or DPD from the client for (\d+) s", rec["error"])
    assert silence is not None and 6 <= int(silence.group(1)) < 10
    assert rec["duration_s"] >= 6
