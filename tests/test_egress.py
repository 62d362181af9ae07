"""The egress policy's nftables table: the rules for default, allow and deny
configs, the kernel accepting them (``nft -c``), the table's life in a private
network namespace, and the counters read back for the metrics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from relay import config
from relay.metrics import render
from relay.serve import nat
from relay.serve.egress import BLOCKED, REASONS, Policy, describe

POOL = "10.211.0.0/16"
ADJUSTED = {"tap": {"dns": ["10.211.0.1", "2001:db8::53"]},
            "egress": {"allow": ["192.168.1.0/24", "fd00:1::/64"],
                       "deny": ["203.0.113.0/24", "2001:db8:1::/48"]}}


def policy(data: dict | None = None) -> Policy:
    return Policy.from_config(config.from_dict(data or {}))


def chain(script: str, name: str) -> list[str]:
    """The rules of one chain of a rendered table."""
    lines = script.splitlines()
    start = lines.index(f"  chain {name} {{")
    end = lines.index("  }", start)
    return [line.strip() for line in lines[start + 1:end]]


def require_nft() -> None:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.fail("needs root and nft (apt-get install nftables; ./run.sh setup)")


def test_default_policy_drops_every_range_under_its_reason() -> None:
    script = nat.install_script(policy(), "")
    for reason in REASONS:
        assert f"counter {reason} {{ }}" in script
    forward, local = chain(script, "egress_forward"), chain(script, "egress_input")
    expected = [
        f'ip daddr {POOL} counter name "client-to-client" drop',
        'ip daddr { 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 } counter name "private" drop',
        'ip6 daddr { fc00::/7 } counter name "private" drop',
        'ip daddr { 100.64.0.0/10 } counter name "cgnat" drop',
        'ip daddr { 169.254.0.0/16 } counter name "link-local" drop',
        'ip6 daddr { fe80::/10 } counter name "link-local" drop',
        'ip daddr { 127.0.0.0/8 } counter name "loopback" drop',
        'ip6 daddr { ::1/128 } counter name "loopback" drop',
        'ip daddr { 224.0.0.0/4 } counter name "multicast" drop',
        'ip6 daddr { ff00::/8 } counter name "multicast" drop',
        'ip daddr { 0.0.0.0/8, 240.0.0.0/4 } counter name "reserved" drop',
        'ip6 daddr { ::/128, ::ffff:0:0/96 } counter name "reserved" drop',
    ]
    # No exemptions without DNS servers or allow/deny lists.
    assert forward == expected
    # Towards the host: its own addresses first, and whatever is left dropped too.
    assert local == ['fib daddr type local counter name "relay-host" drop', *expected,
                     'counter name "relay-host" drop']
    assert chain(script, "forward")[-1] == 'iifname "relay0" jump egress_forward'
    assert chain(script, "input")[-1] == 'iifname "relay0" jump egress_input'
    assert "masquerade" not in script and " log" not in script
    assert script.startswith("add table ip relay\ndelete table ip relay\n"
                             "add table inet relay\ndelete table inet relay\n"
                             "add table inet relay0\ndelete table inet relay0\n")


def test_deny_then_dns_then_allow_before_the_default_block() -> None:
    script = nat.install_script(policy(ADJUSTED), "")
    exemptions = [
        'ip daddr { 203.0.113.0/24 } counter name "deny" drop',
        'ip6 daddr { 2001:db8:1::/48 } counter name "deny" drop',
        "meta l4proto { tcp, udp } th dport 53 ip daddr { 10.211.0.1/32 } accept",
        "meta l4proto { tcp, udp } th dport 53 ip6 daddr { 2001:db8::53/128 } accept",
        "ip daddr { 192.168.1.0/24 } accept",
        "ip6 daddr { fd00:1::/64 } accept",
    ]
    forward, local = chain(script, "egress_forward"), chain(script, "egress_input")
    assert forward[:6] == exemptions and local[:6] == exemptions
    assert forward[6] == f'ip daddr {POOL} counter name "client-to-client" drop'
    assert local[6] == 'fib daddr type local counter name "relay-host" drop'
    assert chain(nat.install_script(policy(), ""), "egress_forward") == forward[6:]


def test_the_uplink_adds_the_masquerade_to_the_same_table() -> None:
    script = nat.install_script(policy(), "eth0")
    assert chain(script, "postrouting") == [
        "type nat hook postrouting priority srcnat; policy accept;",
        f'ip saddr {POOL} oifname "eth0" masquerade']
    assert script.count("table inet relay0 {") == 1


@pytest.mark.parametrize(("data", "uplink"), [(None, ""), (ADJUSTED, ""), (ADJUSTED, "eth0"),
                                              ({"egress": {"allow": ["0.0.0.0/0", "::/0"]}},
                                               "")])
def test_the_kernel_accepts_the_table(data: dict | None, uplink: str) -> None:
    require_nft()
    nat.check(policy(data), uplink)  # nft -c: validated by the kernel, nothing installed


LIFECYCLE = r"""
import json
from relay import config
from relay.serve import nat
from relay.serve.egress import Policy

def forwarding():
    return open(nat.FORWARD_SYSCTL).read().strip()

def tables():
    return nat._nft(["list", "tables"]).split()

out = {"forward_before": forwarding()}
default = Policy.from_config(config.Config())
nat._nft(["-f", "-"], nat.install_script(default, "up0"))  # a killed relay's leftover ...
table = nat.RelayTable(default, "up0")
table.install()  # ... replaced
out["forward_on"] = forwarding()
out["counters"] = table.read_counters()
deny = Policy.from_config(config.from_dict({"egress": {"deny": ["198.51.100.0/24"]}}))
table.replace(deny)
out["replaced"] = nat._nft(["list", "table", "inet", "relay0"])
out["counters_after"] = table.read_counters()
# Another relay on the host, with a TAP device of its own, has a table of its own.
other = nat.RelayTable(Policy.from_config(config.from_dict({"tap": {"name": "relay9"}})), "")
other.install()
table.remove()
out["forward_after"] = forwarding()
out["tables_left_by_one"] = tables()
other.remove()
out["tables_after"] = tables()
print(json.dumps(out))
"""


@pytest.mark.netns
def test_install_replace_remove_in_a_private_network_namespace() -> None:
    require_nft()
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", LIFECYCLE],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["forward_before"] == "0" and out["forward_on"] == "1"
    assert out["counters"] == dict.fromkeys(REASONS, 0)
    assert 'ip daddr 198.51.100.0/24 counter name "deny" drop' in out["replaced"]
    assert "masquerade" in out["replaced"]  # the uplink is kept on replace
    assert out["counters_after"] == dict.fromkeys(REASONS, 0)
    assert out["tables_left_by_one"] == ["table", "inet", "relay9"]
    assert out["forward_after"] == "0" and out["tables_after"] == []


NFT_JSON = json.dumps({"nftables": [
    {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
    {"counter": {"family": "inet", "name": "private", "table": "relay", "handle": 5,
                 "packets": 12, "bytes": 720}},
    {"counter": {"family": "inet", "name": "relay-host", "table": "relay", "handle": 6,
                 "packets": 3, "bytes": 180}}]})


def test_counters_are_parsed_and_every_reason_is_exported() -> None:
    assert nat.parse_counters(NFT_JSON) == {"private": 12, "relay-host": 3}
    table = nat.RelayTable(policy(), "")
    text = render(table.metrics())  # before the first read: zeros, every reason
    for reason in REASONS:
        assert f'relay_egress_dropped_packets_total{{reason="{reason}"}} 0.0' in text


def test_describe_names_each_step() -> None:
    text = "\n".join(describe(policy(ADJUSTED)))
    assert "deny (always dropped): 203.0.113.0/24 2001:db8:1::/48" in text
    assert "DNS (udp/tcp 53) to the pushed servers: 10.211.0.1/32 2001:db8::53/128" in text
    assert "allow (exempt from the blocks below): 192.168.1.0/24 fd00:1::/64" in text
    for reason, nets in BLOCKED.items():
        assert f"drop {reason}: {' '.join(nets)}" in text
    assert "allow (exempt from the blocks below): none" in "\n".join(describe(policy()))
