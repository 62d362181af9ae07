"""End to end: the egress policy. From a stock openconnect client and a stock
openvpn client, the public test host answers while addresses in each blocked range
(placed in the test's own namespaces), the relay host and the other client do not;
the drop counters by reason move in /metrics; a reload changes the policy at once."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from conftest import scrape
from test_e2e_openvpn import interface, openvpn_version, start_openvpn

from relay.netns import INTERNET_IP, RELAY_UPLINK_IP, Topology, relay_ip, run, wait_for

pytestmark = pytest.mark.netns

PROBE = str(Path(__file__).with_name("egress_probe.py"))
# Every namespace of the test listens here (tests/egress_probe.py).
PROBE_PORT = 8000
DNS_PORT = 53
# A connect not answered within this is dropped: the namespaces' round trip is
# well under a millisecond, and the wait covers the SYN retransmission after 1 s.
PROBE_TIMEOUT_S = 3.0
# Addresses in each blocked range, on the internet namespace's eth0; the relay
# namespace routes them there, so without the policy clients would reach them.
BLOCKED = {
    "private": ("10.1.2.3", "172.16.5.6", "192.168.7.8"),
    "cgnat": ("100.64.1.2",),
    "link-local": ("169.254.169.254",),
    "reserved": ("0.1.2.3", "240.1.2.3"),
}
# A resolver on the volunteer's LAN, pushed as [tap] dns: its port 53 stays open.
LAN_DNS = "10.53.0.53"
GATEWAY = "10.211.0.1"  # the pool's first address, the relay's side of relay0
ALL_HOSTS = "224.0.0.1"  # every host's multicast group (RFC 1112), relay0's too


def place_blocked_hosts(topo: Topology, addresses: Iterable[str]) -> None:
    for ip in addresses:
        run(["ip", "addr", "add", f"{ip}/32", "dev", "eth0"], topo.internet_ns)
        run(["ip", "route", "add", f"{ip}/32", "via", INTERNET_IP], topo.relay_ns)


def listen(topo: Topology, ns: str, label: str, *ports: int) -> None:
    topo.spawn(ns, [sys.executable, PROBE, "listen", label, *map(str, ports)],
               f"listen-{label}.log")
    wait_for(lambda: "listening" in topo.log(f"listen-{label}.log"), 10, f"{label} to listen")


def probe(topo: Topology, ns: str, *targets: str) -> dict[str, str]:
    out = run([sys.executable, PROBE, "probe", str(PROBE_TIMEOUT_S), *targets], ns,
              timeout=PROBE_TIMEOUT_S + 30).stdout
    return json.loads(out)


def at(ip: str, port: int = PROBE_PORT) -> str:
    return f"{ip}:{port}"


def dropped(topo: Topology) -> dict[str, float]:
    return {dict(labels)["reason"]: value for (name, labels), value in scrape(topo).items()
            if name == "relay_egress_dropped_packets_total"}


def test_clients_reach_the_public_host_and_nothing_else(
        make_topology: Callable[..., Topology]) -> None:
    openvpn_version()
    topo = make_topology(2)
    data = topo.workdir / "data"
    blocked = [ip for ips in BLOCKED.values() for ip in ips]
    place_blocked_hosts(topo, [*blocked, LAN_DNS])
    listen(topo, topo.internet_ns, "inet", PROBE_PORT, DNS_PORT)
    listen(topo, topo.relay_ns, "relay", PROBE_PORT)
    for i in (1, 2):
        listen(topo, topo.client_ns(i), f"cli{i}", PROBE_PORT)
    forward_before = run(["sysctl", "-n", "net.ipv4.ip_forward"], topo.relay_ns).stdout
    relay = topo.start_relay(data, extra_tables=f'[tap]\ndns = ["{LAN_DNS}"]\n')
    topo.connect_openconnect(1, data)
    start_openvpn(topo, data, "udp", "tun", i=2)
    vips = {1: topo.tunnel_ip(1), 2: interface(topo, "tun", 2)[0]}

    def probes(me: int, other: int) -> dict[str, str]:
        return {at(INTERNET_IP): "inet", at(LAN_DNS, DNS_PORT): "inet", at(LAN_DNS): "inet",
                **{at(ip): "inet" for ip in blocked}, at(GATEWAY): "relay",
                at(RELAY_UPLINK_IP): "relay", at(relay_ip(other)): "relay",
                at(vips[other]): f"cli{other}"}

    for me, other in ((1, 2), (2, 1)):
        ns = topo.client_ns(me)
        # All through the tunnel (the client's default route).
        for target in probes(me, other):
            ip = target.rsplit(":", 1)[0]
            assert "dev tun0" in run(["ip", "route", "get", ip], ns).stdout, ip
        result = probe(topo, ns, *probes(me, other), f"udp:{ALL_HOSTS}:{PROBE_PORT}")
        assert result.pop(at(INTERNET_IP)) == "inet", "the public host answers"
        assert result.pop(at(LAN_DNS, DNS_PORT)) == "inet", "DNS to the pushed server"
        assert result.pop(f"udp:{ALL_HOSTS}:{PROBE_PORT}") == "sent"
        assert result == dict.fromkeys(result, "timeout"), f"client {me}: {result}"

    # Counted by reason (the relay reads the counters every few seconds).
    moved = ("private", "cgnat", "link-local", "reserved", "relay-host", "client-to-client",
             "multicast")
    wait_for(lambda: all(dropped(topo).get(r, 0) > 0 for r in moved), 20,
             "the drop counters to move")
    counts = dropped(topo)
    assert counts["deny"] == 0 and counts["loopback"] == 0
    assert "unreadable" not in topo.log("relay.log")

    # Reload, sessions up: allow every address blocked above, and the pool; deny the
    # public host, and one of the allowed addresses (deny wins). At once, each
    # address answers through the tunnel as it would without the policy (so the
    # test can fail), except the denied ones.
    denied = BLOCKED["private"][0]
    allow = [*blocked, LAN_DNS, GATEWAY, RELAY_UPLINK_IP, relay_ip(1), relay_ip(2),
             "10.211.0.0/16"]
    conf = topo.workdir / "relay.toml"
    conf.write_text(conf.read_text() + f"[egress]\nallow = {json.dumps(allow)}\n"
                    f'deny = ["{INTERNET_IP}/32", "{denied}"]\n')
    out = run([sys.executable, "-m", "relay.cli", "reload", "--config", str(conf)],
              topo.relay_ns)
    assert "config reloaded" in out.stdout and "need a restart" not in out.stdout
    for me, other in ((1, 2), (2, 1)):
        expected = {**probes(me, other), at(INTERNET_IP): "timeout", at(denied): "timeout"}
        result = probe(topo, topo.client_ns(me), *expected)
        assert result == expected, f"client {me}"
    wait_for(lambda: dropped(topo)["deny"] > 0, 20, "the deny counter to move")
    # Replacing the rules kept the counters.
    assert all(dropped(topo)[r] >= counts[r] for r in counts)

    # SIGTERM: the table goes, forwarding is back as it was.
    relay.send_signal(signal.SIGTERM)
    relay.wait(30)
    assert run(["nft", "list", "tables"], topo.relay_ns).stdout == ""
    assert run(["sysctl", "-n", "net.ipv4.ip_forward"], topo.relay_ns).stdout == forward_before


def test_the_policy_holds_without_nat(make_topology: Callable[..., Topology]) -> None:
    """No [server] uplink: the operator routes the pool (here: forwarding on and a
    route back from the internet namespace); the policy is in force all the same."""
    topo = make_topology(1)
    data = topo.workdir / "data"
    place_blocked_hosts(topo, BLOCKED["private"][:1])
    run(["sysctl", "-w", "net.ipv4.ip_forward=1"], topo.relay_ns)
    run(["ip", "route", "add", "10.211.0.0/16", "via", RELAY_UPLINK_IP], topo.internet_ns)
    listen(topo, topo.internet_ns, "inet", PROBE_PORT)
    listen(topo, topo.relay_ns, "relay", PROBE_PORT)
    topo.start_relay(data, nat=False)
    topo.connect_openconnect(1, data)
    result = probe(topo, topo.client_ns(1), at(INTERNET_IP), at(BLOCKED["private"][0]),
                   at(GATEWAY), at(RELAY_UPLINK_IP))
    assert result == {at(INTERNET_IP): "inet", at(BLOCKED["private"][0]): "timeout",
                      at(GATEWAY): "timeout", at(RELAY_UPLINK_IP): "timeout"}
    assert "masquerade" not in run(["nft", "list", "table", "inet", "relay0"],
                                   topo.relay_ns).stdout
    wait_for(lambda: dropped(topo)["private"] > 0 and dropped(topo)["relay-host"] > 0, 20,
             "the drop counters to move")
