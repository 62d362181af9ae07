"""Address identity: one spelling per client, one key per abuse source."""

from __future__ import annotations

import pytest

from relay.errors import RelayError
from relay.netaddr import abuse_key, canonical_ip, canonical_network


@pytest.mark.parametrize(("raw", "canonical"), [
    ("198.51.100.7", "198.51.100.7"),
    ("::ffff:198.51.100.7", "198.51.100.7"),  # a dual-stack listener's IPv4 client
    ("::FFFF:c633:6407", "198.51.100.7"),
    ("::198.51.100.7", "198.51.100.7"),  # IPv4-compatible (deprecated)
    ("::1", "::1"),  # loopback and unspecified share ::/96 but stay IPv6
    ("::", "::"),
    ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1"),  # the zone names the relay's interface
    ("64:ff9b::c633:6407", "64:ff9b::c633:6407"),  # NAT64 is a real IPv6 address
])
def test_canonical_ip(raw: str, canonical: str) -> None:
    assert canonical_ip(raw) == canonical


@pytest.mark.parametrize(("raw", "canonical"), [
    ("198.51.100.7", "198.51.100.7/32"),
    ("203.0.113.77/24", "203.0.113.0/24"),
    ("::ffff:198.51.100.7", "198.51.100.7/32"),
    ("::ffff:198.51.100.0/120", "198.51.100.0/24"),
    ("2001:db8:1:2::5/64", "2001:db8:1:2::/64"),
    ("fe80::%eth0/64", "fe80::/64"),
    ("::/0", "::/0"),
])
def test_canonical_network(raw: str, canonical: str) -> None:
    assert str(canonical_network(raw)) == canonical


def test_abuse_key() -> None:
    assert abuse_key("198.51.100.7", 64) == "198.51.100.7"
    assert abuse_key("::ffff:198.51.100.7", 64) == "198.51.100.7"
    assert abuse_key("2001:db8:1:2:aaaa::1", 64) == "2001:db8:1:2::/64"
    assert abuse_key("2001:db8:1:2:aaaa::1", 48) == "2001:db8:1::/48"
    assert abuse_key("2001:db8::1", 128) == "2001:db8::1/128"


@pytest.mark.parametrize("bad", ["", "999.1.1.1", "example.org", "2001:db8::/64x"])
def test_bad_addresses_are_relay_errors(bad: str) -> None:
    with pytest.raises(RelayError, match="not an IP address"):
        canonical_network(bad)
    with pytest.raises(RelayError, match="not an IP address"):
        canonical_ip(bad)
