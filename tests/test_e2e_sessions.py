"""End to end: relay sessions and relay status, as occtl show users / occtl
disconnect are for ocserv, with two stock openconnect clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from conftest import records, scrape, wait_records
from test_e2e_cstp import client_tcp_port

from relay.netns import Topology, client_ip, run, wait_for

pytestmark = pytest.mark.netns

# How far the free disk space may move between the status and the scrape read on a
# machine where other tests write too (a few hundred MB of logs and captures).
FREE_DISK_DRIFT_BYTES = 1 << 30


def relay_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], capture_output=True,
                          text=True, timeout=60, check=check)


def test_sessions_list_show_disconnect_and_status(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(2)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    clients = [topo.connect_openconnect(i, data) for i in (1, 2)]
    ports = {i: client_tcp_port(topo, i) for i in (1, 2)}
    vips = {i: topo.tunnel_ip(i) for i in (1, 2)}
    d = ["--data-dir", str(data)]

    # relay sessions --json: both, with the addresses the clients have.
    listed = [json.loads(line) for line in relay_cli("sessions", "--json", *d)
              .stdout.splitlines()]
    by_client = {(s["client_ip"], s["client_port"]): s for s in listed}
    assert set(by_client) == {(client_ip(i), ports[i]) for i in (1, 2)}
    for i in (1, 2):
        s = by_client[(client_ip(i), ports[i])]
        assert s["virtual_ip"] == vips[i] and s["protocol"] == "SSL-VPN"
        assert s["disconnect"] is None and s["connect_utc"].endswith("Z")
    def live(i: int) -> dict:
        return next(s for s in map(json.loads, relay_cli("sessions", "--json", *d)
                                   .stdout.splitlines()) if s["client_ip"] == client_ip(i))

    topo.curl(1, "/", "-A", "sessions-test/1.0")
    wait_for(lambda: live(1)["destinations"], 10, "the first destination in the list")
    first = live(1)
    assert first["bytes_in"] > 0 and first["bytes_out"] > 0
    table = relay_cli("sessions", *d).stdout
    assert f"{client_ip(1)}:{ports[1]}" in table and vips[1] in table

    # relay sessions show: one, by its tag.
    shown = json.loads(relay_cli("sessions", "show", first["session_id"][:8], "--json", *d)
                       .stdout)
    assert shown["session_id"] == first["session_id"] and shown["destinations"]

    # relay status --json agrees with the metrics.
    status = json.loads(relay_cli("status", "--json", *d).stdout)
    metrics = scrape(topo)
    assert status["running"] and status["sessions"]["active"] == 2 == \
        metrics[("relay_sessions_active", (("protocol", "SSL-VPN"),))]
    # One worker per CPU, each its own process; every session on one of them.
    assert len(status["workers"]) == len(os.sched_getaffinity(0))
    assert all(w["up"] and w["pid"] not in (None, status["pid"]) and w["restarts"] == 0
               for w in status["workers"])
    assert sum(w["sessions"] for w in status["workers"]) == 2
    assert {s["worker"] for s in listed} <= {w["worker"] for w in status["workers"]}
    assert status["capture"]["attached"] is (metrics[("relay_capture_attached", ())] == 1)
    assert status["capture"]["attached"]
    assert 0 <= status["capture"]["ring_fill_ratio"] < 1
    assert status["bans"] == metrics[("relay_bans_active", ())] == 0
    assert status["packet_log"]["files"] == metrics[("relay_packetlog_segments", ())]
    # Other writers on the same disk move the free space between the two reads.
    assert abs(status["free_disk_bytes"] - metrics[("relay_data_dir_free_bytes", ())]) \
        < FREE_DISK_DRIFT_BYTES
    assert "running (pid" in relay_cli("status", *d).stdout

    # relay sessions disconnect: the first ends (its client sees it, the record names
    # the operator), the second keeps fetching.
    out = relay_cli("sessions", "disconnect", first["session_id"], "--reason", "abuse report",
                    *d).stdout
    assert out == f"disconnected {first['session_id']}\n"
    clients[0].wait(15)
    assert "disconnected by the relay's operator: abuse report" in \
        topo.log("openconnect-1.log")
    [disconnect] = wait_records(data, "disconnect", 1)
    assert disconnect["session_id"] == first["session_id"]
    assert disconnect["reason"] == "operator-disconnect: abuse report"
    assert clients[1].poll() is None
    for _ in range(3):
        assert "hello from the internet namespace" in topo.curl(2, "/")
    remaining = [json.loads(line) for line in relay_cli("sessions", "--json", *d)
                 .stdout.splitlines()]
    assert [s["client_ip"] for s in remaining] == [client_ip(2)]

    # By address: every session of the client; then nothing is left to end.
    assert relay_cli("sessions", "disconnect", "--client-ip", client_ip(2), *d).returncode == 0
    clients[1].wait(15)
    wait_records(data, "disconnect", 2)
    assert [r["reason"] for r in records(data, "disconnect")] == [
        "operator-disconnect: abuse report", "operator-disconnect"]
    gone = relay_cli("sessions", "disconnect", "--client-ip", client_ip(2), *d, check=False)
    assert gone.returncode == 1 and gone.stderr == "relay: no open session matched\n"
    assert relay_cli("sessions", *d, check=False).returncode == 1
    assert run(["ip", "-o", "link", "show", "tun0"], topo.client_ns(1), check=False) \
        .returncode != 0
