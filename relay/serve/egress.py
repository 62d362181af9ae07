"""The egress policy: clients reach the public internet and nothing else.

Every packet a client sends enters the kernel through the TAP device. The relay's
own nftables table (relay.serve.nat) checks it at the forward hook (towards other hosts)
and at the input hook (towards this host), and the first rule that matches decides:

1. ``[egress] deny``: dropped (reason ``deny``). Deny always wins.
2. DNS, UDP or TCP port 53, to a ``[tap] dns`` server the relay pushes: accepted.
3. ``[egress] allow``: accepted; an allowed destination is exempt from every
   default block below, this host's addresses and the pool included.
4. The default block, each counted under its reason: ``relay-host`` (any address
   of this host, the pool's gateway included: ``fib daddr type local``, so
   addresses added later are covered too; input hook only, where such packets
   go), ``client-to-client`` (the pool), then the ranges of :data:`BLOCKED`.
5. Anything else for this host (a broadcast, say) is dropped as ``relay-host``;
   anything else forwarded is the public internet and goes on.

An accept here only lifts this table's block: nftables lets a packet through a
hook only if every base chain on it accepts, so the operator's own rules still apply.

Drops are counted per reason in named nftables counters, never logged per packet.
There is no connection-tracking exception (``ct state established``): the host's
own connections to clients get no answers either, and a relay without NAT does not
pay conntrack on every forwarded packet.
The precedent is VPN Gate: its relays ship the same block list (private ranges,
link-local, multicast, CGNAT) with DNS allowed. Nothing here runs anything: this
module renders rules; relay.serve.nat puts them into the kernel.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from relay.config import Config

# The default block, by reason (the metric label and the nftables counter's name).
# Sources: the IANA special-purpose address registries (RFC 6890) and the RFCs named.
PRIVATE = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
           "fc00::/7")  # RFC 4193 unique local addresses
CGNAT = ("100.64.0.0/10",)  # RFC 6598 shared address space (carrier-grade NAT)
LINK_LOCAL = ("169.254.0.0/16",  # RFC 3927; cloud metadata lives at 169.254.169.254
              "fe80::/10")  # RFC 4291 2.5.6
LOOPBACK = ("127.0.0.0/8",  # RFC 1122 3.2.1.3
            "::1/128")  # RFC 4291 2.5.3
MULTICAST = ("224.0.0.0/4",  # RFC 5771
             "ff00::/8")  # RFC 4291 2.7
RESERVED = ("0.0.0.0/8",  # RFC 1122 3.2.1.3: "this network"
            "240.0.0.0/4",  # RFC 1112 4: class E, and 255.255.255.255 (RFC 919)
            "::/128",  # RFC 4291 2.5.2: the unspecified address
            "::ffff:0:0/96")  # RFC 4291 2.5.5.2: IPv4-mapped, never valid on the wire
BLOCKED: dict[str, tuple[str, ...]] = {
    "private": PRIVATE,
    "cgnat": CGNAT,
    "link-local": LINK_LOCAL,
    "loopback": LOOPBACK,
    "multicast": MULTICAST,
    "reserved": RESERVED,
}
# Every drop reason, in the order the rules test them.
REASONS = ("deny", "relay-host", "client-to-client", *BLOCKED)
# DNS over UDP and TCP (RFC 1035 4.2, RFC 7766).
DNS_PORT = 53


@dataclass(frozen=True)
class Policy:
    """What the rules need: the TAP device clients' packets enter by, the pool, the
    pushed DNS servers and the operator's lists (networks in canonical form)."""

    tap: str
    pool: str
    dns: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Config) -> Policy:
        def nets(texts: list[str]) -> tuple[str, ...]:
            return tuple(str(ipaddress.ip_network(t)) for t in texts)

        return cls(tap=cfg.tap.name, pool=str(cfg.pool), dns=nets(cfg.tap.dns),
                   allow=nets(cfg.egress.allow), deny=nets(cfg.egress.deny))


def _by_family(nets: tuple[str, ...]) -> list[tuple[str, str]]:
    """``[("ip", "{ v4, ... }"), ("ip6", "{ v6, ... }")]``, leaving out an empty family."""
    out = []
    for family, version in (("ip", 4), ("ip6", 6)):
        mine = [n for n in nets if ipaddress.ip_network(n).version == version]
        if mine:
            out.append((family, "{ " + ", ".join(mine) + " }"))
    return out


def _drop(reason: str) -> str:
    return f'counter name "{reason}" drop'


def exempt_rules(p: Policy) -> list[str]:
    """Steps 1-3: deny, the DNS exception, allow."""
    rules = [f"{family} daddr {nets} {_drop('deny')}" for family, nets in _by_family(p.deny)]
    rules += [f"meta l4proto {{ tcp, udp }} th dport {DNS_PORT} {family} daddr {nets} accept"
              for family, nets in _by_family(p.dns)]
    rules += [f"{family} daddr {nets} accept" for family, nets in _by_family(p.allow)]
    return rules


def block_rules(p: Policy) -> list[str]:
    """Step 4 after relay-host: the pool, then the ranges."""
    rules = [f"ip daddr {p.pool} {_drop('client-to-client')}"]
    for reason, nets in BLOCKED.items():
        rules += [f"{family} daddr {s} {_drop(reason)}" for family, s in _by_family(nets)]
    return rules


def table_body(p: Policy) -> list[str]:
    """The counters and chains of the policy, as lines inside the relay's table
    (relay.serve.nat)."""
    lines = [f"counter {reason} {{ }}" for reason in REASONS]
    forward = [*exempt_rules(p), *block_rules(p)]
    local = [*exempt_rules(p), f"fib daddr type local {_drop('relay-host')}", *block_rules(p),
             _drop("relay-host")]
    for hook, rules in (("forward", forward), ("input", local)):
        lines += [f"chain {hook} {{",
                  f"  type filter hook {hook} priority filter; policy accept;",
                  f'  iifname "{p.tap}" jump egress_{hook}',
                  "}",
                  f"chain egress_{hook} {{",
                  *(f"  {rule}" for rule in rules),
                  "}"]
    return lines


def describe(p: Policy) -> list[str]:
    """The policy in words, one line per step (``relay doctor``)."""
    def show(nets: tuple[str, ...]) -> str:
        return " ".join(nets) if nets else "none"

    lines = [f"from clients (TAP {p.tap}), first match decides:",
             f"deny (always dropped): {show(p.deny)}",
             f"DNS (udp/tcp {DNS_PORT}) to the pushed servers: {show(p.dns)}",
             f"allow (exempt from the blocks below): {show(p.allow)}",
             "drop relay-host: every address of this host",
             f"drop client-to-client: {p.pool}"]
    lines += [f"drop {reason}: {' '.join(nets)}" for reason, nets in BLOCKED.items()]
    lines.append("everything else: forwarded")
    return lines
