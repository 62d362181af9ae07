"""IPv4 forwarding and the relay's own nftables masquerade table.

The table holds only the relay's rule, so adding it replaces a leftover from a
killed relay and removing it touches nothing of the operator's ruleset.
"""

from __future__ import annotations

import subprocess

from relay.errors import RelayError

TABLE = "relay"
FORWARD_SYSCTL = "/proc/sys/net/ipv4/ip_forward"


def _nft(script: str) -> None:
    try:
        proc = subprocess.run(["nft", "-f", "-"], input=script, text=True,
                              capture_output=True, check=False)
    except FileNotFoundError:
        raise RelayError("nft not found: install nftables") from None
    if proc.returncode != 0:
        raise RelayError(f"nftables: {proc.stderr.strip().splitlines()[-1]}")


class Masquerade:
    """Forwarding on, pool masqueraded towards ``uplink``; undone by :meth:`remove`."""

    def __init__(self, pool: str, uplink: str) -> None:
        self.pool = pool
        self.uplink = uplink
        self._old_forward: str | None = None

    def install(self) -> None:
        with open(FORWARD_SYSCTL) as f:
            self._old_forward = f.read().strip()
        with open(FORWARD_SYSCTL, "w") as f:
            f.write("1")
        # "add" then "delete" makes the delete succeed whether or not a table
        # was left behind by a relay that was killed.
        _nft(
            f"add table ip {TABLE}\n"
            f"delete table ip {TABLE}\n"
            f"table ip {TABLE} {{\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    ip saddr {self.pool} oifname "{self.uplink}" masquerade\n'
            "  }\n"
            "}\n"
        )

    def remove(self) -> None:
        _nft(f"add table ip {TABLE}\ndelete table ip {TABLE}\n")
        if self._old_forward is not None:
            with open(FORWARD_SYSCTL, "w") as f:
                f.write(self._old_forward)
            self._old_forward = None
