"""``relay collector``: the central RFC 5425 receiver for many relays.

Layout under COLLECTOR_DIR (directories 0700, files 0600):

- ``<relay-id>/YYYY-MM-DD.jsonl``: the relay's connection-log records, one JSON
  object per line, filed by the record's own day, duplicates removed by record
  ``id`` (at-least-once delivery resends a batch after any failure);
- ``@chain/<relay-id>.jsonl``: the SHA-256 chain (relay/chain.py) of what was
  stored for that relay: a link each time a day is compressed (its digest over
  the uncompressed content, late records merged in) and each time retention
  deletes one; ``relay collector verify`` checks the day files against it;
- ``@syslog/<hostname>/YYYY-MM-DD.jsonl``: with ``--accept-syslog`` only,
  messages from other syslog senders (rsyslog, appliances), filed by arrival
  day, each as its parsed header fields, structured data, MSG and the raw
  message. ``@`` cannot occur in a relay id, so none of these collide.

Identity comes from certificates, never from what a message claims. A sender
presents a client certificate from ``--ca`` (required unless
``--allow-no-client-cert``); its subject CN, when it follows the [server] id
rule, is the relay id it speaks for (relay.tlsconf.identity_of_names). Its
records are filed under that id only: a record whose ``server.id`` is another
is refused (stored under neither), so a sender can only ever write, and
de-duplicate against, its own store. A record's day is its own ``time`` unless
that lies more than :data:`FUTURE_SKEW_S` ahead or further back than the
retention: then it is filed under the day it arrived, with an ``out_of_window``
field (retention could otherwise never delete it). Each identity (or, without
one, each address) may store :data:`DEFAULT_QUOTA_BYTES_PER_DAY` a day; past
that, records are refused and the batch is not confirmed, so the relay keeps
them and sends them again later. Plain syslog (messages that are not relay
records) is refused unless ``--accept-syslog``.

Delivery confirmation: with a forwarder that offers the ALPN id
relay.connlog.forwarder.ACK_ALPN, the collector answers each batch mark on the
connection with an acknowledgement, after every line before it is written and
fdatasync'ed (relay.protocols.syslog5424, "Batch confirmations"), so several
batches are in flight at once. With one that offers only CONFIRM_ALPN, a relay
closes each batch with TLS close_notify, and the collector answers with its own
close_notify only after every line of that connection is written and
fdatasync'ed, so an answered close means the batch is on disk (see
relay.connlog.forwarder).

Duplicate removal keeps, per relay and day, the set of ids already stored,
rebuilt from the day file when the day is first touched after a start.
Retention (relay.connlog.retention) compresses days older than a day and
deletes days older than ``keep_days`` (at least 90). It runs on the event
loop's thread, between messages, so that no write can race a compression.

Every connection, refusal (failed handshake, missing or untrusted client
certificate) and error is one log line on stderr; what a connection delivered
and what was refused of it is one line when it ends, never one per record.
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
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any, cast

from relay import chain
from relay.central import fleet
from relay.central.store import (
    LOAD_INTERVAL_S,
    Loader,
    StoreError,
    StoreSettings,
    create_schema,
    open_backend,
)
from relay.chain import Report, check_links
from relay.config import parse_hostport
from relay.connlog import reader
from relay.connlog.daylog import DIR_MODE, SUFFIX, ensure_dir, open_for_append
from relay.connlog.forwarder import ACK_ALPN, CONFIRM_ALPN
from relay.connlog.retention import (
    DEFAULT_COMPRESS_AFTER_DAYS,
    RETENTION_INTERVAL_S,
    apply_retention,
    check_keep_days,
)
from relay.errors import RelayError
from relay.fsutil import listen_tcp
from relay.protocols import syslog5424
from relay.times import parse_rfc3339, rfc3339_ms, utc_date
from relay.tlsconf import peer_identity

log = logging.getLogger("relay.central.collector")

OTHER_SENDERS_DIR = "@syslog"
CHAIN_DIR = "@chain"
UNKNOWN = "_unknown"
_NOT_NAME = re.compile(r"[^A-Za-z0-9._-]")
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
# A record is filed by its own day unless its time is more than this ahead of
# the collector's clock (relays stamp records as they happen, in UTC: a day
# ahead is a broken clock or a forgery, and a far-future day would outlive
# retention) or older than the retention (it would be deleted at once).
FUTURE_SKEW_S = 86400.0
# Bytes a sender (its certificate's identity, else its address) may store per
# UTC day. A relay's connection log is about 1 MB a day per thousand sessions
# (two records of ~500 bytes each); 1 GiB is a thousand times a busy relay's and
# a quarter of journald's default ceiling for a whole host's journal
# (SystemMaxUse, at most 4 GiB), so a stolen key cannot fill the disk.
DEFAULT_QUOTA_BYTES_PER_DAY = 1 << 30
# Hours whose start _day remembers: a day and a half of records arriving, late
# ones included; past it the cache starts again.
UTC_HOURS_CACHED = 36
_HOUR = len("YYYY-MM-DDTHH")
_UTC_MS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")
_UTC_MS_TAIL = re.compile(r":[0-5]\d:[0-5]\d\.\d{3}Z\Z")


def _storable_as_sent(text: str) -> bool:
    """Whether a record's JSON (already parsed: syslog5424.load_record) holds no
    raw control or line-separator character. Valid JSON can hold in ASCII only
    the whitespace between tokens and DEL in a string (RFC 8259 forbids the
    other controls there), so ASCII text is checked for those four alone."""
    if text.isascii():
        return not ("\n" in text or "\r" in text or "\t" in text or "\x7f" in text)
    return _UNSAFE_IN_LINE.search(text) is None


def _today(clock: Callable[[], float]) -> str:
    return utc_date(clock()).isoformat()


def host_dir_name(hostname: str | None) -> str:
    name = _NOT_NAME.sub("_", hostname or "")[:64]
    return name if name and name not in (".", "..") else UNKNOWN


class DayFile:
    """One day's file of one sender, with the ids already stored in it."""

    def __init__(self, path: Path, dedup: bool) -> None:
        self.path = path
        self.ids: set[str] | None = self._load_ids() if dedup else None
        self.fd = open_for_append(path)
        self.pending: list[bytes] = []
        self.pending_ids: set[str] = set()
        self.dirty = False

    def has(self, rid: str) -> bool:
        return self.ids is not None and (rid in self.ids or rid in self.pending_ids)

    def _load_ids(self) -> set[str]:
        """The ids of the day's stored records (its .zst and plain file). A torn
        last line is not a stored record (relay/connlog/reader.py's rule): its
        sender never had it confirmed and sends it again, which must not be
        dropped as a duplicate."""
        ids: set[str] = set()
        day = reader.day_in(self.path.parent, self.path.name[: -len(SUFFIX)])
        for _, _, line in reader.lines(day):
            m = _LEADING_ID.match(line)
            if m:
                ids.add(m.group(1).decode())
                continue
            try:
                rid = json.loads(line).get("id")
            except (ValueError, RecursionError, AttributeError):
                continue
            if isinstance(rid, str):
                ids.add(rid)
        return ids

    def add(self, line: bytes, rid: str | None = None) -> None:
        """Queue ``line`` (its record's id, if any, checked with :meth:`has`)."""
        if rid is not None and self.ids is not None:
            self.pending_ids.add(rid)
        self.pending.append(line + b"\n")

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
    """Day files under the collector directory, opened on demand (LRU).
    ``on_synced(subdir, day)`` hears of each day file synced with new lines."""

    def __init__(self, root: Path,
                 on_synced: Callable[[str, str], None] | None = None) -> None:
        self.root = ensure_dir(Path(root))
        self._open: OrderedDict[tuple[str, str], DayFile] = OrderedDict()
        self.on_synced = on_synced

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
            self._close(*self._open.popitem(last=False))
        return f

    def _close(self, key: tuple[str, str], f: DayFile) -> None:
        f.close()
        if self.on_synced is not None:
            self.on_synced(*key)

    def flush(self) -> None:
        for f in self._open.values():
            f.flush()

    def sync(self) -> None:
        for key, f in self._open.items():
            f.flush()
            if f.dirty:
                f.sync()
                if self.on_synced is not None:
                    self.on_synced(*key)

    def close_days_before(self, day: str) -> None:
        for key in [k for k in self._open if k[1] < day]:
            self._close(key, self._open.pop(key))

    def close(self) -> None:
        for key, f in self._open.items():
            self._close(key, f)
        self._open.clear()

    def relay_directories(self) -> list[Path]:
        """The directories of relays (each with its chain)."""
        return [d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("@")]

    def syslog_directories(self) -> list[Path]:
        other = self.root / OTHER_SENDERS_DIR
        return [h for h in other.iterdir() if h.is_dir()] if other.is_dir() else []


def chain_file(root: Path, relay: str) -> Path:
    return Path(root) / CHAIN_DIR / f"{relay}.jsonl"


class Counts:
    """What one connection delivered and what was refused of it."""

    __slots__ = ("duplicates", "no_identity", "other", "out_of_window", "over_quota",
                 "records", "rejected", "syslog_refused", "wrong_id")

    def __init__(self) -> None:
        self.records = self.duplicates = self.other = self.rejected = 0
        self.wrong_id = self.no_identity = self.over_quota = self.syslog_refused = 0
        self.out_of_window = 0

    def summary(self) -> str:
        text = (f"{self.records} records stored, {self.duplicates} duplicates, "
                f"{self.other} other messages, {self.rejected} unparsable")
        for count, what in (
                (self.wrong_id, "refused: claimed another relay id"),
                (self.no_identity, "refused: relay records without a relay certificate"),
                (self.over_quota, "refused: over the daily quota"),
                (self.syslog_refused, "refused: plain syslog (no --accept-syslog)"),
                (self.out_of_window, "filed under the receive day (time out of window)")):
            if count:
                text += f", {count} {what}"
        return text


class Quota:
    """Bytes stored per sender per UTC day (in memory: a restart forgives)."""

    def __init__(self, bytes_per_day: int, clock: Callable[[], float]) -> None:
        self.limit = bytes_per_day
        self.clock = clock
        self.used: dict[str, tuple[str, int]] = {}
        # The UTC day of the clock, kept while the clock stays in it.
        self._day_start = -1.0
        self._today = ""

    def take(self, sender: str, size: int) -> bool:
        now = self.clock()
        if not self._day_start <= now < self._day_start + 86400:
            self._day_start = now - now % 86400
            self._today = _today(lambda: now)
        today = self._today
        day, used = self.used.get(sender, (today, 0))
        if day != today:
            used = 0
        if used + size > self.limit:
            if used <= self.limit:  # once per sender and day
                log.warning("%s: over the daily quota of %d bytes: refusing its records "
                            "until %s ends (UTC)", sender, self.limit, today)
                self.used[sender] = (today, self.limit + 1)
            return False
        self.used[sender] = (today, used + size)
        return True


class Collector:
    def __init__(self, data_dir: Path, keep_days: int, *, accept_syslog: bool = False,
                 quota_bytes_per_day: int = DEFAULT_QUOTA_BYTES_PER_DAY,
                 clock: Callable[[], float] = time.time,
                 on_synced: Callable[[str, str], None] | None = None) -> None:
        self.store = Store(Path(data_dir), on_synced)
        self.keep_days = check_keep_days(keep_days)
        self.accept_syslog = accept_syslog
        self.quota = Quota(quota_bytes_per_day, clock)
        self.clock = clock
        # "YYYY-MM-DDTHH" -> epoch seconds of that UTC hour, for _day.
        self._utc_times: dict[str, float] = {}

    # -- messages (no I/O but the store's writes) ---------------------------

    def message(self, raw: bytes, peer: str, counts: Counts, identity: str | None) -> None:
        """Store or refuse one message from ``peer``, whose certificate proved
        ``identity`` (None: no certificate, or not a relay's)."""
        if identity is not None and (lean := syslog5424.lean_relay_record(raw)) is not None:
            self._record(*lean, identity, counts)
            return
        try:
            msg = syslog5424.parse_message(raw)
        except syslog5424.SyslogError as exc:
            counts.rejected += 1
            self._other(None, raw, peer, identity, str(exc), counts)
            return
        try:
            record = syslog5424.relay_record(msg)
        except syslog5424.SyslogError as exc:
            counts.rejected += 1
            self._other(msg, raw, peer, identity, str(exc), counts)
            return
        if record is None:
            self._other(msg, raw, peer, identity, None, counts)
            return
        if identity is None:
            counts.no_identity += 1
            return
        self._record(record, msg.msg, identity, counts)

    def _record(self, record: dict[str, Any], text: str, identity: str,
                counts: Counts) -> None:
        """Store a relay record (``text``, its JSON as sent) of ``identity``."""
        server = record.get("server")
        if not isinstance(server, dict) or server.get("id") != identity:
            counts.wrong_id += 1
            return
        day, out_of_window = self._day(record)
        f = self.store.day_file(identity, day, dedup=True)
        if f.has(record["id"]):
            counts.duplicates += 1
            return
        if out_of_window:
            record = {**record, "out_of_window": out_of_window}
            line = syslog5424.dumps_json(record)
        else:
            # The relay's JSON is stored as sent unless it carries a raw control
            # or line-separator character (not from our forwarder): then re-encoded.
            line = text if _storable_as_sent(text) else syslog5424.dumps_json(record)
        data = line.encode()
        if not self.quota.take(identity, len(data) + 1):
            counts.over_quota += 1
            return
        f.add(data, record["id"])
        counts.records += 1
        counts.out_of_window += bool(out_of_window)

    def _day(self, record: dict[str, Any]) -> tuple[str, dict[str, str] | None]:
        """The UTC day to file a record under, and why not its own when not."""
        now = self.clock()
        text = str(record.get("time"))
        when = self._utc_times.get(text[:_HOUR])
        if when is not None and _UTC_MS_TAIL.match(text, _HOUR):
            # The relays' own form (YYYY-MM-DDTHH:MM:SS.mmmZ): its hour looked
            # up, not parsed again for every record.
            ts = when + int(text[14:16]) * 60 + int(text[17:19]) + int(text[20:23]) / 1000
            day = text[:10]
        else:
            try:
                dt = parse_rfc3339(text)
            except ValueError:
                return self._received(now, "time is not RFC 3339")
            ts, day = dt.timestamp(), dt.astimezone(UTC).date().isoformat()
            if _UTC_MS.match(text):
                if len(self._utc_times) >= UTC_HOURS_CACHED:
                    self._utc_times.clear()
                self._utc_times[text[:_HOUR]] = ts - (ts % 3600)
        if ts > now + FUTURE_SKEW_S:
            return self._received(now, f"time more than {FUTURE_SKEW_S / 3600:.0f} h in the "
                                       "future")
        if ts < now - self.keep_days * 86400:
            return self._received(now, f"time older than the retention of {self.keep_days} "
                                       "days")
        return day, None

    def _received(self, now: float, reason: str) -> tuple[str, dict[str, str]]:
        return utc_date(now).isoformat(), {"received": rfc3339_ms(now), "reason": reason}

    def _other(self, msg: syslog5424.Message | None, raw: bytes, peer: str,
               identity: str | None, error: str | None, counts: Counts) -> None:
        """A message that is not a relay record: stored as plain syslog with
        --accept-syslog, else refused."""
        if not self.accept_syslog:
            counts.syslog_refused += msg is not None and error is None
            return
        now = self.clock()
        entry: dict[str, Any] = {"received": rfc3339_ms(now), "peer": peer,
                                 "identity": identity}
        if msg is not None:
            entry.update(msg.header(), sd=msg.sd, msg=msg.msg)
        if error:
            entry["error"] = error
        entry["raw"] = raw.decode("utf-8", "backslashreplace")
        data = syslog5424.dumps_json(entry).encode()
        if not self.quota.take(identity or peer.rsplit(":", 1)[0], len(data) + 1):
            counts.over_quota += 1
            return
        host = host_dir_name(msg.hostname if msg is not None else None)
        f = self.store.day_file(f"{OTHER_SENDERS_DIR}/{host}", _today(self.clock), dedup=False)
        f.add(data)
        counts.other += error is None

    # -- retention -----------------------------------------------------------

    def retention_pass(self) -> None:
        today = utc_date(self.clock())
        cutoff = (today - timedelta(days=DEFAULT_COMPRESS_AFTER_DAYS)).isoformat()
        # Files of days about to be compressed must not stay open for append.
        self.store.close_days_before(cutoff)

        def audit(action: dict[str, Any]) -> None:
            log.info("retention: %s", json.dumps(action))

        dirs = [(d, chain_file(self.store.root, d.name)) for d in self.store.relay_directories()]
        dirs += [(d, None) for d in self.store.syslog_directories()]
        for directory, chained in dirs:
            try:
                apply_retention(directory, keep_days=self.keep_days, clock=self.clock,
                                audit=audit, chain_file=chained, seal="compression")
            except OSError as exc:
                log.error("retention in %s failed: %s", directory, exc)


def verify(root: Path) -> Report:
    """Check every relay's day files against its chain: modified, missing,
    truncated, reordered and unchained days, and broken links."""
    root = Path(root)
    if not root.is_dir():
        raise RelayError(f"{root}: not a directory")
    report = Report()
    chains = root / CHAIN_DIR
    relays = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("@")}
    if chains.is_dir():
        relays |= {p.name[: -len(SUFFIX)] for p in chains.iterdir() if p.name.endswith(SUFFIX)}
    for relay in sorted(relays):
        links = chain.read_links(chain_file(root, relay))
        check_links(links, f"{relay} chain", report)
        expected = chain.sealed_days(links)
        by_digest = chain.by_digest(expected)
        days = reader.days(root / relay)
        for day in days:
            where = f"{relay}/{day.name}"
            report.checked["collector days"] += 1
            if day.zst is None:
                if day.name in expected:  # sealed, then decompressed by hand
                    chain.compare(report, where, chain.file_digest(day.source),
                                  expected[day.name], by_digest)
                else:
                    report.notes.append(f"{where}: not sealed yet (sealed when compressed)")
                continue
            got = chain.content_digest(reader.uncompressed(day.zst))
            if not chain.check_file(report, where, got, expected.get(day.name), by_digest):
                report.problem("unchained", where, "compressed but has no chain link: not "
                                                   "stored by this collector, or its link "
                                                   "was removed")
            if day.plain is not None:
                report.notes.append(f"{where}: late records, sealed when merged at the "
                                    "next retention pass")
        for name in sorted(set(expected) - {day.name for day in days}):
            report.problem("missing", f"{relay}/{name}", "chained but not in the directory")
    return report


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
        self.identity: str | None = None
        # Under ACK_ALPN: batch marks are answered with acks (syslog5424's
        # "Batch confirmations").
        self.acks = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if transport.get_extra_info("sslcontext") is None:
            log.info("%s: connected (plain TCP)", self.peer)
        else:
            tls = transport.get_extra_info("ssl_object")
            self.acks = tls is not None and tls.selected_alpn_protocol() == ACK_ALPN
            cert = transport.get_extra_info("peercert")
            self.identity = peer_identity(cert)
            if cert:
                cns = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
                who = f"client certificate CN={','.join(cns) or '?'}, " + (
                    f"relay {self.identity}" if self.identity else "not a relay id")
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
                if self.acks and (seq := syslog5424.batch_seq(raw)) is not None:
                    if not self._confirm(seq):
                        return
                    continue
                self.collector.message(raw, self.peer, self.counts, self.identity)
            self.collector.store.flush()
        except syslog5424.FrameError as exc:
            self.collector.store.flush()
            self._drop(f"dropped: bad framing: {exc}")
        except OSError as exc:
            log.error("%s: cannot store: %s", self.peer, exc)
            self._drop(f"dropped: storage error: {exc}")

    def _confirm(self, seq: int) -> bool:
        """Batch ``seq`` ended: on disk, then acknowledged; False when the
        connection is dropped instead (the batch is not confirmed)."""
        self.collector.store.sync()
        if self.counts.over_quota:
            # As at a close: the relay keeps the refused records and sends them again.
            self._drop("not confirmed: over the daily quota")
            return False
        cast(asyncio.Transport, self.transport).write(syslog5424.format_ack(seq))
        return True

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
        if self.counts.over_quota:
            # No close_notify: the batch is not confirmed, so the relay keeps
            # the refused records and sends them again (the rest are duplicates).
            self._drop("not confirmed: over the daily quota")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.outcome == "closed":
            self.outcome = f"lost: {type(exc).__name__}: {exc}"
        who = f" ({self.identity})" if self.identity else ""
        log.info("%s%s: %s: %s", self.peer, who, self.outcome, self.counts.summary())


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


def server_context(ca: str, cert: str, key: str, client_cert_optional: bool) -> ssl.SSLContext:
    """TLS 1.2+; client certificates from ``ca`` required (optional only for
    plain-syslog senders, see run_collector)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Tells our forwarder that this receiver acknowledges each synced batch
    # on the connection (ACK_ALPN), or, for a forwarder that offers only the
    # older id, that its close_notify confirms a synced batch; senders that
    # offer no ALPN (rsyslog) are unaffected. The first of these the client
    # offers is selected.
    ctx.set_alpn_protocols([ACK_ALPN, CONFIRM_ALPN])
    if not ca:
        raise RelayError("collector: --ca is required: the CA of the relays' client "
                         "certificates, whose CN is the relay id")
    try:
        ctx.load_cert_chain(cert, key or None)
        ctx.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as exc:
        raise RelayError(f"collector certificate, key or CA: cannot load: {exc}") from None
    ctx.verify_mode = ssl.CERT_OPTIONAL if client_cert_optional else ssl.CERT_REQUIRED
    return ctx


async def run_collector(
    listen: str,
    data_dir: Path,
    ca: str,
    cert: str,
    key: str,
    keep_days: int,
    *,
    plain_listen: str | None = None,
    accept_syslog: bool = False,
    allow_no_client_cert: bool = False,
    quota_bytes_per_day: int = DEFAULT_QUOTA_BYTES_PER_DAY,
    store: StoreSettings | None = None,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop_event`` is set (or the task is cancelled).

    Senders without a certificate (``allow_no_client_cert``, and the plain TCP
    listener) have no relay identity: only plain syslog is taken from them, so
    both need ``accept_syslog``.
    """
    try:
        host, port = parse_hostport(listen)
        plain = parse_hostport(plain_listen) if plain_listen else None
        check_keep_days(keep_days)
    except ValueError as exc:
        raise RelayError(f"collector: {exc}") from None
    if (plain or allow_no_client_cert) and not accept_syslog:
        raise RelayError("collector: --plain-listen and --allow-no-client-cert take senders "
                         "without a relay certificate, which can only send plain syslog: "
                         "add --accept-syslog")
    if quota_bytes_per_day <= 0:
        raise RelayError("collector: the quota must be positive")
    ctx = server_context(ca, cert, key, allow_no_client_cert)
    store = store or StoreSettings()
    ensure_dir(Path(data_dir))
    os.chmod(data_dir, DIR_MODE)
    backend = await asyncio.to_thread(open_backend, Path(data_dir), store)
    try:
        await asyncio.to_thread(create_schema, backend, keep_days, store.cluster)
    except StoreError as exc:
        backend.close()
        raise RelayError(f"collector: the store: {exc}") from None
    loader = Loader(Path(data_dir), backend, keep_days)
    collector = Collector(
        Path(data_dir), keep_days, accept_syslog=accept_syslog,
        quota_bytes_per_day=quota_bytes_per_day,
        on_synced=lambda sub, day: None if sub.startswith("@") else loader.mark(sub, day))
    queries = None if store.url else await fleet.serve_queries(
        fleet.socket_path(Path(data_dir)), backend)
    log.info("store: %s", f"ClickHouse at {store.url}" if store.url
             else f"embedded (chDB) in {loader.journal.path.parent}")
    listeners = [listen_tcp(host, port, LISTEN_BACKLOG)]
    log.info("listening on %s (RFC 5425, TLS, client certificate %s), storing in %s; "
             "plain syslog %s; quota %d bytes per sender per day", listen,
             "optional" if allow_no_client_cert else "required", data_dir,
             "accepted" if accept_syslog else "refused", quota_bytes_per_day)
    if plain:
        listeners.append(listen_tcp(*plain, LISTEN_BACKLOG))
        log.info("listening on %s (plain TCP syslog, for local senders)", plain_listen)
    stop = stop_event or asyncio.Event()
    tasks = [asyncio.ensure_future(_accept_loop(sock, collector, ctx if i == 0 else None))
             for i, sock in enumerate(listeners)]
    tasks.append(asyncio.ensure_future(_load_loop(loader, stop)))
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
        if queries is not None:
            queries.close()
        collector.store.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        loader.close()
        backend.close()
        log.info("collector stopped")


async def _load_loop(loader: Loader, stop: asyncio.Event) -> None:
    """Load the spool into the store, a pass a second while records arrive; a
    store that fails is retried (the spool keeps everything meanwhile)."""
    failing = False
    while not stop.is_set():
        try:
            n = await asyncio.to_thread(loader.run_pass)
            if failing:
                log.info("store: loading works again")
            failing = False
        except (StoreError, OSError) as exc:
            if not failing:
                log.error("store: loading failed (retrying; the spool keeps the records): %s",
                          exc)
            failing = True
            n = 0
        if not n:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LOAD_INTERVAL_S)
