"""Reverse lookups of client addresses that never delay a session.

A lookup runs in a worker thread while the session is set up; the connection log
takes the name only if the answer is already there (null otherwise), and the
number of lookups in flight is capped so a flood cannot queue thousands of them.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

# Concurrent reverse lookups; past this, new sessions are logged with hostname
# null rather than queueing lookups behind a flood.
MAX_PENDING_LOOKUPS = 64


class ReverseLookups:
    def __init__(self) -> None:
        self.pending = 0

    def start(self, ip: str, port: int) -> asyncio.Future[Any] | None:
        """Start the lookup of a client address; None when too many are pending."""
        if self.pending >= MAX_PENDING_LOOKUPS:
            return None
        self.pending += 1
        future = asyncio.get_running_loop().run_in_executor(
            None, socket.getnameinfo, (ip, port), socket.NI_NAMEREQD)
        future.add_done_callback(self._done)
        return future

    def _done(self, f: asyncio.Future[Any]) -> None:
        self.pending -= 1
        if not f.cancelled():
            f.exception()  # no name is the common case, not an error


def name(lookup: asyncio.Future[Any] | None) -> str | None:
    """The name a finished lookup found, else None (never waits)."""
    if lookup is None or not lookup.done() or lookup.cancelled() \
            or lookup.exception() is not None:
        return None
    return str(lookup.result()[0])
