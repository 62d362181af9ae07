"""The open-files limit the relay's caps need: the figure the systemd unit's
``LimitNOFILE`` is written with, what ``relay serve`` raises its soft limit to at
start and on reload, and what ``relay doctor`` checks (one definition for all
three)."""

from __future__ import annotations

import resource

from relay.config import Config

# Descriptors besides one per session and one per handshake in progress. An idle
# relay holds about 40 (measured: the TAP device, netlink sockets, BPF maps and
# ring buffer, the three listeners, control and metrics servers, log files,
# uvloop's epoll, eventfd and signal pipe); the rest covers reverse lookups in
# flight (relay.serve.rdns.MAX_PENDING_LOOKUPS), control and metrics clients, the
# forwarder's connection and packet-log rotation and retention.
FD_RESERVE = 256


def nofile_needed(cfg: Config) -> int:
    """Open files the relay needs at its caps: a socket per session
    (``[server] max_sessions``) and per handshake (``[abuse] handshakes_total``),
    plus :data:`FD_RESERVE`. The unit's ``LimitNOFILE``, what ``relay serve``
    raises its soft limit to, and what ``relay doctor`` checks."""
    return cfg.server.max_sessions + cfg.abuse.handshakes_total + FD_RESERVE


def raise_nofile(need: int) -> str | None:
    """Raise this process's soft open-files limit to ``need`` where the hard
    limit allows (as Go programs do at start); the problem, or None."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need and (hard == resource.RLIM_INFINITY or hard > soft):
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < need:
        return (f"open-files limit {soft} is under the {need} the caps need "
                "([server] max_sessions + [abuse] handshakes_total + reserve): "
                f"past it connections fail; set LimitNOFILE={need} (relay "
                f"install-service writes it) or ulimit -n {need}")
    return None
