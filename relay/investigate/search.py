"""Answering "who was connected to relay S at time T and talked to D:P?".

A query joins the two logs: the connection log names the sessions (who, from
where, with which client, when), the packet log says which of them exchanged
packets with the destination in the window. Used by ``relay logs search``,
``relay logs export-pcap`` and ``relay logs disclose``.

Cost: the packet log is the big one (hundreds of millions of records over 14
days). A closed segment's chain link (relay/chain.py) holds its time range, so a
segment outside the window is skipped by a ``stat`` of its size, never opened;
segments without a link fall back to their own index (one read of the trailer);
inside a segment, the block headers' time ranges skip blocks.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any, TextIO

import zstandard

from relay import chain, sessionid
from relay.connlog import reader
from relay.errors import RelayError
from relay.netaddr import AddressError, canonical_ip
from relay.packetlog import segments
from relay.packetlog.blockcodec_py import BlockError
from relay.sessionview import record_time, session_json
from relay.times import NS, format_in, format_utc, parse_rfc3339_ns, utc_date

# The progress bar appears only when a scan outlives this: a quick answer should
# not flash a bar.
PROGRESS_AFTER_S = 1.0
# Redraw at most this often: a terminal write per segment would cost more than the
# segment on fast disks.
PROGRESS_EVERY_S = 0.1
# --at T names only the sessions connected at T (or, with --slack S, within S of
# it); this window only decides which of THEIR packets are counted and exported:
# [T - S - AT_PACKET_WINDOW_S, T + S + AT_PACKET_WINDOW_S). A report's time is when
# the remote server logged a request, by its own clock, and the TCP connection that
# carried it may have sent packets up to a minute before or after (nginx gives up on
# a silent client after 60 s: the client_header/client_body/send_timeout defaults).
AT_PACKET_WINDOW_S = 60.0
# How a session stands to --at T: connected at T, or only within --slack of it.
EXACT, NEAR = "exact", "near"

ErrorReport = Callable[[str, str], None]


@dataclass
class Query:
    """Filters; ``lo``/``hi`` (--from/--to) in epoch seconds (``hi`` exclusive),
    None = open. ``at`` (--at, epoch seconds) replaces them: the sessions connected
    at ``at``, or, with ``slack`` > 0, within ``slack`` seconds of it."""

    lo: float | None = None
    hi: float | None = None
    at: float | None = None
    slack: float = 0.0
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

    def add_packet(self, t_ns: int, source: str) -> None:
        self.packets += 1
        self.first_ns = t_ns if self.first_ns is None else min(self.first_ns, t_ns)
        self.last_ns = t_ns if self.last_ns is None else max(self.last_ns, t_ns)
        self.sources.add(source)


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


# ------------------------------------------------------------ connection log


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _host_matches(rec: dict[str, Any], host: str) -> bool:
    return any(isinstance(d, dict) and str(d.get("host", "")).lower().rstrip(".") == host
               for d in _list(rec.get("destinations")))


def _dst_in_destinations(rec: dict[str, Any], q: Query) -> bool:
    return any(isinstance(d, dict) and d.get("ip") == q.dst_ip
               and (q.dst_port is None or d.get("port") == q.dst_port)
               for d in _list(rec.get("destinations")))


def find_sessions(data_dir: Path, q: Query, on_error: Callable[[str], None] | None = None
                  ) -> tuple[dict[str, SessionRow], set[str]]:
    """(sessions of the connection log that match the session-level filters and
    the time: connected at --at T (or within --slack of it), or overlapping
    --from/--to; the IDs of every session read, matching or not). Days after the
    window are read only until every candidate has its disconnect record."""
    rows: dict[str, SessionRow] = {}
    # Up to the packet window's end, so that every session with packets in it is
    # known here, matching or not (search must not mistake it for one the log lost).
    _, hi = q.packet_window
    hi_day = utc_date(hi) if hi is not None else None
    for day in reader.log_days(data_dir):
        when = day.date
        after = hi_day is not None and when is not None and when > hi_day
        if after and all(r.disconnect for r in rows.values()):
            break
        for rec in _session_records(day, on_error):
            sid = rec["session_id"]
            if q.session and not sid.startswith(q.session):
                continue
            row = rows.get(sid)
            if row is None:
                if after:
                    continue  # connected after the window
                row = rows[sid] = SessionRow(sid)
            if rec["action"] == "connect":
                row.connect = rec
            else:
                row.disconnect = rec
    return {sid: row for sid, row in rows.items() if _session_matches(row, q)}, set(rows)


def _session_records(day: reader.Day,
                     on_error: Callable[[str], None] | None) -> Iterator[dict[str, Any]]:
    # Only connect and disconnect lines matter: audit records are passed over
    # before paying for JSON ("disconnect" contains 'connect"').
    for path, n, rec in reader.records(day, on_error, containing=b'connect"'):
        if rec.get("action") not in ("connect", "disconnect"):
            continue
        if not isinstance(rec.get("session_id"), str) or record_time(rec.get("time")) is None \
                or (rec.get("connect_time") is not None
                    and record_time(rec["connect_time"]) is None):
            if on_error:
                on_error(f"{path}:{n}: session record without a session_id or a valid time, "
                         "skipped")
            continue
        yield rec


def _session_matches(row: SessionRow, q: Query) -> bool:
    start, end = row.connect_ts, row.disconnect_ts
    if q.at is not None:
        row.match = q.coverage(start, end)
        if row.match is None:
            return False
    if q.hi is not None and start is not None and start >= q.hi:
        return False
    if q.lo is not None and end is not None and end < q.lo:
        return False
    if q.server_ip and row.obj("server").get("ip") != q.server_ip:
        return False
    if q.client_ip and row.obj("client").get("ip") != q.client_ip:
        return False
    return not (q.host and not (row.disconnect and _host_matches(row.disconnect, q.host)))


# ------------------------------------------------------------ packet log


def _catalogue(data_dir: Path) -> dict[str, dict[str, Any]]:
    """File name -> its newest chain link (close or archive) with a time range."""
    out: dict[str, dict[str, Any]] = {}
    for _, link in chain.read_links(chain.chain_path(data_dir, chain.PACKETS_CHAIN)):
        if link and link.get("event") in ("close", "archive") and "t_min" in link:
            out[str(link.get("file"))] = link
    return out


def segments_in_window(data_dir: Path, lo_ns: int | None,
                       hi_ns: int | None) -> tuple[list[Path], int]:
    """(segments that may hold records in [lo, hi), how many were ruled out by
    their chain link without being opened)."""
    cat = _catalogue(data_dir)
    keep: list[Path] = []
    skipped = 0
    for path in segments.segment_files(data_dir):
        link = cat.get(path.name)
        if link is not None and link.get("size") == _size(path):
            t_min, t_max = link.get("t_min"), link.get("t_max")
            if t_min is None or (lo_ns is not None and t_max < lo_ns) or \
               (hi_ns is not None and t_min >= hi_ns):
                skipped += 1
                continue
        keep.append(path)
    return keep, skipped


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


class Progress:
    """"scanning 12/40 segments" on stderr, only if stderr is a terminal and the
    scan has run for PROGRESS_AFTER_S."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.started = time.monotonic()
        self.drawn = 0.0
        self.shown = False

    def step(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.started < PROGRESS_AFTER_S or now - self.drawn < PROGRESS_EVERY_S:
            return
        width = 30
        filled = width * done // max(self.total, 1)
        self.stream.write(f"\rscanning [{'#' * filled}{'.' * (width - filled)}] "
                          f"{done}/{self.total} segments")
        self.stream.flush()
        self.drawn = now
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def scan_packets(data_dir: Path, q: Query, *, sessions: set[str] | None = None,
                 on_error: ErrorReport,
                 progress: Progress | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(segment, record) of every packet in the packet window that matches the
    packet filters (and belongs to ``sessions`` when given)."""
    lo_s, hi_s = q.packet_window
    lo = int(lo_s * NS) if lo_s is not None else None
    hi = int(hi_s * NS) if hi_s is not None else None
    paths, _ = segments_in_window(data_dir, lo, hi)
    if progress is not None:
        progress.total = len(paths)
    # A whole session ID lets the segment index rule segments out; a shorter
    # --session (a tag, ...) is a prefix, matched record by record.
    full_session = q.session if q.session and sessionid.is_valid(q.session) else None
    # packetlog's per-segment reader, so that this module picks the segments.
    dec = segments._Decoder()
    for i, path in enumerate(paths):
        if progress is not None:
            progress.step(i)
        try:
            recs = segments._iter_segment(
                path, dec, sessionid.to_raw(full_session) if full_session else None,
                full_session, lo, hi, q.client_ip, q.dst_ip, on_error)
            for rec in recs:
                sid = rec["session_id"]
                if not sid or (sessions is not None and sid not in sessions):
                    continue
                if q.session and not sid.startswith(q.session):
                    continue
                if q.dst_port is not None and not _talks_to(rec, q):
                    continue
                yield path, rec
        except (OSError, BlockError, zstandard.ZstdError, ValueError) as exc:
            on_error(str(path), str(exc))
    if progress is not None:
        progress.finish()


def _talks_to(rec: dict[str, Any], q: Query) -> bool:
    """The packet goes to D:P or comes back from it."""
    if q.dst_ip is None:
        return q.dst_port in (rec["dst_port"], rec["src_port"])
    return (rec["dst_ip"] == q.dst_ip and rec["dst_port"] == q.dst_port) or \
        (rec["src_ip"] == q.dst_ip and rec["src_port"] == q.dst_port)


# ------------------------------------------------------------ the query


def session_level(q: Query) -> bool:
    """Filters that only the connection log can decide."""
    return bool(q.server_ip or q.host)


def search(data_dir: Path, q: Query, *, on_error: ErrorReport,
           progress: Progress | None = None,
           keep_packets: bool = False) -> tuple[list[SessionRow], list[tuple[Path, dict]]]:
    """Matching sessions (by connect time) and, with ``keep_packets``, their
    matching packet records with their segment."""
    rows, known = find_sessions(data_dir, q,
                                on_error=lambda msg: on_error(msg, "connection log"))
    allowed = set(rows) if session_level(q) else None
    kept: list[tuple[Path, dict[str, Any]]] = []
    hit: set[str] = set()
    for path, rec in scan_packets(data_dir, q, sessions=allowed, on_error=on_error,
                                  progress=progress):
        sid = rec["session_id"]
        row = rows.get(sid)
        if row is None:
            if sid in known:
                # The connection log ruled it out (e.g. it began after --at T):
                # packets in the wider packet window must not bring it back.
                continue
            # Packets of a session the connection log does not name (its days
            # deleted or damaged): still an answer, shown without its details.
            if q.client_ip is None or rec["client_ip"] == q.client_ip:
                row = rows[sid] = SessionRow(sid)
            else:
                continue
        row.add_packet(parse_rfc3339_ns(rec["time"]), path.name)
        hit.add(sid)
        if keep_packets:
            kept.append((path, rec))
    if q.at is not None:
        # A session known only by its packets was connected at T when they
        # straddle T: its first and last packet are its only proof of life.
        for r in rows.values():
            if r.connect is None and r.disconnect is None:
                r.match = q.coverage(r.first_ns / NS if r.first_ns is not None else None,
                                     r.last_ns / NS if r.last_ns is not None else None)
        rows = {sid: r for sid, r in rows.items() if r.match is not None}
    if q.packet_filter:
        out = [r for r in rows.values() if r.session_id in hit
               or (r.disconnect is not None and _dst_in_destinations(r.disconnect, q))]
    else:
        out = list(rows.values())
    out.sort(key=lambda r: (r.connect_ts or 0.0, r.session_id))
    named = {r.session_id for r in out}
    return out, [(path, rec) for path, rec in kept if rec["session_id"] in named]


def row_dict(row: SessionRow, tz: tzinfo) -> dict[str, Any]:
    """One session as search prints it: relay.sessionview's schema, with ``match``
    and the count and first/last time of its matching packet-log records."""
    first = row.first_ns / NS if row.first_ns is not None else None
    last = row.last_ns / NS if row.last_ns is not None else None
    session = session_json(row.session_id, row.connect, row.disconnect, tz)
    return {
        "session_id": session.pop("session_id"),
        "match": row.match,
        **session,
        "packets": row.packets,
        "first_packet": format_in(first, tz) or None, "first_packet_utc": format_utc(first) or None,
        "last_packet": format_in(last, tz) or None, "last_packet_utc": format_utc(last) or None,
        "in_connection_log": row.connect is not None or row.disconnect is not None,
    }
