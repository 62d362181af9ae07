"""Ship the connection log to a central collector: RFC 5424 over RFC 5425 (TLS).

The connection log on disk is the queue. The forwarder reads it from a
persisted position (``DATA_DIR/ship/position``: day and byte offset into that
day's uncompressed lines), so a collector outage, a network cut or a relay
restart only delays records.

Delivery is **at least once**, and this is how a batch is known to have arrived:
TCP and TLS acknowledge nothing to the application, and RFC 5425 has no
application ack. What it does have is the close (section 4.4): the sender sends
TLS close_notify and the receiver answers with its own close_notify, which it
can only do after it has read everything before ours. So every connection
carries one batch (at most :data:`BATCH_MAX_BYTES` of log, everything
available if less), then the forwarder closes and waits for the collector's
close_notify; only then is the position advanced (written atomically, synced).
(``relay collector`` does better than RFC 5425 allows: see below.)
A receiver that dies, resets or times out has not acknowledged: the batch
goes again on the next connection. The cost is one TLS handshake per batch;
the gain is that no record is counted as delivered on TCP's word alone.
Duplicates (at most one batch per failure) carry the same record ``id`` and the
collector drops them.

Three kinds of receiver, told apart by ALPN (the forwarder offers
:data:`ACK_ALPN` and :data:`CONFIRM_ALPN`; only ``relay collector`` selects one):

- ``relay collector`` under :data:`ACK_ALPN` keeps the connection and takes
  batches of :data:`PIPELINE_BATCH_BYTES` back to back, each ended by a batch
  mark, and answers each mark with an acknowledgement on the same connection
  once everything before it is written and fdatasync'ed
  (relay.protocols.syslog5424, "Batch confirmations"). The forwarder keeps up
  to :data:`MAX_IN_FLIGHT` batches unacknowledged and advances the position
  batch by batch, in order, as the acks arrive; a connection that fails
  confirms nothing more, and every batch not acknowledged goes again (still at
  least once: the collector drops the duplicates). Its messages' SD carries
  the record id only: the collector reads the JSON;
- ``relay collector`` under :data:`CONFIRM_ALPN` (a collector that predates
  the acks) answers close_notify only after the batch is written and
  fdatasync'ed; the forwarder then requires that close_notify, and treats a
  bare FIN as a failure (the collector may have died between reading and
  writing);
- a stock RFC 5425 receiver (rsyslog) reads up to our close_notify and closes
  TCP without answering. There the confirmation is a clean FIN after our
  close_notify: a Linux socket closed with unread data sends RST, not FIN, so
  FIN means the receiver read the whole batch. The records are then as safe as
  the receiver's queue (rsyslog's in-memory main queue by default).

Connection failures back off exponentially with jitter.

Shipping is never stopped by one record. Every record fits the collector's
frame by construction (relay.protocols.syslog5424.format_record); a line that is not a
record of this relay (not a JSON object, another ``server.id``, too long,
unreadable) and a record the collector keeps refusing are *set aside*: written
to ``DATA_DIR/ship/set-aside.jsonl`` (0600) with an audit record
(``ship-set-aside``) in the connection log, and shipping goes on with the next
records. A refusal is a batch the collector does not confirm after a completed
handshake; after :data:`REFUSALS_BEFORE_SPLIT` in a row the forwarder sends
halves, then quarters, down to the one record, and sets that record aside only
once the record after it is confirmed (a collector that refuses everything, a
full disk say, makes no record a culprit).

The backlog (records and bytes not yet confirmed), the last success and the
failures are counted in memory as the forwarder works: the log is read and
counted in a worker thread (a compressed day is decompressed as a stream), never
on the event loop of ``relay serve``, and a metrics scrape reads the counters.
The status also goes to ``DATA_DIR/ship/status.json``, which :func:`ship_status`
reads from another process (``relay ship status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import zstandard
from cryptography import x509
from cryptography.x509.oid import NameOID

from relay.config import parse_hostport
from relay.connlog import reader
from relay.connlog.daylog import SUBDIR
from relay.errors import RelayError
from relay.fsutil import write_atomic
from relay.protocols import syslog5424
from relay.times import rfc3339_ms
from relay.tlsconf import identity_of_names

log = logging.getLogger("relay.connlog.forwarder")

SHIP_SUBDIR = "ship"
POSITION_FILE = "position"
STATUS_FILE = "status.json"

# TCP connect plus TLS handshake. Beyond 10 s the path or the collector is
# broken; back off instead of holding a half-open attempt.
CONNECT_TIMEOUT_S = 10.0
# One write of at most WRITE_CHUNK_RECORDS messages into the socket: a
# collector that reads nothing for 30 s is treated as dead (the batch is resent).
IO_TIMEOUT_S = 30.0
# Waiting for the collector's close_notify, after which it has read the batch
# (and our collector has synced it to disk).
CLOSE_CONFIRM_TIMEOUT_S = 30.0
# Exponential back-off after a failed connection, with jitter in [d/2, d] so
# that relays cut off together do not reconnect in lockstep ("equal jitter",
# AWS Architecture Blog, "Exponential Backoff And Jitter", 2015). A minute
# caps what a recovered collector waits for the relays to notice.
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0
# How often an idle forwarder looks for new lines in the log (one stat and a
# read at EOF): a record reaches the collector within about this long.
POLL_INTERVAL_S = 0.2
# Log bytes per connection (about 3,000 records): large enough that the
# handshake is a few per cent of the transfer, small enough that a failure
# resends little.
BATCH_MAX_BYTES = 4 << 20
# Messages formatted and written between two yields to the event loop: the
# forwarder shares it with the VPN data path of `relay serve`.
WRITE_CHUNK_RECORDS = 256
# Status writes are rate-limited (errors and state changes are not).
STATUS_INTERVAL_S = 1.0
READ_SIZE = 65536
# ALPN protocol id by which relay collector says "my close_notify means your
# batch is on disk" (a private id: ALPN has no registered one for syslog).
CONFIRM_ALPN = "x-relay-syslog-confirm"
# ALPN protocol id by which relay collector says "I acknowledge each batch on
# this connection once it is on disk" (syslog5424's "Batch confirmations").
ACK_ALPN = "x-relay-syslog-acks"
# Batches sent ahead of their acknowledgement on one connection: enough to keep
# the link busy while the collector syncs the oldest (a window, as TCP's own),
# and what a failure resends at most.
MAX_IN_FLIGHT = 4
# Log bytes per batch under ACK_ALPN: an fdatasync each at the collector; with
# MAX_IN_FLIGHT of them the window holds as much as one BATCH_MAX_BYTES batch.
PIPELINE_BATCH_BYTES = 1 << 20
# Refusals of the same batch (handshake done, batch not confirmed) before it is
# split to find the record the collector refuses: as TCP waits for R1 = 3
# retransmissions before suspecting the path (RFC 1122 section 4.2.3.5), two
# refusals can be a collector restarting, three are the batch.
REFUSALS_BEFORE_SPLIT = 3
SET_ASIDE_FILE = "set-aside.jsonl"
# Set-aside records named in one audit record (the rest are counted): keeps
# the audit record small whatever a corrupted log holds.
AUDIT_SET_ASIDE_MAX = 32


def certificate_identity(pem_path: str) -> str | None:
    """:func:`identity_of_names` of the first certificate of a PEM file."""
    try:
        cert = x509.load_pem_x509_certificate(Path(pem_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise RelayError(f"[forward] cert: cannot read {pem_path}: {exc}") from None
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return identity_of_names(names)


@dataclass(frozen=True, order=True)
class Position:
    day: str = ""  # "" = from the oldest day present
    offset: int = 0


def ship_dir(data_dir: Path) -> Path:
    return Path(data_dir) / SHIP_SUBDIR


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, data)


def load_position(data_dir: Path) -> Position:
    try:
        data = json.loads((ship_dir(data_dir) / POSITION_FILE).read_bytes())
        return Position(str(data["day"]), int(data["offset"]))
    except FileNotFoundError:
        return Position()
    except (ValueError, KeyError, TypeError) as exc:
        # Restarting from the oldest day resends everything (the collector
        # drops the duplicates); guessing could skip records.
        log.error("ship position unreadable (%s): shipping again from the oldest day", exc)
        return Position()


def save_position(data_dir: Path, pos: Position) -> None:
    _write_atomic(ship_dir(data_dir) / POSITION_FILE, json.dumps(asdict(pos)).encode())


# ---------------------------------------------------------------------------
# Reading the log from a position (in a worker thread: a .zst day is decompressed)


class Skip(NamedTuple):
    """Something the reader passed over: a note for the log and the status, and
    for a record that cannot be shipped, its entry for the set-aside file."""

    note: str
    set_aside: dict[str, Any] | None = None


class LogReader:
    """The connection log from a position (relay/connlog/reader.py's days, read
    with its kept .zst reader and its torn-line rule)."""

    def __init__(self, connlog_dir: Path) -> None:
        self.dir = Path(connlog_dir)
        self._days = reader.DayReader()

    def close(self) -> None:
        self._days.close()

    def read(self, pos: Position, max_bytes: int, now: float
             ) -> tuple[bytes, Position, list[Skip]]:
        """Complete lines after ``pos`` (at most ``max_bytes``, all of one day),
        the position after them, and what was passed over (a missing day, a torn
        line, a line too long to ship)."""
        skips: list[Skip] = []
        while True:
            sources = {day.name: day.source for day in reader.days(self.dir)}
            if not sources:
                return b"", pos, skips
            days = sorted(sources)
            if not pos.day:
                pos = Position(days[0], 0)
            later = [d for d in days if d > pos.day]
            if pos.day not in sources:
                if not later:
                    return b"", pos, skips
                skips.append(Skip(f"connection log of {pos.day} is gone before it was "
                                  "shipped"))
                pos = Position(later[0], 0)
                continue
            path = sources[pos.day]
            try:
                data = self._days.read(path, pos.offset, max_bytes)
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue  # retention replaced the plain file by its .zst meanwhile
            except zstandard.ZstdError as exc:
                self.close()
                skips.append(Skip(
                    f"{path}: unreadable from offset {pos.offset} ({exc}): set aside",
                    {"reason": "unreadable", "day": pos.day, "offset": pos.offset,
                     "detail": f"{path.name}: {exc}"}))
                if not later:
                    return b"", pos, skips
                pos = Position(later[0], 0)
                continue
            end = data.rfind(b"\n")
            if end >= 0:
                return data[:end + 1], Position(pos.day, pos.offset + end + 1), skips
            if len(data) >= max_bytes:
                skips.append(Skip(
                    f"{path}: line longer than {max_bytes} bytes at offset {pos.offset} "
                    "set aside",
                    {"reason": "too-long", "day": pos.day, "offset": pos.offset,
                     "detail": f"a line longer than {max_bytes} bytes (in the local log)"}))
                return b"", Position(pos.day, pos.offset + len(data)), skips
            if later and not data:
                pos = Position(later[0], 0)  # the day is done
                continue
            if reader.tail_is_torn(mtime, bool(later), now):
                skips.append(Skip(f"{path}: torn last line ({len(data)} bytes) skipped"))
                pos = Position(later[0], 0)
                continue
            return b"", pos, skips  # a line being written: wait for its LF

    def count(self, start: Position) -> tuple[int, int, Position]:
        """(bytes, complete lines, end of the log) from ``start`` on: one stat
        per day already counted past, a streaming read of the rest."""
        total = lines = 0
        end = start
        for day in reader.days(self.dir):
            if start.day and day.name < start.day:
                continue
            offset = start.offset if day.name == start.day else 0
            try:
                size = reader.uncompressed_size(day.source)
                if size > offset:
                    for chunk in reader.stream(day.source, offset):
                        total += len(chunk)
                        lines += chunk.count(b"\n")
                end = Position(day.name, max(size, offset))
            except (FileNotFoundError, zstandard.ZstdError):
                continue  # gone meanwhile, or unreadable (the reader sets it aside)
        return total, lines, end


def backlog(data_dir: Path, pos: Position) -> dict[str, Any]:
    """Records and bytes not yet acknowledged by the collector, counted from the
    files (``relay ship status``; the running forwarder keeps its own count)."""
    reader = LogReader(Path(data_dir) / SUBDIR)
    size, lines, _ = reader.count(pos)
    return {"backlog_records": lines, "backlog_bytes": size}


def set_aside_path(data_dir: Path) -> Path:
    return ship_dir(data_dir) / SET_ASIDE_FILE


def _append_set_aside(path: Path, entries: list[dict[str, Any]]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b"".join(syslog5424.dumps_json(e).encode() + b"\n" for e in entries))
        os.fdatasync(fd)
    finally:
        os.close(fd)


def set_aside_count(data_dir: Path) -> int:
    try:
        with open(set_aside_path(data_dir), "rb") as f:
            return sum(chunk.count(b"\n")
                       for chunk in iter(lambda: f.read(reader.READ_CHUNK), b""))
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------------
# TLS with a confirmed close


def client_context(ca: str, cert: str = "", key: str = "") -> ssl.SSLContext:
    """TLS 1.2+, the collector's certificate verified against ``ca`` (the
    system store when empty) and its name against the configured host."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ACK_ALPN, CONFIRM_ALPN])
    try:
        if ca:
            ctx.load_verify_locations(ca)
        else:
            ctx.load_default_certs()
        if cert:
            ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as exc:
        raise RelayError(f"[forward] ca/cert/key: cannot load: {exc}") from None
    return ctx


class TlsLink:
    """TLS through :class:`ssl.SSLObject` over a plain asyncio stream.

    asyncio's own SSL transport closes without waiting for the peer's
    close_notify, which is the only delivery confirmation RFC 5425 offers;
    driving the TLS state machine through memory BIOs lets :meth:`close`
    wait for it.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self._reader, self._writer = reader, writer
        self._tls, self._in, self._out = tls, incoming, outgoing

    @classmethod
    async def open(cls, host: str, port: int, ctx: ssl.SSLContext) -> TlsLink:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                CONNECT_TIMEOUT_S)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=host)
        link = cls(reader, writer, tls, incoming, outgoing)
        try:
            await asyncio.wait_for(link._until_done(tls.do_handshake), CONNECT_TIMEOUT_S)
        except BaseException:
            link.abort()
            raise
        return link

    @property
    def strict(self) -> bool:
        """True when the receiver is relay collector: only close_notify confirms."""
        return self._tls.selected_alpn_protocol() in (CONFIRM_ALPN, ACK_ALPN)

    @property
    def acks(self) -> bool:
        """True when the receiver acknowledges batches on the connection."""
        return self._tls.selected_alpn_protocol() == ACK_ALPN

    async def receive(self, timeout: float) -> bytes:
        """Application data from the receiver (ConnectionError when it closes)."""
        while True:
            try:
                data = self._tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                await self._flush()
                raw = await asyncio.wait_for(self._reader.read(READ_SIZE), timeout)
                if not raw:
                    raise ConnectionError("the collector closed the connection") from None
                self._in.write(raw)
                continue
            if not data:
                raise ConnectionError("the collector closed the connection (close_notify)")
            return data

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            if self._writer.transport.is_closing():
                # The receiver closed while we were writing (uvloop would raise
                # RuntimeError on the write): a refusal like any other.
                raise ConnectionResetError("the collector closed the connection")
            self._writer.write(data)
            await self._writer.drain()

    async def _until_done(self, step: Callable[[], object], eof_ok: bool = False) -> bool:
        """Drive ``step`` to completion; False if it ended by an accepted EOF."""
        while True:
            try:
                step()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self._reader.read(READ_SIZE)
                if not data:
                    if eof_ok:
                        return False
                    raise ConnectionError("the collector closed the connection without "
                                          "TLS close_notify") from None
                self._in.write(data)
        await self._flush()
        return True

    async def send(self, data: bytes) -> None:
        self._tls.write(data)
        await asyncio.wait_for(self._flush(), IO_TIMEOUT_S)

    async def close(self) -> str:
        """Send close_notify and return once the receiver confirms (see the
        module docstring): "close_notify", or "fin" from a stock receiver."""
        strict = self.strict
        done = await asyncio.wait_for(self._until_done(self._tls.unwrap, eof_ok=not strict),
                                      CLOSE_CONFIRM_TIMEOUT_S)
        self._writer.close()
        return "close_notify" if done else "fin"

    def abort(self) -> None:
        self._writer.transport.abort()


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionResetError):
        # With TLS 1.3 a refused client certificate shows up as a reset after
        # the client's side of the handshake has completed.
        return "connection reset by the collector (a refused client certificate? " \
               "see the collector's log)"
    return f"{type(exc).__name__}: {exc.strerror or exc}" if isinstance(exc, OSError) \
        else f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------
# The task


class ForwardSettings(Protocol):
    """What the forwarder needs from ``[forward]`` (relay.config.ForwardConfig)."""

    collector: str
    ca: str
    cert: str
    key: str


Audit = Callable[[dict[str, Any]], None]


class Refused(Exception):
    """The collector took the connection but did not confirm the batch (the
    oldest unconfirmed one, when several were in flight)."""

    def __init__(self, text: str, batch: Batch | None = None) -> None:
        super().__init__(text)
        self.batch = batch


@dataclass
class Batch:
    """Lines of one day from ``start`` up to ``end``, each with its offset."""

    start: Position
    end: Position
    lines: list[tuple[int, bytes]]

    @classmethod
    def of(cls, data: bytes, start: Position, end: Position) -> Batch:
        lines, offset = [], start.offset
        for line in data.split(b"\n")[:-1]:
            lines.append((offset, line))
            offset += len(line) + 1
        return cls(start, end, lines)

    def head(self, n: int) -> Batch:
        """The first ``n`` lines as a batch of their own."""
        if n >= len(self.lines):
            return self
        off, line = self.lines[n - 1]
        return Batch(self.start, Position(self.start.day, off + len(line) + 1), self.lines[:n])

    @property
    def size(self) -> int:
        return sum(len(line) + 1 for _, line in self.lines)

    def rest(self, n: int) -> Batch | None:
        """The lines after the first ``n`` as a batch of their own (None if none)."""
        if n >= len(self.lines):
            return None
        off, _ = self.lines[n]
        return Batch(Position(self.start.day, off), self.end, self.lines[n:])

    def lines_within(self, max_bytes: int) -> int:
        """How many of the first lines fit in ``max_bytes`` (at least one)."""
        total = 0
        for i, (_, line) in enumerate(self.lines):
            total += len(line) + 1
            if total > max_bytes:
                return max(i, 1)
        return len(self.lines)


class Forwarder:
    def __init__(
        self,
        data_dir: Path,
        server_id: str,
        collector: str,
        ctx: ssl.SSLContext,
        audit: Audit,
        *,
        facility: str = syslog5424.DEFAULT_FACILITY,
        backoff_max: float = BACKOFF_MAX_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.reader = LogReader(self.data_dir / SUBDIR)
        self.server_id = server_id
        self.collector = collector
        self.host, self.port = parse_hostport(collector)
        self.ctx = ctx
        self.audit = audit
        self.facility = syslog5424.facility_code(facility)
        self.backoff_max = backoff_max
        self.clock = clock
        self.procid = str(os.getpid())
        self.pos = load_position(self.data_dir)
        # The backlog counted from the files once (in a thread), then kept up
        # as lines are confirmed and the log grows: everything from pos to
        # counted_to is in backlog_bytes/backlog_records.
        self.counted_to = self.pos
        self.status: dict[str, Any] = {
            "collector": collector, "state": "starting", "pid": os.getpid(),
            "last_success": None, "last_success_ts": 0.0, "last_error": None,
            "last_error_time": None, "last_note": None, "consecutive_failures": 0,
            "records_sent": 0, "batches_sent": 0, "set_aside": 0,
            "backlog_records": 0, "backlog_bytes": 0,
        }
        self._status_written = 0.0
        self.failures = 0
        # Isolating a refused record: records per batch, refusals of the
        # current batch, and the end of the batch first refused.
        self.limit: int | None = None
        self.refusals = 0
        self.suspect_end: Position | None = None
        # Set when the probe showed that the collector refuses every record (a
        # full disk, a quota): no more splitting, plain back-off, until it
        # confirms a batch again.
        self.refuses_all = False

    # -- status (kept in memory; the file is for relay ship status) -------------

    async def _write_status(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._status_written < STATUS_INTERVAL_S:
            return
        self._status_written = now
        self.status.update(position=asdict(self.pos), updated=rfc3339_ms(now))
        data = json.dumps(self.status, indent=1).encode()
        await asyncio.to_thread(_write_atomic, ship_dir(self.data_dir) / STATUS_FILE, data)

    async def _set_state(self, state: str) -> None:
        changed = self.status["state"] != state
        self.status["state"] = state
        await self._write_status(force=changed)

    def _note(self, text: str) -> None:
        log.warning("%s", text)
        self.status["last_note"] = f"{rfc3339_ms(self.clock())} {text}"

    def _step(self) -> tuple[bytes, Position, list[Skip], tuple[int, int, Position]]:
        """In a worker thread: the next lines, and what the log grew by."""
        chunk, nxt, skips = self.reader.read(self.pos, BATCH_MAX_BYTES, self.clock())
        return chunk, nxt, skips, self.reader.count(self.counted_to)

    def _grew(self, counted: tuple[int, int, Position]) -> None:
        size, lines, end = counted
        self.status["backlog_bytes"] += size
        self.status["backlog_records"] += lines
        self.counted_to = end

    def _moved(self, to: Position, size: int, lines: int) -> None:
        """The position advanced past ``size`` bytes of ``lines`` lines."""
        self.pos = to
        self.status["backlog_bytes"] = max(0, self.status["backlog_bytes"] - size)
        self.status["backlog_records"] = max(0, self.status["backlog_records"] - lines)
        if self.counted_to < to:
            self.counted_to = to

    def _recount(self) -> None:
        """After a jump of the position (a day gone, a torn line): count again."""
        self.counted_to = self.pos
        self.status["backlog_bytes"] = self.status["backlog_records"] = 0

    # -- formatting and setting aside ---------------------------------------------

    def _message(self, day: str, offset: int, raw: bytes,
                 set_aside: list[dict[str, Any]], sd_fields: bool = True) -> bytes | None:
        """The framed message of one log line, or None with its set-aside entry."""
        where = {"day": day, "offset": offset}
        try:
            record = syslog5424.load_record(raw)
        except syslog5424.SyslogError as exc:
            set_aside.append({"reason": "not-a-record", **where, "detail": str(exc),
                              "line": raw.decode("utf-8", "backslashreplace")})
            return None
        server = record.get("server")
        claimed = server.get("id") if isinstance(server, dict) else None
        if claimed != self.server_id:
            # relay collector files records under the certificate's identity
            # and refuses any other id: sending it would lose it there.
            set_aside.append({"reason": "other-server-id", **where, "record": record,
                              "detail": f"server.id {claimed!r} is not this relay's "
                                        f"{self.server_id!r}"})
            return None
        return syslog5424.frame(syslog5424.format_record(
            record, hostname=self.server_id, procid=self.procid, facility=self.facility,
            sd_fields=sd_fields, as_logged=raw))

    async def _set_aside(self, entries: list[dict[str, Any]]) -> None:
        """Record lines that will not be shipped, once their batch is confirmed
        (so a resent batch does not set them aside twice)."""
        if not entries:
            return
        now = rfc3339_ms(self.clock())
        path = set_aside_path(self.data_dir)
        entries = [{"time": now, **e} for e in entries]
        await asyncio.to_thread(_append_set_aside, path, entries)
        self.status["set_aside"] += len(entries)
        first = entries[0]
        self._note(f"set aside {len(entries)} line(s) of the connection log in {path}, the "
                   f"first at {first['day']}+{first['offset']}: {first['reason']}: "
                   f"{first['detail']}")
        named = [{"id": (e.get("record") or {}).get("id"), "day": e["day"],
                  "offset": e["offset"], "reason": e["reason"]}
                 for e in entries[:AUDIT_SET_ASIDE_MAX]]
        self.audit({"action": "ship-set-aside", "count": len(entries), "records": named,
                    "file": str(path)})

    # -- batches on a connection ---------------------------------------------------

    async def _connect(self) -> TlsLink:
        await self._set_state("connecting")
        link = await TlsLink.open(self.host, self.port, self.ctx)
        await self._set_state("sending")
        return link

    async def _send(self, link: TlsLink, batch: Batch, set_aside: list[dict[str, Any]]) -> int:
        """Write ``batch``'s messages (those that are records of this relay); how many."""
        sent = 0
        lines = batch.lines
        for i in range(0, len(lines), WRITE_CHUNK_RECORDS):
            frames = [m for off, raw in lines[i:i + WRITE_CHUNK_RECORDS]
                      if (m := self._message(batch.start.day, off, raw, set_aside,
                                             sd_fields=not link.acks))]
            if frames:
                await link.send(b"".join(frames))
                sent += len(frames)
        return sent

    async def _ship(self, batch: Batch, set_aside: list[dict[str, Any]],
                    link: TlsLink | None = None) -> tuple[int, str]:
        """Send ``batch`` alone on a connection (``link``, or a new one) and close
        it; the records sent and how the receiver confirmed. Raises
        :class:`Refused` when the collector took the connection but not the
        batch, and the connection error when it could not be reached."""
        link = link or await self._connect()
        try:
            sent = await self._send(link, batch, set_aside)
            if link.acks:
                await link.send(self._mark(1))
                await self._acknowledged(link, syslog5424.AckParser(), 1)
                with contextlib.suppress(OSError, ssl.SSLError, TimeoutError, ConnectionError):
                    await link.close()
                confirmation = "ack"
            else:
                confirmation = await link.close()
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            link.abort()
            raise Refused(describe_error(exc), batch) from exc
        except BaseException:
            link.abort()
            raise
        return sent, confirmation

    def _mark(self, seq: int) -> bytes:
        return syslog5424.batch_mark(seq, hostname=self.server_id, procid=self.procid,
                                     facility=self.facility)

    async def _acknowledged(self, link: TlsLink, acks: syslog5424.AckParser,
                            seq: int) -> list[int]:
        """The acknowledgements that arrive next (at least one), each checked
        against the sequence, starting at ``seq``."""
        while True:
            data = await link.receive(CLOSE_CONFIRM_TIMEOUT_S)
            try:
                got = acks.feed(data)
            except syslog5424.FrameError as exc:
                raise ConnectionError(f"the collector answered {exc}") from None
            if got:
                if got != list(range(seq, seq + len(got))):
                    raise ConnectionError(f"acknowledgements {got} out of order (expected "
                                          f"{seq} next)")
                return got

    async def _stream(self, link: TlsLink, first: Batch, stop_event: asyncio.Event) -> None:
        """Batches on one connection, up to MAX_IN_FLIGHT ahead of their
        acknowledgements, each confirmed in order as its ack arrives; returns
        when the log has nothing more (or a skip needs the main loop) and every
        batch sent is confirmed. Raises :class:`Refused` naming the oldest
        unconfirmed batch when the connection fails."""
        acks = syslog5424.AckParser()
        flights: deque[tuple[int, Batch, int, list[dict[str, Any]]]] = deque()
        seq = 0
        upcoming: Batch | None = first
        try:
            while True:
                while upcoming is not None and len(flights) < MAX_IN_FLIGHT:
                    n = upcoming.lines_within(PIPELINE_BATCH_BYTES)
                    batch, later = upcoming.head(n), upcoming.rest(n)
                    set_aside: list[dict[str, Any]] = []
                    sent = await self._send(link, batch, set_aside)
                    seq += 1
                    await link.send(self._mark(seq))
                    flights.append((seq, batch, sent, set_aside))
                    if later is not None:
                        upcoming = later
                    else:
                        upcoming = None if stop_event.is_set() else await self._following(batch)
                if not flights:
                    break
                for _ in await self._acknowledged(link, acks, flights[0][0]):
                    _, batch, sent, set_aside = flights.popleft()
                    await self._confirmed(batch, sent, "ack", set_aside)
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError, ConnectionError):
                await link.close()
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            link.abort()
            if flights:
                raise Refused(describe_error(exc), flights[0][1]) from exc
            raise
        except BaseException:
            link.abort()
            raise

    async def _following(self, batch: Batch) -> Batch | None:
        """The batch after ``batch`` when the log has one now, within its day and
        with nothing to skip before it (the main loop deals with those)."""
        data, end, skips = await asyncio.to_thread(
            self.reader.read, batch.end, PIPELINE_BATCH_BYTES, self.clock())
        if skips or not data or end.day != batch.end.day:
            return None
        return Batch.of(data, Position(end.day, end.offset - len(data)), end)

    async def _deliver(self, batch: Batch, passed_over: Batch | None = None,
                       link: TlsLink | None = None) -> None:
        """Ship ``batch``; on confirmation advance the position past it (and past
        ``passed_over``, the refused record before it, set aside first)."""
        set_aside: list[dict[str, Any]] = []
        sent, confirmation = await self._ship(batch, set_aside, link)
        if passed_over is not None:
            off, raw = passed_over.lines[0]
            try:
                record: Any = syslog5424.load_record(raw)
            except syslog5424.SyslogError:
                record = None
            set_aside.insert(0, {
                "reason": "refused-by-collector", "day": passed_over.start.day,
                "offset": off, "record": record,
                "detail": f"{REFUSALS_BEFORE_SPLIT} refusals, and the collector confirmed "
                          "the record after it"})
            self._moved(passed_over.end, passed_over.size, len(passed_over.lines))
        await self._confirmed(batch, sent, confirmation, set_aside)

    async def _confirmed(self, batch: Batch, sent: int, confirmation: str,
                         set_aside: list[dict[str, Any]]) -> None:
        """``batch`` is on the collector's disk: the position moves past it."""
        await self._set_aside(set_aside)
        self._moved(batch.end, batch.size, len(batch.lines))
        await asyncio.to_thread(save_position, self.data_dir, batch.end)
        if self.failures:
            log.info("shipping to %s works again", self.collector)
        self.failures = self.refusals = 0
        self.refuses_all = False
        now = self.clock()
        self.status.update(last_success=rfc3339_ms(now), last_success_ts=now,
                           consecutive_failures=0, confirmation=confirmation,
                           records_sent=self.status["records_sent"] + sent,
                           batches_sent=self.status["batches_sent"] + 1)
        await self._write_status()

    def _failed(self, text: str) -> float:
        """Count a failure; the back-off before the next attempt."""
        self.failures += 1
        log.error("shipping to %s", text)
        self.status.update(last_error=text, last_error_time=rfc3339_ms(self.clock()),
                           consecutive_failures=self.failures)
        delay = min(self.backoff_max, BACKOFF_INITIAL_S * 2 ** (self.failures - 1))
        return random.uniform(delay / 2, delay)

    async def _refused(self, batch: Batch) -> None:
        """After a refusal: split the batch, or at one record, probe the next."""
        self.refusals += 1
        if self.refusals < REFUSALS_BEFORE_SPLIT or self.refuses_all:
            return
        self.refusals = 0
        if len(batch.lines) > 1:
            self.limit = len(batch.lines) // 2
            self.suspect_end = self.suspect_end or batch.end
            # Each split is progress towards the record: the back-off starts over.
            self.failures = 0
            self._note(f"the collector refuses a batch of {len(batch.lines)} records from "
                       f"{batch.start.day}+{batch.start.offset}: sending {self.limit} at a "
                       "time to find the record")
            return
        await self._probe(batch)

    async def _probe(self, culprit: Batch) -> None:
        """One record refused again and again: ship the record after it alone. If
        that is confirmed, the collector refuses this record only, and it is set
        aside; if not, the collector refuses everything and nothing is."""
        data, end, skips = await asyncio.to_thread(
            self.reader.read, culprit.end, BATCH_MAX_BYTES, self.clock())
        if skips or not data:
            return  # nothing after it yet (or a jump): try again later
        probe = Batch.of(data, Position(end.day, end.offset - len(data)), end).head(1)
        try:
            await self._deliver(probe, passed_over=culprit)
        except Refused as exc:
            self._note(f"the collector refuses the next record too ({exc}): it refuses "
                       "everything for now; retrying with back-off until it confirms again")
            self._isolated()
            self.refuses_all = True
            return
        self._isolated()

    def _isolated(self) -> None:
        self.limit = None
        self.suspect_end = None
        self.refusals = 0

    # -- the loop -----------------------------------------------------------------

    async def run(self, stop_event: asyncio.Event) -> None:
        await self._set_state("idle")
        try:
            while not stop_event.is_set():
                await self._run_once(stop_event)
        finally:
            self.reader.close()
        await self._set_state("stopped")

    async def _run_once(self, stop_event: asyncio.Event) -> None:
        chunk, nxt, skips, counted = await asyncio.to_thread(self._step)
        self._grew(counted)
        if skips:
            await self._set_aside([s.set_aside for s in skips if s.set_aside is not None])
            for skip in skips:
                self._note(skip.note)
        if not chunk:
            if nxt != self.pos:
                self.pos = nxt
                await asyncio.to_thread(save_position, self.data_dir, nxt)
                self._recount()
            await self._set_state("idle")
            await _wait(stop_event, POLL_INTERVAL_S)
            return
        start = Position(nxt.day, nxt.offset - len(chunk))
        if skips:
            # The lines start past what was skipped: count the backlog again.
            self.pos = start
            await asyncio.to_thread(save_position, self.data_dir, start)
            self._recount()
        batch = Batch.of(chunk, start, nxt)
        if self.limit is not None:
            batch = batch.head(self.limit)
        try:
            link = await self._connect()
            if link.acks and self.limit is None:
                await self._stream(link, batch, stop_event)
            else:  # one batch, alone: a stock receiver, or isolating a refused record
                await self._deliver(batch, link=link)
        except Refused as exc:
            delay = self._failed(f"{self.collector}: batch not confirmed: {exc}")
            await self._refused(exc.batch or batch)
            await self._set_state("backoff")
            await _wait(stop_event, delay if self.failures else BACKOFF_INITIAL_S)
            return
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            delay = self._failed(f"{self.collector}: {describe_error(exc)}")
            await self._set_state("backoff")
            await _wait(stop_event, delay)
            return
        if self.suspect_end is not None and self.suspect_end <= self.pos:
            self._isolated()  # past the refused batch without finding a culprit
        await self._write_status()


async def _wait(stop_event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop_event.wait(), seconds)


def make_forwarder(
    cfg_forward: ForwardSettings,
    data_dir: Path,
    server_id: str,
    audit: Audit,
    *,
    facility: str = syslog5424.DEFAULT_FACILITY,
    backoff_max: float = BACKOFF_MAX_S,
) -> Forwarder:
    """The forwarder of ``[forward]``, or :class:`RelayError` at once for a
    configuration that cannot work (unreadable CA, certificate or key, a client
    certificate whose CN is not ``server_id``, a bad facility)."""
    try:
        syslog5424.facility_code(facility)
        parse_hostport(cfg_forward.collector)
    except ValueError as exc:
        raise RelayError(f"[forward]: {exc}") from None
    if cfg_forward.cert:
        identity = certificate_identity(cfg_forward.cert)
        if identity != server_id:
            raise RelayError(
                f"[forward] cert: the certificate proves the relay id {identity!r} (its "
                f"subject CN), not [server] id {server_id!r}: relay collector would refuse "
                "every record; issue a certificate with CN={server_id}")
    ctx = client_context(cfg_forward.ca, cfg_forward.cert, cfg_forward.key)
    return Forwarder(data_dir, server_id, cfg_forward.collector, ctx, audit,
                     facility=facility, backoff_max=backoff_max)


async def run_forwarder(fwd: Forwarder, stop_event: asyncio.Event) -> None:
    """The shipping task of ``relay serve``; returns when ``stop_event`` is set.
    Network trouble never ends it."""
    log.info("shipping the connection log to %s from %s+%d", fwd.collector,
             fwd.pos.day or "the start", fwd.pos.offset)
    await fwd.run(stop_event)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ship_status(data_dir: Path) -> dict[str, Any]:
    """The forwarder's last status plus the backlog and set-aside lines counted
    now (works while the relay is stopped: the backlog is what the next start
    will send)."""
    data_dir = Path(data_dir)
    try:
        status: dict[str, Any] = json.loads((ship_dir(data_dir) / STATUS_FILE).read_bytes())
    except FileNotFoundError:
        status = {"state": "never-run", "last_success": None, "last_error": None}
    except ValueError:
        status = {"state": "unknown", "last_error": "status.json unreadable"}
    pid = status.get("pid")
    status["running"] = isinstance(pid, int) and _pid_alive(pid) \
        and status.get("state") != "stopped"
    pos = load_position(data_dir)
    status["position"] = asdict(pos)
    status.update(backlog(data_dir, pos))
    status["set_aside"] = set_aside_count(data_dir)
    return status
