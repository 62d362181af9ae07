"""Abuse defences end to end: floods from one namespace, an honest openconnect
session in another, bans through the CLI while the relay runs and across restarts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import records, scrape, wait_records

from relay.connlog import reader
from relay.netns import Topology, client_ip, relay_ip, run, wait_for
from relay.packetlog import segments

pytestmark = pytest.mark.netns

FLOOD = str(Path(__file__).with_name("flood_client.py"))


def relay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], capture_output=True,
                          text=True, timeout=30)


def test_connect_flood_is_banned_while_an_honest_session_keeps_working(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(2)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data, "", abuse_keys='summary_interval = "2s"\nstrikes = 20\n')
    honest = topo.connect_openconnect(2, data)
    [connect] = [r for r in reader.iter_records(data) if r["action"] == "connect"]

    flood = subprocess.Popen(
        ["ip", "netns", "exec", topo.client_ns(1), sys.executable, FLOOD, "cycles", "1000",
         relay_ip(1), "443"], stdout=subprocess.PIPE, text=True)
    # The honest session downloads while the flood runs.
    while flood.poll() is None:
        topo.curl(2, "/big.bin", "-o", "/dev/null")
    result = json.loads(flood.stdout.read())  # type: ignore[union-attr]
    assert result["completed"] + result["refused"] == 1000
    # Banned after the threshold: at most the burst got through.
    assert result["completed"] <= 25 and result["refused"] >= 975

    out = relay_cli("ban", "list", "--json", "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    [ban] = [json.loads(line) for line in out.stdout.splitlines()]
    assert ban["network"] == f"{client_ip(1)}/32" and "strikes" in ban["reason"]
    [ban_record] = records(data, "ban")
    assert ban_record["network"] == f"{client_ip(1)}/32"
    def banned_refusals() -> int:
        return sum(s["sources"].get(client_ip(1), {}).get("banned", 0)
                   for s in records(data, "refusals"))

    # Every refusal is counted in the per-interval summaries (2 s here) ...
    wait_for(lambda: banned_refusals() >= result["refused"] - 25, 10, "refusal summaries")
    # ... which are few: never one record per refused connection.
    assert len(records(data, "refusals")) < 20

    # The honest session never noticed.
    assert honest.poll() is None
    assert records(data, "disconnect") == []
    assert [r["session_id"] for r in records(data, "connect")] == [connect["session_id"]]
    topo.curl(2, "/")


PER_IP = 8
TOTAL = 48


def stall_flood(topo: Topology, count: int, sources: list[str]) -> subprocess.Popen[str]:
    """Connections that send half a ClientHello and hold, until stdin is closed."""
    for src in sources:
        run(["ip", "addr", "add", f"{src}/24", "dev", "eth0"], topo.client_ns(1))
    return subprocess.Popen(
        ["ip", "netns", "exec", topo.client_ns(1), sys.executable, FLOOD, "stall", str(count),
         relay_ip(1), "443", *sources], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_handshake_flood_stays_within_caps_and_an_honest_client_connects(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(2)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data, 'handshake_timeout = "60s"\nlogin_timeout = "60s"',
                     abuse_keys=f"handshakes_per_ip = {PER_IP}\nhandshakes_total = {TOTAL}\n"
                                "burst_per_ip = 1000\nrate_per_ip = 1000.0\n"
                                "burst_total = 2000\nrate_total = 1000.0\nstrikes = 10000\n")

    def in_progress() -> float:
        return scrape(topo)[("relay_handshakes_in_progress", ())]

    def refused(reason: str) -> float:
        return scrape(topo).get(("relay_refusals_total", (("reason", reason),)), 0)

    # 400 stalled handshakes from 4 sources: each source holds exactly its cap,
    # every other attempt is refused for it.
    first = stall_flood(topo, 400, [f"198.18.1.{i}" for i in range(10, 14)])
    wait_for(lambda: in_progress() + refused("handshakes-per-ip") == 400, 60,
             "the relay to take or refuse all 400 stalled handshakes")
    assert in_progress() == 4 * PER_IP
    assert refused("handshakes-per-ip") == 400 - 4 * PER_IP
    held = run(["ss", "-Htn", "state", "established", "sport", "= :443"], topo.relay_ns).stdout
    assert held.count("\n") == 4 * PER_IP
    # A free slot is left: an honest client connects meanwhile.
    topo.connect_openconnect(2, data)
    topo.curl(2, "/")

    # 100 more from 4 new sources fill the slots left, the overall cap.
    second = stall_flood(topo, 100, [f"198.18.1.{i}" for i in range(20, 24)])
    left = TOTAL - 4 * PER_IP
    wait_for(lambda: in_progress() + refused("handshakes-total") == TOTAL + 100 - left, 60,
             "the relay to take or refuse the second flood")
    assert in_progress() == TOTAL and refused("handshakes-total") == 100 - left
    assert refused("handshakes-per-ip") == 400 - 4 * PER_IP  # no source over its cap
    topo.curl(2, "/")

    for flood, count, alive in ((first, 400, 4 * PER_IP), (second, 100, left)):
        result = json.loads(flood.communicate("", timeout=60)[0])
        assert result["opened"] + result["refused"] == count
        assert result["alive_after_hold"] == alive


def test_bans_survive_a_restart_and_expire(make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    relay = topo.start_relay(data)
    # Long enough to outlive a restart (the eBPF compile takes seconds on a loaded
    # machine); its expiry is tested with a short ban on the running relay below.
    out = relay_cli("ban", "add", f"{client_ip(1)}/32", "--for", "10m", "--reason", "test",
                    "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    relay.terminate()
    relay.wait(15)
    topo.start_relay(data, name="relay-2")
    listed = relay_cli("ban", "list", "--data-dir", str(data)).stdout
    assert f"{client_ip(1)}/32" in listed
    refused = run([sys.executable, FLOOD, "cycles", "1", relay_ip(1), "443"], topo.client_ns(1))
    assert json.loads(refused.stdout)["refused"] == 1
    # A shorter ban never shortens a longer one on the same network.
    out = relay_cli("ban", "add", f"{client_ip(1)}/32", "--for", "2s", "--reason", "short",
                    "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    assert "a longer ban" in out.stderr and "it stays as it is" in out.stderr, out.stderr
    # Removed, then banned for 2 s: after its expiry the source is back in.
    out = relay_cli("ban", "remove", f"{client_ip(1)}/32", "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    out = relay_cli("ban", "add", f"{client_ip(1)}/32", "--for", "2s", "--reason", "short",
                    "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: f"{client_ip(1)}/32" not in relay_cli(
        "ban", "list", "--data-dir", str(data)).stdout, 20, "the ban to expire")
    topo.connect_openconnect(1, data)
    topo.curl(1, "/")
    assert [r["reason"] for r in records(data, "unban")] == ["removed by operator", "expired"]
    assert [(r["by"], r["duration_s"]) for r in records(data, "ban")] == [
        ("operator", 600), ("operator", 2)]


def test_dual_stack_listener_knows_ipv4_clients_by_their_ipv4_address(
        make_topology: Callable[..., Topology]) -> None:
    """On ``[::]:443`` an IPv4 client arrives as ::ffff:a.b.c.d: it is logged,
    searched, banned and cut off as a.b.c.d."""
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data, listen="[::]:443")
    client = topo.connect_openconnect(1, data)
    # The relay's socket really sees the mapped form.
    sockets = run(["ss", "-Htn", "state", "established", "sport", "= :443"],
                  topo.relay_ns).stdout
    assert f"[::ffff:{client_ip(1)}]:" in sockets
    [connect] = wait_records(data, "connect", 1)
    assert connect["client"]["ip"] == client_ip(1)
    assert connect["server"]["ip"] == relay_ip(1)
    topo.curl(1, "/")
    wait_for(lambda: any(True for _ in segments.iter_records(data)), 20, "packet records")
    assert {r["client_ip"] for r in segments.iter_records(data)} == {client_ip(1)}
    found = relay_cli("logs", "search", "--json", "--client-ip", f"::ffff:{client_ip(1)}",
                      "--data-dir", str(data))
    assert found.returncode == 0, found.stderr
    assert [json.loads(line)["session_id"] for line in found.stdout.splitlines()] == \
        [connect["session_id"]]

    # A ban on the plain IPv4 address ends the live session ...
    out = relay_cli("ban", "add", client_ip(1), "--for", "1h", "--reason", "dual-stack test",
                    "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    [disconnect] = wait_records(data, "disconnect", 1)
    assert disconnect["reason"] == "banned" and disconnect["client"]["ip"] == client_ip(1)
    # ... and refuses the next connection at accept.
    refused = run([sys.executable, FLOOD, "cycles", "1", relay_ip(1), "443"], topo.client_ns(1))
    assert json.loads(refused.stdout)["refused"] == 1
    client.terminate()
    client.wait(15)
    # Lifting it by the mapped spelling lifts the same ban.
    out = relay_cli("ban", "remove", f"::ffff:{client_ip(1)}", "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    assert f"removed the ban on {client_ip(1)}/32" in out.stdout
    accepted = run([sys.executable, FLOOD, "cycles", "1", relay_ip(1), "443"],
                   topo.client_ns(1))
    assert json.loads(accepted.stdout)["refused"] == 0
