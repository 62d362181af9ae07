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

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import zstandard

from relay import chain, sessionid
from relay.connlog import reader
from relay.packetlog import segments
from relay.packetlog.blockcodec_py import BlockError
from relay.sessionquery import (
    Query,
    SessionRow,
    dst_in_destinations,
    session_matches,
    session_record_problem,
)
from relay.times import NS, parse_rfc3339_ns, utc_date

# The progress bar appears only when a scan outlives this: a quick answer should
# not flash a bar.
PROGRESS_AFTER_S = 1.0
# Redraw at most this often: a terminal write per segment would cost more than the
# segment on fast disks.
PROGRESS_EVERY_S = 0.1

ErrorReport = Callable[[str, str], None]


# ------------------------------------------------------------ connection log


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
            row.add(rec)
    return {sid: row for sid, row in rows.items() if session_matches(row, q)}, set(rows)


def _session_records(day: reader.Day,
                     on_error: Callable[[str], None] | None) -> Iterator[dict[str, Any]]:
    # Only connect and disconnect lines matter: audit records are passed over
    # before paying for JSON ("disconnect" contains 'connect"').
    for path, n, rec in reader.records(day, on_error, containing=b'connect"'):
        if rec.get("action") not in ("connect", "disconnect"):
            continue
        problem = session_record_problem(rec)
        if problem is not None:
            if on_error:
                on_error(f"{path}:{n}: {problem}, skipped")
            continue
        yield rec


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
    return bool(q.server_id or q.server_ip or q.host)


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
               or (r.disconnect is not None and dst_in_destinations(r.disconnect, q))]
    else:
        out = list(rows.values())
    out.sort(key=lambda r: (r.connect_ts or 0.0, r.session_id))
    named = {r.session_id for r in out}
    return out, [(path, rec) for path, rec in kept if rec["session_id"] in named]
