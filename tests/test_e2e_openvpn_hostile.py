"""End to end: hostile OpenVPN peers at a running ``relay serve``, with the stock
``openvpn`` 2.6 client beside them. Forged resets come from raw sockets (IP_HDRINCL):
nothing a peer that cannot receive at its address sends may ban it, take a handshake
slot, start a reverse lookup, draw a reply larger than what it sent, or end a live
session."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import records, scrape
from test_e2e_openvpn import OPENVPN_PORT, client_port, openvpn_version, start_openvpn

from relay.clientconfig import openvpn_config
from relay.config import AbuseConfig, Config
from relay.netns import INTERNET_IP, Topology, client_ip, relay_ip, run, wait_for
from relay.protocols.openvpn.keys import HAND_WINDOW_S
from relay.protocols.openvpn.reliable import TLS_TIMEOUT_S
from relay.protocols.openvpn.wire import Opcode
from relay.serve.openvpn_link import LIVE_ADDRESS_QUIET_S

pytestmark = pytest.mark.netns

HOSTILE = str(Path(__file__).with_name("openvpn_hostile.py"))
# Forged sources: a part of RFC 2544's block that no test namespace uses, routed
# from the relay back to client namespace 1, where the packet socket sees the replies.
FORGED = "198.18.128.0/17"
ONE_FORGED = "198.18.200.7:40000"
# Far more than the strikes that ban a source.
SAME_SOURCE_RESETS = 10 * AbuseConfig().strikes
# More than the handshake slots ([abuse] handshakes_total), one per source.
DISTINCT_SOURCES = AbuseConfig().handshakes_total + 128
# A retransmission of the relay's would come within this; the capture waits that
# long after the last packet before it reports.
QUIET_S = 2 * TLS_TIMEOUT_S + 1


def forge_resets(topo: Topology, src: str, count: int, sources: int = 1) -> dict[str, list]:
    out = run([sys.executable, HOSTILE, "resets", "--dst", f"{relay_ip(1)}:{OPENVPN_PORT}",
               "--src", src, "--count", str(count), "--sources", str(sources),
               "--quiet", str(QUIET_S)], topo.client_ns(1), timeout=300).stdout
    return json.loads(out)


def ptr_name(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


def assert_one_small_reply_each(result: dict[str, list], count: int) -> None:
    """Every forged reset crossed the wire (14 bytes, as the stock client's), and each
    drew exactly one reset in answer, no larger, and nothing more came."""
    requests, replies = result["requests"], result["replies"]
    assert len(requests) == count
    assert {(size, op) for *_, size, op in requests} == {
        (14, Opcode.CONTROL_HARD_RESET_CLIENT_V2)}
    assert Counter((ip, port) for ip, port, *_ in replies) == \
        Counter((ip, port) for ip, port, *_ in requests)
    assert {(size, op) for *_, size, op in replies} == {
        (14, Opcode.CONTROL_HARD_RESET_SERVER_V2)}


def test_forged_resets_get_one_small_answer_and_no_state_ban_or_lookup(
        make_topology: Callable[..., Topology]) -> None:
    openvpn_version()
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    # The relay's resolver asks a name server in the internet namespace that logs
    # every query: a reverse lookup of an address shows as its PTR name there.
    queries = topo.workdir / "dns-queries.txt"
    queries.touch()
    topo.spawn(topo.internet_ns, [sys.executable, HOSTILE, "dns-log", "--bind", INTERNET_IP,
                                  "--out", str(queries)], "dns-log.out")
    etc = Path("/etc/netns") / topo.relay_ns  # removed with the namespace
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text(f"nameserver {INTERNET_IP}\noptions timeout:1 attempts:1\n")
    run(["ip", "route", "add", FORGED, "via", client_ip(1)], topo.relay_ns)
    topo.start_relay(data)

    # (a) and (c): from one forged address, ten times the strikes that ban.
    assert_one_small_reply_each(forge_resets(topo, ONE_FORGED, SAME_SOURCE_RESETS),
                                SAME_SOURCE_RESETS)
    # (b) and (c): from more distinct forged addresses than there are handshake slots.
    many = forge_resets(topo, FORGED, DISTINCT_SOURCES, sources=DISTINCT_SOURCES)
    assert_one_small_reply_each(many, DISTINCT_SOURCES)
    forged_ips = {ip for ip, *_ in many["requests"]} | {ONE_FORGED.split(":")[0]}
    assert len(forged_ips) == DISTINCT_SOURCES + 1

    sent = SAME_SOURCE_RESETS + DISTINCT_SOURCES
    m = scrape(topo)
    assert m[("relay_openvpn_resets_answered_total", ())] == sent
    assert m[("relay_openvpn_proofs_total", ())] == 0
    assert m[("relay_openvpn_udp_peers", ())] == 0
    assert m[("relay_handshakes_in_progress", ())] == 0  # no slot taken
    assert not [k for k in m if k[0] == "relay_refusals_total"]
    assert m[("relay_bans_active", ())] == 0
    bans = run([sys.executable, "-m", "relay.cli", "ban", "list", "--json", "--data-dir",
                str(data)]).stdout
    assert bans.strip() == ""
    assert records(data, "ban") == [] and records(data, "connect") == []

    # The stock client connects at once, slots and rates untouched.
    start_openvpn(topo, data, "udp", "tun")
    assert "hello" in topo.curl(1, "/")
    m = scrape(topo)
    assert m[("relay_openvpn_proofs_total", ())] == 1
    assert not [k for k in m if k[0] == "relay_refusals_total"]

    # (d) The proven client's address is looked up; no forged one ever was.
    wait_for(lambda: ptr_name(client_ip(1)) in queries.read_text(), 20,
             "the reverse lookup of the stock client's address")
    looked_up = set(queries.read_text().split())
    assert not looked_up & {ptr_name(ip) for ip in forged_ips}
    assert "Traceback" not in topo.log("relay.log")


def test_a_forged_reset_from_a_live_clients_address_does_not_end_its_session(
        make_topology: Callable[..., Topology]) -> None:
    openvpn_version()
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    start_openvpn(topo, data, "udp", "tun")
    port = client_port(topo, "udp")
    assert "hello" in topo.curl(1, "/")

    # (e) Resets with new session ids "from" the client's own address and port.
    result = forge_resets(topo, f"{client_ip(1)}:{port}", 20)
    # The capture holds the client's own traffic too.
    assert len([r for r in result["requests"]
                if r[3] == Opcode.CONTROL_HARD_RESET_CLIENT_V2]) == 20
    # None is answered: the stock client would take a server reset for a new session.
    assert [r for r in result["replies"]
            if r[3] == Opcode.CONTROL_HARD_RESET_SERVER_V2] == []
    wait_for(lambda: "of another session id from a live session's address"
             in topo.log("relay.log"), 10, "the relay's log line for the forged resets")
    for _ in range(3):
        assert "hello" in topo.curl(1, "/")
    assert len(records(data, "connect")) == 1 and records(data, "disconnect") == []
    assert "Initial packet from" not in topo.log("openvpn-1.log").split(
        "Initialization Sequence Completed", 1)[1]


def start_on_port(topo: Topology, data: Path, port: int, log_name: str,
                  timeout: float = 30) -> subprocess.Popen[bytes]:
    """The stock UDP client bound to ``port`` (its port survives its restarts)."""
    conf = topo.workdir / "client-same-port.ovpn"
    conf.write_text(openvpn_config(Config().with_data_dir(data), data, "udp", "tun",
                                   remote=relay_ip(1)).replace("nobind\n", f"lport {port}\n"))
    proc = topo.spawn(topo.client_ns(1), ["openvpn", "--config", str(conf)], log_name)
    wait_for(lambda: "Initialization Sequence Completed" in topo.log(log_name)
             or proc.poll() is not None, timeout, "openvpn to connect")
    assert proc.poll() is None, topo.log(log_name)[-3000:]
    return proc


def test_a_client_restarted_on_its_port_replaces_its_session_when_the_handshake_completes(
        make_topology: Callable[..., Topology]) -> None:
    openvpn_version()
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    old = start_on_port(topo, data, 40123, "openvpn-old.log")
    assert client_port(topo, "udp") == 40123
    old.kill()  # gone without an exit notification: its session lives on, quiet
    old.wait()
    # The restarted client's resets go unanswered while the old session could still
    # be live; once it has been quiet for the ping-restart, the new handshake runs
    # beside it, and the old session ends when that handshake completes.
    start_on_port(topo, data, 40123, "openvpn-new.log",
                  timeout=LIVE_ADDRESS_QUIET_S + 2 * HAND_WINDOW_S)
    assert "hello" in topo.curl(1, "/")
    first, second = records(data, "connect")
    [ended] = records(data, "disconnect")
    assert ended["session_id"] == first["session_id"] and ended["reason"] == "client-restart"
    assert first["client"]["port"] == second["client"]["port"] == 40123
    assert "a new session from the same address replaces the old one" in topo.log("relay.log")

