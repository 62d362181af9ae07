"""Which sessions a query names: the filters, the ``--at`` rule and the row shown.

One definition shared by the relay's search (relay/investigate/search.py, over
its connection and packet logs) and the fleet search of ``relay collector
search`` (relay/central/fleet.py, over the collector's store): both build a
:class:`SessionRow` from a session's connect and disconnect records and keep it
when :func:`session_matches` says so, with the ``match`` it sets under ``--at``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Any

from relay.errors import RelayError
from relay.netaddr import AddressError, canonical_ip
from relay.sessionview import record_time, session_json
from relay.times import NS, format_in, format_utc

# --at T names only the sessions connected at T (or, with --slack S, within S of
# it); this window only decides which of THEIR packets are counted and exported:
# [T - S - AT_PACKET_WINDOW_S, T + S + AT_PACKET_WINDOW_S). A report's time is when
# the remote server logged a request, by its own clock, and the TCP connection that
# carried it may have sent packets up to a minute before or after (nginx gives up on
# a silent client after 60 s: the client_header/client_body/send_timeout defaults).
AT_PACKET_WINDOW_S = 60.0
# How a session stands to --at T: connected at T, or only within --slack of it.
EXACT, NEAR = "exact", "near"


@dataclass
class Query:
    """Filters; ``lo``/``hi`` (--from/--to) in epoch seconds (``hi`` exclusive),
    None = open. ``at`` (--at, epoch seconds) replaces them: the sessions connected
    at ``at``, or, with ``slack`` > 0, within ``slack`` seconds of it."""

    lo: float | None = None
    hi: float | None = None
    at: float | None = None
    slack: float = 0.0
    server_id: str | None = None
    server_ip: str | None = None
    dst_ip: str | None = None
    dst_port: int | None = None
    host: str | None = None
    client_ip: str | None = None
    session: str | None = None

    @property
    def packet_filter(self) -> bool:
        """True when sessions are selected by their packets (not only listed)."""
        return self.dst_ip is not None or self.dst_port is not None

    @property
    def packet_window(self) -> tuple[float | None, float | None]:
        """[lo, hi) of the packets counted: --from/--to, or around --at."""
        if self.at is None:
            return self.lo, self.hi
        half = self.slack + AT_PACKET_WINDOW_S
        return self.at - half, self.at + half

    @property
    def session_window(self) -> tuple[float | None, float | None]:
        """[lo, hi] that a matching session's [connect, disconnect] must reach
        into: --from/--to, or --at widened by --slack (a superset of the
        matches, for a store to narrow its reads; :func:`session_matches` decides)."""
        if self.at is None:
            return self.lo, self.hi
        return self.at - self.slack, self.at + self.slack

    def coverage(self, start: float | None, end: float | None) -> str | None:
        """EXACT when [start, end] (end None: still open) covers ``at``, NEAR when
        it only comes within ``slack`` of it, else None. An unknown start proves
        nothing, so it is None: --at must never name a session it cannot place."""
        assert self.at is not None
        if start is None:
            return None
        if start <= self.at and (end is None or self.at <= end):
            return EXACT
        if start <= self.at + self.slack and (end is None or end >= self.at - self.slack):
            return NEAR
        return None


@dataclass
class SessionRow:
    session_id: str
    connect: dict[str, Any] | None = None
    disconnect: dict[str, Any] | None = None
    packets: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    sources: set[str] = field(default_factory=set)  # segment files its packets came from
    match: str | None = None  # under --at: EXACT or NEAR

    def value(self, key: str) -> Any:
        """A field of the session's records, the disconnect record's first (it
        carries the final client hostname)."""
        for rec in (self.disconnect, self.connect):
            if rec and rec.get(key) is not None:
                return rec[key]
        return None

    def obj(self, key: str) -> dict[str, Any]:
        """value(key) when it is an object, else {}: a field of another type (a
        record of an older relay, a forged copy) must not crash a search."""
        value = self.value(key)
        return value if isinstance(value, dict) else {}

    @property
    def connect_ts(self) -> float | None:
        text = (self.connect or {}).get("time") or (self.disconnect or {}).get("connect_time")
        return record_time(text)

    @property
    def disconnect_ts(self) -> float | None:
        return record_time(self.disconnect["time"]) if self.disconnect else None

    def add(self, rec: dict[str, Any]) -> None:
        """Take a connect or disconnect record of this session."""
        if rec.get("action") == "connect":
            self.connect = rec
        else:
            self.disconnect = rec

    def add_packet(self, t_ns: int, source: str) -> None:
        self.packets += 1
        self.first_ns = t_ns if self.first_ns is None else min(self.first_ns, t_ns)
        self.last_ns = t_ns if self.last_ns is None else max(self.last_ns, t_ns)
        self.sources.add(source)


def session_record_problem(rec: dict[str, Any]) -> str | None:
    """Why a connect or disconnect record cannot place its session, or None."""
    if not isinstance(rec.get("session_id"), str) or record_time(rec.get("time")) is None \
            or (rec.get("connect_time") is not None and record_time(rec["connect_time"]) is None):
        return "session record without a session_id or a valid time"
    return None


def parse_dst(text: str) -> tuple[str, int | None]:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT``."""
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ip = str(ipaddress.ip_address(host))
        p = int(port) if port is not None else None
    except ValueError:
        raise RelayError(f"--dst {text}: expected IP or IP:PORT (e.g. 203.0.113.7:443)") \
            from None
    if p is not None and not 0 < p < 65536:
        raise RelayError(f"--dst {text}: port out of range")
    return ip, p


def normalize_ip(text: str | None, what: str) -> str | None:
    """The spelling the logs use (relay.netaddr): ``::ffff:a.b.c.d`` finds the
    sessions of ``a.b.c.d``."""
    if text is None:
        return None
    try:
        return canonical_ip(text)
    except AddressError:
        raise RelayError(f"{what} {text}: not an IP address") from None


def normalize_host(text: str) -> str:
    """A host name as --host compares it: lower case, no trailing dot."""
    return text.lower().rstrip(".")


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def host_matches(rec: dict[str, Any], host: str) -> bool:
    return any(isinstance(d, dict) and normalize_host(str(d.get("host", ""))) == host
               for d in _list(rec.get("destinations")))


def dst_in_destinations(rec: dict[str, Any], q: Query) -> bool:
    return any(isinstance(d, dict) and d.get("ip") == q.dst_ip
               and (q.dst_port is None or d.get("port") == q.dst_port)
               for d in _list(rec.get("destinations")))


def session_matches(row: SessionRow, q: Query) -> bool:
    """The session-level filters and the time (setting ``row.match`` under --at);
    destinations by packets are the caller's (a relay has packets, a collector
    only the disconnect record's list)."""
    start, end = row.connect_ts, row.disconnect_ts
    if q.at is not None:
        row.match = q.coverage(start, end)
        if row.match is None:
            return False
    if q.hi is not None and start is not None and start >= q.hi:
        return False
    if q.lo is not None and end is not None and end < q.lo:
        return False
    if q.server_id and row.obj("server").get("id") != q.server_id:
        return False
    if q.server_ip and row.obj("server").get("ip") != q.server_ip:
        return False
    if q.client_ip and row.obj("client").get("ip") != q.client_ip:
        return False
    return not (q.host and not (row.disconnect and host_matches(row.disconnect, q.host)))


def row_dict(row: SessionRow, tz: tzinfo, *, packets: bool = True) -> dict[str, Any]:
    """One session as a search prints it: relay.sessionview's schema, with
    ``match`` and (``packets``: a relay's search, which has a packet log) the
    count and first/last time of its matching packet-log records."""
    session = session_json(row.session_id, row.connect, row.disconnect, tz)
    out = {"session_id": session.pop("session_id"), "match": row.match, **session}
    if packets:
        first = row.first_ns / NS if row.first_ns is not None else None
        last = row.last_ns / NS if row.last_ns is not None else None
        out |= {
            "packets": row.packets,
            "first_packet": format_in(first, tz) or None,
            "first_packet_utc": format_utc(first) or None,
            "last_packet": format_in(last, tz) or None,
            "last_packet_utc": format_utc(last) or None,
        }
    out["in_connection_log"] = row.connect is not None or row.disconnect is not None
    return out
