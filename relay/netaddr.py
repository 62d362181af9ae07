"""Address identity: the one spelling of a client's address, and the key that
abuse limits and bans hold a source to.

A dual-stack listener (``[::]:443``) sees IPv4 clients as ``::ffff:a.b.c.d``;
the same client over an IPv4 listener is ``a.b.c.d``. Records, searches, limits
and bans must not tell the two apart, or a ban on the IPv4 address would not
hold the mapped one, and a search for one would miss sessions logged as the
other. And one IPv6 subscriber holds a whole prefix (a /64 at least, RFC 6177),
so a limit keyed by the full IPv6 address is sidestepped by changing address.

Links keep the raw address the socket gave them (a reply on an AF_INET6 socket
must go to the mapped form); everything else goes through here.
"""

from __future__ import annotations

import ipaddress

from relay.errors import RelayError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# IPv4-compatible addresses (``::a.b.c.d``, RFC 4291 2.5.5.1, deprecated) share
# ::/96 with the unspecified address ``::`` and loopback ``::1``, which stay IPv6.
_COMPAT_RESERVED = 1
_LOW32 = 0xFFFFFFFF


class AddressError(RelayError, ValueError):
    """Not an IP address (or network): the message names the text."""


def _ipv4_of(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that a mapped or compatible IPv6 address spells, else None."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    value = int(addr)
    if value >> 32 == 0 and value > _COMPAT_RESERVED:
        return ipaddress.IPv4Address(value & _LOW32)
    return None


def canonical_address(ip: str | Address) -> Address:
    """The address a client is known by: IPv4-mapped (``::ffff:a.b.c.d``) and
    IPv4-compatible (``::a.b.c.d``) forms are the IPv4 address; an IPv6 zone id
    (``fe80::1%eth0``) is dropped, as it names the relay's interface, not the
    client. AddressError when ``ip`` is not an address."""
    if isinstance(ip, str):
        try:
            ip = ipaddress.ip_address(ip)
        except ValueError:
            raise AddressError(f"not an IP address: {ip!r}") from None
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    v4 = _ipv4_of(ip)
    if v4 is not None:
        return v4
    return ipaddress.IPv6Address(int(ip)) if ip.scope_id else ip


def canonical_ip(ip: str | Address) -> str:
    """:func:`canonical_address` as text: dotted IPv4, or compressed lower-case
    IPv6 (RFC 5952)."""
    return str(canonical_address(ip))


def canonical_network(text: str) -> Network:
    """An IP address or CIDR as the network that bans and searches compare:
    host bits cleared, zone id dropped, and a network inside the IPv4-mapped (or
    compatible) range as its IPv4 network (``::ffff:198.51.100.0/120`` is
    ``198.51.100.0/24``). AddressError when it is neither."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise AddressError(f"not an IP address or CIDR: {text!r}") from None
    if isinstance(net, ipaddress.IPv4Network):
        return net
    first = canonical_address(net.network_address)
    if isinstance(first, ipaddress.IPv4Address) and net.prefixlen >= 128 - 32:
        return ipaddress.IPv4Network((first, net.prefixlen - (128 - 32)))
    return ipaddress.IPv6Network((int(first), net.prefixlen))


def abuse_key(ip: str | Address, ipv6_prefix: int) -> str:
    """The source that limits, strikes and bans count against: an IPv4 client is
    its address, an IPv6 client the ``ipv6_prefix`` network that covers it
    (``2001:db8:1:2::/64``; ``[abuse] ipv6_prefix``)."""
    addr = canonical_address(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        return str(addr)
    return str(ipaddress.IPv6Network((addr, ipv6_prefix), strict=False))


def hostport(ip: object, port: object) -> str:
    """An address and port as every command prints them: ``a.b.c.d:port``, and
    ``[v6]:port`` for IPv6 (RFC 3986 section 3.2.2), so the port never reads as
    part of the address."""
    text = str(ip)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"
