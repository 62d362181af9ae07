"""``relay collector``: the central RFC 5425 receiver for many relays.

Layout under COLLECTOR_DIR (directories 0700, files 0600):

- ``<relay-id>/YYYY-MM-DD.jsonl``: the relay's connection-log records, one JSON
  object per line, filed by the record's own day, duplicates removed by record
  ``id`` (at-least-once delivery resends a batch after any failure);
- ``@syslog/<hostname>/YYYY-MM-DD.jsonl``: messages from other syslog senders
  (rsyslog, appliances), filed by arrival day, each as its parsed header
  fields, structured data, MSG and the raw message. ``@`` cannot occur in a
  relay id, so the two never collide.

Delivery confirmation: a relay closes each batch with TLS close_notify; the
collector answers with its own close_notify only after every line of that
connection is written and fdatasync'ed, so an answered close means the batch
is on disk. The collector selects the ALPN id relay.forwarder.CONFIRM_ALPN to
tell the forwarder that it keeps this promise (see relay.forwarder).

Duplicate removal keeps, per relay and day, the set of ids already stored,
rebuilt from the day file when the day is first touched after a start.
Retention (relay.connlog_retention) compresses days older than a day and
deletes days older than ``keep_days`` (at least 90). It runs on the event
loop's thread, between messages, so that no write can race a compression.

Every connection, refusal (failed handshake, missing or untrusted client
certificate) and error is one log line on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from relay import syslog5424
from relay.config import parse_hostport
from relay.connlog import DIR_MODE, FILE_MODE, SUFFIX, ZST_SUFFIX, ensure_dir, rfc3339_ms
from relay.connlog_retention import (
    DEFAULT_COMPRESS_AFTER_DAYS,
    RETENTION_INTERVAL_S,
    apply_retention,
    check_keep_days,
    read_zst,
)
from relay.errors import RelayError
from relay.forwarder import CONFIRM_ALPN
from relay.fsutil import listen_tcp

log = logging.getLogger("relay.collector")

OTHER_SENDERS_DIR = "@syslog"
UNKNOWN = "_unknown"
# Same rule as [server] id, minus the two names a path cannot be.
_RELAY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NOT_NAME = re.compile(r"[^A-Za-z0-9._-]")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_UNSAFE_IN_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Fast path for rebuilding the id sets: our own lines start with the id.
_LEADING_ID = re.compile(rb'^\{"id":"([0-9A-Za-z_-]{1,64})"')

# A TLS handshake that takes longer than this is a stalled or hostile client.
HANDSHAKE_TIMEOUT_S = 15.0
# A connection that sends nothing for an hour is dropped: rsyslog keeps its
# forwarding connection open while idle and reconnects on its next message,
# so this only reclaims connections whose peer vanished without a FIN.
IDLE_TIMEOUT_S = 3600.0
# Open day files (each with its id set) kept between messages; beyond this the
# least recently used is closed (its id set is rebuilt if the day comes back).
MAX_OPEN_DAYS = 256
# Pending connections in the kernel's accept queue (the kernel caps it at
# net.core.somaxconn, 4096 by default since Linux 5.4).
LISTEN_BACKLOG = 1024
# After an accept error (out of file descriptors) wait before trying again.
ACCEPT_ERROR_PAUSE_S = 0.5


def _today(clock: Callable[[], float]) -> str:
    return datetime.fromtimestamp(clock(), UTC).date().isoformat()


def relay_dir_name(server_id: str | None) -> str:
    if server_id and _RELAY_ID.fullmatch(server_id) and server_id not in (".", ".."):
        return server_id
    return UNKNOWN


def host_dir_name(hostname: str | None) -> str:
    name = _NOT_NAME.sub("_", hostname or "")[:64]
    return name if name and name not in (".", "..") else UNKNOWN


class DayFile:
    """One day's file of one sender, with the ids already stored in it."""

    def __init__(self, path: Path, dedup: bool) -> None:
        self.path = path
        self.ids: set[str] | None = self._load_ids() if dedup else None
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                          FILE_MODE)
        size = os.fstat(self.fd).st_size
        if size and os.pread(self.fd, 1, size - 1) != b"\n":
            # Killed mid-write: end the torn line so that it stays one bad
            # line instead of swallowing the next record.
            os.write(self.fd, b"\n")
        self.pending: list[bytes] = []
        self.pending_ids: set[str] = set()
        self.dirty = False

    def _load_ids(self) -> set[str]:
        ids: set[str] = set()
        zst = self.path.with_name(self.path.name[: -len(SUFFIX)] + ZST_SUFFIX)
        blobs = [read_zst(zst)] if zst.exists() else []
        if self.path.exists():
            blobs.append(self.path.read_bytes())
        for blob in blobs:
            for line in blob.splitlines():
                m = _LEADING_ID.match(line)
                if m:
                    ids.add(m.group(1).decode())
                    continue
                try:
                    rid = json.loads(line).get("id")
                except (ValueError, AttributeError):
                    continue
                if isinstance(rid, str):
                    ids.add(rid)
        return ids

    def add(self, line: str, rid: str | None = None) -> bool:
        """Queue ``line``; False if ``rid`` is already stored or queued."""
        if rid is not None and self.ids is not None:
            if rid in self.ids or rid in self.pending_ids:
                return False
            self.pending_ids.add(rid)
        self.pending.append(line.encode() + b"\n")
        return True

    def flush(self) -> None:
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending.clear()
        ids, self.pending_ids = self.pending_ids, set()
        # Ids count as stored only once written: after a failed write the
        # sender's resend must not be dropped as a duplicate.
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        if self.ids is not None:
            self.ids |= ids
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            os.fdatasync(self.fd)
            self.dirty = False

    def close(self) -> None:
        self.flush()
        self.sync()
        os.close(self.fd)


class Store:
    """Day files under the collector directory, opened on demand (LRU)."""

    def __init__(self, root: Path) -> None:
        self.root = ensure_dir(Path(root))
        self._open: OrderedDict[tuple[str, str], DayFile] = OrderedDict()

    def day_file(self, subdir: str, day: str, dedup: bool) -> DayFile:
        key = (subdir, day)
        f = self._open.get(key)
        if f is not None:
            self._open.move_to_end(key)
            return f
        directory = self.root
        for part in Path(subdir).parts:  # each level 0700, not just the last
            directory = directory / part
            if not directory.is_dir():
                ensure_dir(directory)
        f = DayFile(directory / f"{day}{SUFFIX}", dedup)
        self._open[key] = f
        while len(self._open) > MAX_OPEN_DAYS:
            _, old = self._open.popitem(last=False)
            old.close()
        return f

    def flush(self) -> None:
        for f in self._open.values():
            f.flush()

    def sync(self) -> None:
        for f in self._open.values():
            f.flush()
            f.sync()

    def close_days_before(self, day: str) -> None:
        for key in [k for k in self._open if k[1] < day]:
            self._open.pop(key).close()

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def directories(self) -> list[Path]:
        """Every directory that holds day files (relays and other senders)."""
        out = []
        for d in self.root.iterdir():
            if d.name == OTHER_SENDERS_DIR:
                out += [h for h in d.iterdir() if h.is_dir()]
            elif d.is_dir():
                out.append(d)
        return out


class Counts:
    __slots__ = ("duplicates", "other", "records", "rejected")

    def __init__(self) -> None:
        self.records = self.duplicates = self.other = self.rejected = 0


class Collector:
    def __init__(self, data_dir: Path, keep_days: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = Store(Path(data_dir))
        self.keep_days = check_keep_days(keep_days)
        self.clock = clock

    # -- messages (no I/O but the store's writes) ---------------------------

    def message(self, raw: bytes, peer: str, counts: Counts) -> None:
        try:
            msg = syslog5424.parse_message(raw)
        except syslog5424.SyslogError as exc:
            counts.rejected += 1
            self._other(None, raw, peer, str(exc))
            return
        try:
            record = syslog5424.relay_record(msg)
        except syslog5424.SyslogError as exc:
            counts.rejected += 1
            log.warning("%s: relay message stored as plain syslog: %s", peer, exc)
            self._other(msg, raw, peer, str(exc))
            return
        if record is None:
            counts.other += 1
            self._other(msg, raw, peer, None)
            return
        params = msg.sd[syslog5424.SD_ID]
        relay = relay_dir_name(params.get("server.id") or msg.hostname)
        day = str(record.get("time", ""))[:10]
        if not _DAY.fullmatch(day):
            day = _today(self.clock)
        f = self.store.day_file(relay, day, dedup=True)
        # The relay's JSON is stored as sent unless it carries a raw control or
        # line-separator character (not from our forwarder): then re-encoded.
        line = msg.msg if not _UNSAFE_IN_LINE.search(msg.msg) \
            else syslog5424.dumps_json(record)
        if f.add(line, record["id"]):
            counts.records += 1
        else:
            counts.duplicates += 1

    def _other(self, msg: syslog5424.Message | None, raw: bytes, peer: str,
               error: str | None) -> None:
        now = self.clock()
        entry: dict[str, Any] = {"received": rfc3339_ms(now), "peer": peer}
        if msg is not None:
            entry.update(msg.header(), sd=msg.sd, msg=msg.msg)
        if error:
            entry["error"] = error
        entry["raw"] = raw.decode("utf-8", "backslashreplace")
        host = host_dir_name(msg.hostname if msg is not None else None)
        f = self.store.day_file(f"{OTHER_SENDERS_DIR}/{host}", _today(self.clock), dedup=False)
        f.add(syslog5424.dumps_json(entry))

    # -- retention -----------------------------------------------------------

    def retention_pass(self) -> None:
        today = datetime.fromtimestamp(self.clock(), UTC).date()
        cutoff = (today - timedelta(days=DEFAULT_COMPRESS_AFTER_DAYS)).isoformat()
        # Files of days about to be compressed must not stay open for append.
        self.store.close_days_before(cutoff)

        def audit(action: dict[str, Any]) -> None:
            log.info("retention: %s", json.dumps(action))

        for directory in self.store.directories():
            try:
                apply_retention(directory, keep_days=self.keep_days, clock=self.clock,
                                audit=audit)
            except OSError as exc:
                log.error("retention in %s failed: %s", directory, exc)



class Connection(asyncio.Protocol):
    """One sender, after its TLS handshake (if any) succeeded."""

    def __init__(self, collector: Collector, peer: str) -> None:
        self.collector = collector
        self.peer = peer
        self.transport: asyncio.BaseTransport | None = None
        self.parser = syslog5424.FrameParser(syslog5424.COLLECTOR_MAX_MESSAGE_SIZE)
        self.counts = Counts()
        self.outcome = "closed"
        self.last_data = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if transport.get_extra_info("sslcontext") is None:
            log.info("%s: connected (plain TCP)", self.peer)
        else:
            cert = transport.get_extra_info("peercert")
            if cert:
                subject = dict(x[0] for x in cert.get("subject", ()))
                who = f"client certificate CN={subject.get('commonName', '?')}"
            else:
                who = "no client certificate"
            log.info("%s: connected (TLS, %s)", self.peer, who)
        self._start_idle_timer()

    def _start_idle_timer(self) -> None:
        asyncio.get_running_loop().call_later(IDLE_TIMEOUT_S, self._check_idle)

    def _check_idle(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        idle = time.monotonic() - self.last_data
        if idle >= IDLE_TIMEOUT_S:
            self._drop(f"dropped: idle for {IDLE_TIMEOUT_S:.0f}s")
        else:
            asyncio.get_running_loop().call_later(IDLE_TIMEOUT_S - idle, self._check_idle)

    def _drop(self, outcome: str) -> None:
        self.outcome = outcome
        cast(asyncio.Transport, self.transport).abort()

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        try:
            for raw in self.parser.feed(data):
                self.collector.message(raw, self.peer, self.counts)
            self.collector.store.flush()
        except syslog5424.FrameError as exc:
            self.collector.store.flush()
            self._drop(f"dropped: bad framing: {exc}")
        except OSError as exc:
            log.error("%s: cannot store: %s", self.peer, exc)
            self._drop(f"dropped: storage error: {exc}")

    def eof_received(self) -> bool:
        if self.parser.pending:
            log.warning("%s: %d bytes of an incomplete message at close, dropped",
                        self.peer, self.parser.pending)
        try:
            # On disk before the close_notify (sent as the transport closes on
            # returning False) that tells our forwarder so.
            self.collector.store.sync()
        except OSError as exc:
            log.error("%s: cannot sync: %s", self.peer, exc)
            self._drop(f"dropped: storage error: {exc}")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.outcome == "closed":
            self.outcome = f"lost: {type(exc).__name__}: {exc}"
        c = self.counts
        log.info("%s: %s: %d records stored, %d duplicates, %d other messages, "
                 "%d unparsable", self.peer, self.outcome, c.records, c.duplicates, c.other,
                 c.rejected)


async def _accept_loop(listener: socket.socket, collector: Collector,
                       ctx: ssl.SSLContext | None) -> None:
    """Accept by hand so that each handshake's outcome reaches us: an asyncio
    (or uvloop) SSL server drops handshake failures silently outside debug
    mode, and the refusals are what an operator needs to see."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    while True:
        try:
            conn, addr = await loop.sock_accept(listener)
        except OSError as exc:  # EMFILE and the like: say so, do not spin
            log.error("accept failed: %s", exc)
            await asyncio.sleep(ACCEPT_ERROR_PAUSE_S)
            continue
        task = asyncio.ensure_future(_start(loop, conn, f"{addr[0]}:{addr[1]}", collector, ctx))
        pending.add(task)
        task.add_done_callback(pending.discard)


async def _start(loop: asyncio.AbstractEventLoop, conn: socket.socket, peer: str,
                 collector: Collector, ctx: ssl.SSLContext | None) -> None:
    try:
        await loop.connect_accepted_socket(
            lambda: Connection(collector, peer), conn, ssl=ctx,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if ctx else None)
    except (OSError, TimeoutError, ConnectionError) as exc:
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = f"client certificate verify failed: {exc.verify_message}"
        elif isinstance(exc, ssl.SSLError):
            reason = exc.reason or str(exc)
        elif isinstance(exc, TimeoutError):
            reason = f"no handshake within {HANDSHAKE_TIMEOUT_S:.0f}s"
        else:
            reason = f"{type(exc).__name__} {exc}".strip()
        log.warning("%s: refused: TLS handshake failed: %s", peer, reason)
        conn.close()


def server_context(ca: str, cert: str, key: str, require_client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Tells our forwarder that this receiver's close_notify confirms a synced
    # batch; senders that offer no ALPN (rsyslog) are unaffected.
    ctx.set_alpn_protocols([CONFIRM_ALPN])
    try:
        ctx.load_cert_chain(cert, key or None)
        if ca:
            ctx.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as exc:
        raise RelayError(f"collector certificate, key or CA: cannot load: {exc}") from None
    if require_client_cert:
        if not ca:
            raise RelayError("--require-client-cert needs --ca (the CA of the relays' "
                             "client certificates)")
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif ca:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


async def run_collector(
    listen: str,
    data_dir: Path,
    ca: str,
    cert: str,
    key: str,
    require_client_cert: bool,
    keep_days: int,
    plain_listen: str | None = None,
    *,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop_event`` is set (or the task is cancelled)."""
    try:
        host, port = parse_hostport(listen)
        plain = parse_hostport(plain_listen) if plain_listen else None
        check_keep_days(keep_days)
    except ValueError as exc:
        raise RelayError(f"collector: {exc}") from None
    ctx = server_context(ca, cert, key, require_client_cert)
    collector = Collector(Path(data_dir), keep_days)
    os.chmod(collector.store.root, DIR_MODE)
    listeners = [listen_tcp(host, port, LISTEN_BACKLOG)]
    log.info("listening on %s (RFC 5425, TLS%s), storing in %s", listen,
             ", client certificate required" if require_client_cert else "", data_dir)
    if plain:
        listeners.append(listen_tcp(*plain, LISTEN_BACKLOG))
        log.info("listening on %s (plain TCP syslog, for local senders)", plain_listen)
    tasks = [asyncio.ensure_future(_accept_loop(sock, collector, ctx if i == 0 else None))
             for i, sock in enumerate(listeners)]
    stop = stop_event or asyncio.Event()
    try:
        while not stop.is_set():
            collector.retention_pass()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETENTION_INTERVAL_S)
    finally:
        for task in tasks:
            task.cancel()
        for sock in listeners:
            sock.close()
        collector.store.close()
        log.info("collector stopped")
