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
A receiver that dies, resets or times out has not acknowledged: the batch
goes again on the next connection. The cost is one TLS handshake per batch;
the gain is that no record is counted as delivered on TCP's word alone.
Duplicates (at most one batch per failure) carry the same record ``id`` and the
collector drops them.

Two kinds of receiver, told apart by ALPN (:data:`CONFIRM_ALPN`, offered by the
forwarder, selected only by ``relay collector``):

- ``relay collector`` answers close_notify only after the batch is written and
  fdatasync'ed; the forwarder then requires that close_notify, and treats a
  bare FIN as a failure (the collector may have died between reading and
  writing);
- a stock RFC 5425 receiver (rsyslog) reads up to our close_notify and closes
  TCP without answering. There the confirmation is a clean FIN after our
  close_notify: a Linux socket closed with unread data sends RST, not FIN, so
  FIN means the receiver read the whole batch. The records are then as safe as
  the receiver's queue (rsyslog's in-memory main queue by default).

Connection failures back off exponentially with jitter. The status (state,
backlog in records and bytes, last success, last error such as a certificate
verify failure) goes to ``DATA_DIR/ship/status.json``, which
:func:`ship_status` reads from another process (``relay ship status``).
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from relay import syslog5424
from relay.config import parse_hostport
from relay.connlog import SUBDIR, SUFFIX, ZST_SUFFIX, rfc3339_ms
from relay.connlog_retention import read_zst
from relay.errors import RelayError
from relay.fsutil import write_atomic

log = logging.getLogger("relay.forwarder")

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
# Status writes are rate-limited (errors and state changes are not): counting
# the backlog reads the log.
STATUS_INTERVAL_S = 1.0
# Counting backlog records reads the log; beyond this many bytes the count is
# extrapolated from the average line length and flagged as an estimate.
BACKLOG_COUNT_BYTES = 64 << 20
# A day file whose last line has no LF is being written, unless a later day
# exists and the file has not changed for this long: then a crash tore it and
# the forwarder moves on (reporting it).
TORN_TAIL_GRACE_S = 10.0
READ_SIZE = 65536
# ALPN protocol id by which relay collector says "my close_notify means your
# batch is on disk" (a private id: ALPN has no registered one for syslog).
CONFIRM_ALPN = "x-relay-syslog-confirm"


@dataclass(frozen=True)
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
# Reading the log from a position


def _day_sources(connlog_dir: Path) -> dict[str, Path]:
    """day -> file, the plain one while retention has both for a moment."""
    out: dict[str, Path] = {}
    if not connlog_dir.is_dir():
        return out
    for p in connlog_dir.iterdir():
        if p.name.endswith(SUFFIX) and len(p.name) == 10 + len(SUFFIX):
            out[p.name[:10]] = p
        elif p.name.endswith(ZST_SUFFIX) and len(p.name) == 10 + len(ZST_SUFFIX):
            out.setdefault(p.name[:10], p)
    return out


def _read_day(path: Path, offset: int, size: int) -> bytes:
    if path.name.endswith(ZST_SUFFIX):
        return read_zst(path)[offset:offset + size]
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def read_lines(
    connlog_dir: Path, pos: Position, max_bytes: int, now: float
) -> tuple[bytes, Position, list[str]]:
    """Complete lines after ``pos`` (at most ``max_bytes``), the position after
    them, and notes on anything skipped (a missing day, a torn line)."""
    notes: list[str] = []
    while True:
        sources = _day_sources(connlog_dir)
        if not sources:
            return b"", pos, notes
        days = sorted(sources)
        if not pos.day:
            pos = Position(days[0], 0)
        later = [d for d in days if d > pos.day]
        if pos.day not in sources:
            if not later:
                return b"", pos, notes
            notes.append(f"connection log of {pos.day} is gone before it was shipped")
            pos = Position(later[0], 0)
            continue
        path = sources[pos.day]
        try:
            data = _read_day(path, pos.offset, max_bytes)
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue  # retention replaced the plain file by its .zst meanwhile
        end = data.rfind(b"\n")
        if end >= 0:
            return data[:end + 1], Position(pos.day, pos.offset + end + 1), notes
        if len(data) >= max_bytes:
            notes.append(f"{path}: line longer than {max_bytes} bytes at offset "
                         f"{pos.offset} skipped")
            return b"", Position(pos.day, pos.offset + len(data)), notes
        if later and (not data or now - mtime > TORN_TAIL_GRACE_S):
            if data:
                notes.append(f"{path}: torn last line ({len(data)} bytes) skipped")
            pos = Position(later[0], 0)
            continue
        return b"", pos, notes


def backlog(data_dir: Path, pos: Position) -> dict[str, Any]:
    """Records and bytes not yet acknowledged by the collector."""
    sources = _day_sources(Path(data_dir) / SUBDIR)
    total = counted = lines = 0
    for day in sorted(sources):
        if pos.day and day < pos.day:
            continue
        path = sources[day]
        start = pos.offset if day == pos.day else 0
        try:
            if path.name.endswith(ZST_SUFFIX):
                data = read_zst(path)[start:]
                total += len(data)
                if counted < BACKLOG_COUNT_BYTES:
                    lines += data.count(b"\n")
                    counted += len(data)
                continue
            size = max(path.stat().st_size - start, 0)
            total += size
            with open(path, "rb") as f:
                f.seek(start)
                while counted < BACKLOG_COUNT_BYTES and (chunk := f.read(1 << 20)):
                    lines += chunk.count(b"\n")
                    counted += len(chunk)
        except FileNotFoundError:
            continue
    estimated = counted < total
    records = round(lines * total / counted) if estimated and counted else lines
    return {"backlog_records": records, "backlog_bytes": total,
            "backlog_estimated": estimated}


# ---------------------------------------------------------------------------
# TLS with a confirmed close


def client_context(ca: str, cert: str = "", key: str = "") -> ssl.SSLContext:
    """TLS 1.2+, the collector's certificate verified against ``ca`` (the
    system store when empty) and its name against the configured host."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([CONFIRM_ALPN])
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
        return self._tls.selected_alpn_protocol() == CONFIRM_ALPN

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
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


class Forwarder:
    def __init__(
        self,
        data_dir: Path,
        server_id: str,
        collector: str,
        ctx: ssl.SSLContext,
        *,
        facility: str = syslog5424.DEFAULT_FACILITY,
        backoff_max: float = BACKOFF_MAX_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.connlog_dir = self.data_dir / SUBDIR
        self.server_id = server_id
        self.collector = collector
        self.host, self.port = parse_hostport(collector)
        self.ctx = ctx
        self.facility = syslog5424.facility_code(facility)
        self.backoff_max = backoff_max
        self.clock = clock
        self.procid = str(os.getpid())
        self.pos = load_position(self.data_dir)
        self.status: dict[str, Any] = {
            "collector": collector, "state": "starting", "pid": os.getpid(),
            "last_success": None, "last_error": None, "last_error_time": None,
            "last_note": None, "consecutive_failures": 0, "records_sent": 0,
            "batches_sent": 0, "skipped_lines": 0,
        }
        self._status_written = 0.0

    def _write_status(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._status_written < STATUS_INTERVAL_S:
            return
        self._status_written = now
        self.status.update(position=asdict(self.pos), updated=rfc3339_ms(now),
                           **backlog(self.data_dir, self.pos))
        _write_atomic(ship_dir(self.data_dir) / STATUS_FILE,
                      json.dumps(self.status, indent=1).encode())

    def _set_state(self, state: str) -> None:
        changed = self.status["state"] != state
        self.status["state"] = state
        self._write_status(force=changed)

    def _note(self, text: str) -> None:
        log.warning("%s", text)
        self.status["last_note"] = f"{rfc3339_ms(self.clock())} {text}"

    def _messages(self, lines: list[bytes]) -> list[bytes]:
        out = []
        for raw in lines:
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                self.status["skipped_lines"] += 1
                self._note(f"connection-log line at {self.pos.day} is not a JSON object: "
                           "not shipped")
                continue
            out.append(syslog5424.frame(syslog5424.format_record(
                record, hostname=self.server_id, procid=self.procid, facility=self.facility)))
        return out

    async def _ship(self, chunk: bytes) -> tuple[int, str]:
        lines = chunk.split(b"\n")[:-1]
        self._set_state("connecting")
        link = await TlsLink.open(self.host, self.port, self.ctx)
        try:
            self._set_state("sending")
            sent = 0
            for i in range(0, len(lines), WRITE_CHUNK_RECORDS):
                frames = self._messages(lines[i:i + WRITE_CHUNK_RECORDS])
                await link.send(b"".join(frames))
                sent += len(frames)
            confirmation = await link.close()
        except BaseException:
            link.abort()
            raise
        return sent, confirmation

    async def run(self, stop_event: asyncio.Event) -> None:
        failures = 0
        self._set_state("idle")
        while not stop_event.is_set():
            chunk, nxt, notes = read_lines(self.connlog_dir, self.pos, BATCH_MAX_BYTES,
                                           self.clock())
            for text in notes:
                self._note(text)
            if not chunk:
                if nxt != self.pos:
                    self.pos = nxt
                    save_position(self.data_dir, nxt)
                self._set_state("idle")
                await _wait(stop_event, POLL_INTERVAL_S)
                continue
            try:
                sent, confirmation = await self._ship(chunk)
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
                failures += 1
                text = f"{self.collector}: {describe_error(exc)}"
                log.error("shipping to %s", text)
                self.status.update(last_error=text, last_error_time=rfc3339_ms(self.clock()),
                                   consecutive_failures=failures)
                delay = min(self.backoff_max, BACKOFF_INITIAL_S * 2 ** (failures - 1))
                self._set_state("backoff")
                await _wait(stop_event, random.uniform(delay / 2, delay))
                continue
            self.pos = nxt
            save_position(self.data_dir, nxt)
            if failures:
                log.info("shipping to %s works again", self.collector)
            failures = 0
            self.status.update(last_success=rfc3339_ms(self.clock()), consecutive_failures=0,
                               confirmation=confirmation,
                               records_sent=self.status["records_sent"] + sent,
                               batches_sent=self.status["batches_sent"] + 1)
            self._write_status()
        self._set_state("stopped")


async def _wait(stop_event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop_event.wait(), seconds)


async def run_forwarder(
    cfg_forward: ForwardSettings,
    data_dir: Path,
    server_id: str,
    stop_event: asyncio.Event,
    *,
    facility: str = syslog5424.DEFAULT_FACILITY,
    backoff_max: float = BACKOFF_MAX_S,
) -> None:
    """The shipping task of ``relay serve``; returns when ``stop_event`` is set.

    Raises :class:`RelayError` at once for a configuration that cannot work
    (unreadable CA, certificate or key, bad facility); network trouble never
    ends it.
    """
    if not cfg_forward.collector:
        return
    try:
        syslog5424.facility_code(facility)
        parse_hostport(cfg_forward.collector)
    except ValueError as exc:
        raise RelayError(f"[forward]: {exc}") from None
    ctx = client_context(cfg_forward.ca, cfg_forward.cert, cfg_forward.key)
    fwd = Forwarder(data_dir, server_id, cfg_forward.collector, ctx, facility=facility,
                    backoff_max=backoff_max)
    log.info("shipping the connection log to %s from %s+%d", cfg_forward.collector,
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
    """The forwarder's last status plus the backlog counted now (works while
    the relay is stopped: the backlog is what the next start will send)."""
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
    return status
