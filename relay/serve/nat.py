"""The relay's own nftables table, ``inet`` family, named after its TAP device
(``inet relay0`` by default, so relays with TAP devices of their own can share a
host): the egress policy (relay.serve.egress), the masquerade towards ``[server]
uplink`` when one is set, and IPv4 forwarding.

The table holds only the relay's rules, so installing it replaces a leftover from
a killed relay and removing it touches nothing of the operator's ruleset. One
``inet`` table gives IPv4 and IPv6 one policy. A reload replaces the rules in one
transaction (``flush table`` then the new definition) and keeps the counters.

The drop counters are read by running ``nft`` in a worker thread every
:data:`COUNTERS_REFRESH_S`; a metrics scrape returns the last values read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess

from relay.errors import RelayError
from relay.metrics import Metric
from relay.serve.egress import REASONS, Policy, table_body

log = logging.getLogger("relay")

FAMILY = "inet"
FORWARD_SYSCTL = "/proc/sys/net/ipv4/ip_forward"
# How old the drop counters in a scrape may be. Prometheus' example configuration
# scrapes every 15 s; a refresh every 5 s costs one `nft` run (a few ms, off the
# event loop) per period.
COUNTERS_REFRESH_S = 5.0
# Tables of earlier versions, one per host, removed if a killed relay left one:
# `ip relay` (the masquerade before the egress policy) and `inet relay` (before
# the table was named after the TAP device).
LEGACY_TABLES = (("ip", "relay"), ("inet", "relay"))


def _drop(family: str, name: str) -> str:
    """Delete a table whether or not it exists ("add" first makes "delete" succeed)."""
    return f"add table {family} {name}\ndelete table {family} {name}\n"


def _replace(tap: str) -> str:
    """This TAP device's table and the legacy ones, gone (in one transaction with
    what follows)."""
    return "".join(_drop(f, n) for f, n in (*LEGACY_TABLES, (FAMILY, tap)))


def _nft(args: list[str], script: str | None = None) -> str:
    try:
        proc = subprocess.run(["nft", *args], input=script, text=True,
                              capture_output=True, check=False)
    except FileNotFoundError:
        raise RelayError("nft not found: install nftables") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise RelayError(f"nftables: {lines[0]}")
    return proc.stdout


def table_script(policy: Policy, uplink: str) -> str:
    """The whole table: the egress policy, and the masquerade with an uplink."""
    lines = table_body(policy)
    if uplink:
        lines += ["chain postrouting {",
                  "  type nat hook postrouting priority srcnat; policy accept;",
                  f'  ip saddr {policy.pool} oifname "{uplink}" masquerade',
                  "}"]
    return (f"table {FAMILY} {policy.tap} {{\n" + "".join(f"  {line}\n" for line in lines)
            + "}\n")


def install_script(policy: Policy, uplink: str) -> str:
    """The script that replaces any table of ours with this one, in one transaction."""
    return _replace(policy.tap) + table_script(policy, uplink)


def check(policy: Policy, uplink: str) -> None:
    """Have the kernel validate the table without installing it (``nft -c``)."""
    _nft(["-c", "-f", "-"], install_script(policy, uplink))


def parse_counters(text: str) -> dict[str, int]:
    """Packets per counter name from ``nft -j list counters table ...``."""
    out = {}
    for item in json.loads(text).get("nftables", []):
        counter = item.get("counter")
        if counter is not None:
            out[counter["name"]] = int(counter["packets"])
    return out


class RelayTable:
    """Installed by :meth:`install`, changed by :meth:`replace` (reload), undone by
    :meth:`remove`; :meth:`refresh_loop` keeps :meth:`metrics` current."""

    def __init__(self, policy: Policy, uplink: str) -> None:
        self.policy = policy
        self.uplink = uplink
        self.dropped = dict.fromkeys(REASONS, 0)
        self._old_forward: str | None = None
        self._read_failed = False

    def install(self) -> None:
        # The policy first: forwarding is never on without it.
        _nft(["-f", "-"], install_script(self.policy, self.uplink))
        if self.uplink:
            with open(FORWARD_SYSCTL) as f:
                self._old_forward = f.read().strip()
            with open(FORWARD_SYSCTL, "w") as f:
                f.write("1")
        p = self.policy
        log.info("egress policy in force on %s (table %s %s): allow %s, deny %s%s", p.tap,
                 FAMILY, p.tap, " ".join(p.allow) or "none", " ".join(p.deny) or "none",
                 f"; NAT towards {self.uplink}" if self.uplink else "")

    def replace(self, policy: Policy) -> None:
        """New rules in one transaction; the chains and counters stay."""
        _nft(["-f", "-"], f"flush table {FAMILY} {policy.tap}\n"
             + table_script(policy, self.uplink))
        self.policy = policy
        log.info("egress policy replaced: allow %s, deny %s", " ".join(policy.allow) or "none",
                 " ".join(policy.deny) or "none")

    def remove(self) -> None:
        if self._old_forward is not None:
            with open(FORWARD_SYSCTL, "w") as f:
                f.write(self._old_forward)
            self._old_forward = None
        _nft(["-f", "-"], _drop(FAMILY, self.policy.tap))

    def read_counters(self) -> dict[str, int]:
        return parse_counters(_nft(["-j", "list", "counters", "table", FAMILY,
                                    self.policy.tap]))

    async def refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                counters = await loop.run_in_executor(None, self.read_counters)
            except RelayError as exc:
                if not self._read_failed:  # once, not every period
                    log.warning("egress drop counters unreadable: %s", exc)
                self._read_failed = True
            else:
                self.dropped.update((r, counters[r]) for r in REASONS if r in counters)
                self._read_failed = False
            await asyncio.sleep(COUNTERS_REFRESH_S)

    def metrics(self) -> list[Metric]:
        m = Metric("relay_egress_dropped_packets_total", "counter",
                   "Client packets the egress policy dropped, by reason "
                   f"(refreshed every {COUNTERS_REFRESH_S:g} s).")
        for reason in REASONS:
            m.add(self.dropped[reason], reason=reason)
        return [m]
