"""The collector's ClickHouse store: the spool's records, queryable across the fleet.

``relay collector`` files what it receives as JSON lines, one directory per relay
and one file per UTC day (relay/central/collector.py): that spool is the durable
copy and the source of every load. A :class:`Loader` hands the spool's complete
lines, raw, to ClickHouse (format LineAsString into ``records.record``); the
engine extracts the columns itself (one JSONExtract per row into an EPHEMERAL
tuple, the MATERIALIZED columns read from it), so no Python loop touches a
record on the way in.

Two engines, one schema: by default chDB, the embedded ClickHouse, in
``DATA_DIR/@store/clickhouse``; with ``[store] url`` a ClickHouse server
(clickhouse-connect, HTTP), and with ``[store] cluster`` too, a cluster. The DDL
comes from one template (:func:`ddl`): MergeTree engines locally;
Replicated*MergeTree ``_local`` tables ``ON CLUSTER`` and Distributed tables of
the same names as locally in front of them (sharded by relay, so that a
session's records and their duplicates meet on one shard) on a cluster. The
queries (relay/central/fleet.py) name only the front tables.

Tables (database ``relay``), each partitioned by day with a TTL that drops
whole partitions after ``keep_days``:

- ``records``: every line of the spool; ReplacingMergeTree ordered by
  (server_id, time, id), so one relay's records over time are one range and a
  record loaded twice collapses to one at merge;
- ``destinations``: the disconnect records' destinations, one row each
  (a materialized view ARRAY JOINs them), ordered by host, with a bloom
  filter over the IPs (a projection ordered by IP doubled the table: 80 bytes
  a row against 43);
- ``client_sessions``: (client_ip, time) -> (server_id, session_id) of every
  connect and disconnect record (a materialized view), for "every session of
  client X" without reading all records.

Loading is idempotent. Positions (bytes of each relay's day loaded, in the
day's uncompressed content: retention compresses a day and merges late records
after it without moving a byte) live in ``DATA_DIR/@store/loaded.jsonl`` (for a
server, ``loaded-HASH.jsonl``, HASH of its url and cluster: a store the
collector has not loaded before gets the whole spool), a journal: each pass
appends its plan (the segments it will load) before the insert and a ``done``
line after. The insert carries a deduplication token made
from the plan, so a pass replayed after a crash between the two lines is
dropped by ClickHouse's insert deduplication: stored once, not merely
collapsed later. A segment read again by other means (a position lost) still
collapses by the ReplacingMergeTree key, and the queries group by session.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from relay.connlog import reader
from relay.connlog.daylog import ensure_dir
from relay.errors import RelayError
from relay.fsutil import write_atomic

log = logging.getLogger("relay.central.store")

DATABASE = "relay"
STORE_DIR = "@store"
EMBEDDED_DIR = "clickhouse"
JOURNAL = "loaded.jsonl"
PASS_FILE = "pass.jsonl"

# Bytes of spool lines loaded by one INSERT. ClickHouse's guidance is inserts of
# 10,000 to 100,000 rows at most about once a second (docs: "Selecting an Insert
# Strategy"); a record is about 0.5-1 kB, so 64 MiB is ~100,000 rows.
PASS_MAX_BYTES = 64 << 20
# A loader pass every second while records arrive: a record is queryable about
# a second after it is on the spool, and inserts stay at ClickHouse's one a second.
LOAD_INTERVAL_S = 1.0
# Inserts whose deduplication tokens a MergeTree remembers (ClickHouse's
# non_replicated_deduplication_window; its replicated twin defaults to 10,000
# since 23.x). Each pass is one insert, so a replay after a crash is always in it.
DEDUP_WINDOW = 10_000
# Rows per mark of ``records``. The questions are point lookups (a relay, a set
# of sessions), and a lookup decompresses whole granules of the wide ``record``
# column: ClickHouse's 8,192 rows are ~5 MB of JSON per granule touched. 1,024
# cuts that eightfold for eight times the marks (ClickHouse's docs suggest a
# lower granularity for point queries; 1,024 is the smallest it ships with).
GRANULARITY = 1024
# The journal is compacted to one line of positions when it grows past this.
JOURNAL_MAX_BYTES = 4 << 20
# Default retention of the store (the collector's --keep, at least 90 days).
DEFAULT_KEEP_DAYS = 90

# The fields of a record the columns come from: parsed once per row.
_FIELDS = ("Tuple(id String, time String, action String, session_id String, "
           "server Tuple(id String, ip String), client Tuple(ip String, port Nullable(UInt16)), "
           "connect_time String, out_of_window Tuple(received String))")

# {records}, {destinations}, {clients}: table names (with _local on a cluster);
# {on_cluster}; {replacing}, {plain}: engines; {keep}: days; {dedup}: settings.
_TEMPLATE = (
    """CREATE TABLE IF NOT EXISTS {db}.{records}{on_cluster}
(
    record String CODEC(ZSTD(3)),
    f {fields} EPHEMERAL JSONExtract(record, '{fields}'),
    server_id LowCardinality(String) MATERIALIZED tupleElement(tupleElement(f, 'server'), 'id'),
    id String MATERIALIZED tupleElement(f, 'id'),
    time DateTime64(3, 'UTC')
        MATERIALIZED parseDateTime64BestEffortOrZero(tupleElement(f, 'time'), 3, 'UTC'),
    day Date MATERIALIZED if(tupleElement(tupleElement(f, 'out_of_window'), 'received') != '',
        toDate(parseDateTime64BestEffortOrZero(
            tupleElement(tupleElement(f, 'out_of_window'), 'received'), 3, 'UTC')),
        toDate(parseDateTime64BestEffortOrZero(tupleElement(f, 'time'), 3, 'UTC'))),
    action LowCardinality(String) MATERIALIZED tupleElement(f, 'action'),
    session_id String MATERIALIZED tupleElement(f, 'session_id'),
    server_ip String MATERIALIZED tupleElement(tupleElement(f, 'server'), 'ip'),
    client_ip String MATERIALIZED tupleElement(tupleElement(f, 'client'), 'ip'),
    client_port Nullable(UInt16) MATERIALIZED tupleElement(tupleElement(f, 'client'), 'port'),
    connect_time Nullable(DateTime64(3, 'UTC'))
        MATERIALIZED parseDateTime64BestEffortOrNull(tupleElement(f, 'connect_time'), 3, 'UTC'),
    INDEX server_ip_set server_ip TYPE set(16) GRANULARITY 1
)
ENGINE = {replacing}
PARTITION BY day
ORDER BY (server_id, time, id)
TTL day + toIntervalDay({keep})
SETTINGS ttl_only_drop_parts = 1, index_granularity = {granularity}{dedup}""",
    """CREATE TABLE IF NOT EXISTS {db}.{destinations}{on_cluster}
(
    day Date,
    time DateTime64(3, 'UTC'),
    server_id LowCardinality(String),
    session_id String,
    host String,
    ip String,
    port Nullable(UInt16),
    INDEX ip_bloom ip TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = {plain}
PARTITION BY day
ORDER BY (host, time)
TTL day + toIntervalDay({keep})
SETTINGS ttl_only_drop_parts = 1{dedup}""",
    """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{destinations}_mv{on_cluster}
TO {db}.{destinations} AS
SELECT day, time, server_id, session_id,
       lowerUTF8(trimRight(d.1, '.')) AS host, d.2 AS ip, d.3 AS port
FROM {db}.{records}
ARRAY JOIN JSONExtract(record, 'destinations',
                       'Array(Tuple(host String, ip String, port Nullable(UInt16)))') AS d
WHERE action = 'disconnect'""",
    """CREATE TABLE IF NOT EXISTS {db}.{clients}{on_cluster}
(
    day Date,
    time DateTime64(3, 'UTC'),
    client_ip String,
    server_id LowCardinality(String),
    session_id String
)
ENGINE = {plain}
PARTITION BY day
ORDER BY (client_ip, time)
TTL day + toIntervalDay({keep})
SETTINGS ttl_only_drop_parts = 1{dedup}""",
    """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{clients}_mv{on_cluster}
TO {db}.{clients} AS
SELECT day, time, client_ip, server_id, session_id
FROM {db}.{records}
WHERE action IN ('connect', 'disconnect') AND client_ip != ''""",
)
# On a cluster: the front tables the queries and the loader name.
_DISTRIBUTED = (
    "CREATE TABLE IF NOT EXISTS {db}.{front}{on_cluster} AS {db}.{front}_local "
    "ENGINE = Distributed({cluster}, {db}, {front}_local, cityHash64(server_id))")
FRONT_TABLES = ("records", "destinations", "client_sessions")


def _ident(name: str, what: str) -> str:
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise RelayError(f"[store] {what} {name!r}: letters, digits, '_' and '-' only")
    return name


def ddl(keep_days: int = DEFAULT_KEEP_DAYS, cluster: str = "") -> list[str]:
    """The statements that create the store: local engines, or with ``cluster``
    Replicated local tables ON CLUSTER with Distributed front tables."""
    if cluster:
        _ident(cluster, "cluster")
        # The macros each server of the cluster defines (ClickHouse's convention).
        zk = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'"
        values = {"records": "records_local", "destinations": "destinations_local",
                  "clients": "client_sessions_local", "on_cluster": f" ON CLUSTER {cluster}",
                  "replacing": f"ReplicatedReplacingMergeTree({zk})",
                  "plain": f"ReplicatedMergeTree({zk})",
                  "dedup": f", replicated_deduplication_window = {DEDUP_WINDOW}"}
    else:
        values = {"records": "records", "destinations": "destinations",
                  "clients": "client_sessions", "on_cluster": "",
                  "replacing": "ReplacingMergeTree", "plain": "MergeTree",
                  "dedup": f", non_replicated_deduplication_window = {DEDUP_WINDOW}"}
    values.update(db=DATABASE, keep=int(keep_days), fields=_FIELDS, granularity=GRANULARITY)
    out = [f"CREATE DATABASE IF NOT EXISTS {DATABASE}{values['on_cluster']}"]
    out += [t.format(**values) for t in _TEMPLATE]
    if cluster:
        out += [_DISTRIBUTED.format(db=DATABASE, front=t, on_cluster=values["on_cluster"],
                                    cluster=cluster) for t in FRONT_TABLES]
    return out


# ---------------------------------------------------------------------------
# Engines


class Backend(Protocol):
    # Names the store in its journal's file name: a new store is loaded from
    # the whole spool, not from another store's positions.
    journal: str

    def command(self, sql: str) -> None: ...

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]: ...

    def insert_lines(self, data: bytes, token: str) -> None: ...

    def close(self) -> None: ...


class Embedded:
    """chDB in a directory. One process at a time may open it (ClickHouse locks
    the directory): the collector, or a search while no collector runs."""

    def __init__(self, path: Path) -> None:
        try:
            from chdb import session
        except ImportError:
            raise RelayError("the embedded store needs chdb (pip install chdb; "
                             "./run.sh setup installs it)") from None
        # The engine writes its parts for as long as the process lives, with the
        # process's umask: everything under the store private, as the spool is.
        os.umask(0o077)
        self.path = ensure_dir(Path(path))
        self.scratch = self.path.parent / PASS_FILE
        self.journal = JOURNAL
        # One session per process, and not safe for concurrent queries.
        self._lock = threading.Lock()
        try:
            self._session = session.Session(str(self.path))
        except Exception as exc:  # chDB raises its own types
            raise RelayError(f"embedded store {self.path}: cannot open ({_first_line(exc)}): "
                             "is a collector running on this directory?") from None

    def _query(self, sql: str, fmt: str = "JSONEachRow",
               params: dict[str, Any] | None = None) -> bytes:
        with self._lock:
            try:
                result = self._session.query(sql, fmt, params={
                    k: _escaped(v) for k, v in (params or {}).items()})
            except Exception as exc:
                raise StoreError(_first_line(exc)) from None
        return bytes(result.bytes()) if result is not None else b""

    def command(self, sql: str) -> None:
        self._query(sql, "TSV")

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self._query(sql, params=params).splitlines()]

    def insert_lines(self, data: bytes, token: str) -> None:
        # Through a file: chDB reads it faster than the same bytes inline in the
        # query text (measured 2.0 s against 3.0 s for 100,000 records). A
        # scratch copy (0600 by the umask), not synced: the spool is the durable one.
        self.scratch.write_bytes(data)
        try:
            self._query(f"INSERT INTO {DATABASE}.records (record) "
                        f"SETTINGS insert_deduplication_token = {{token:String}} "
                        f"SELECT line FROM file({{path:String}}, LineAsString, 'line String')",
                        "TSV", {"token": token, "path": str(self.scratch)})
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.scratch)

    def close(self) -> None:
        with self._lock:
            self._session.close()


class Server:
    """A ClickHouse server or cluster over HTTP(S) (clickhouse-connect)."""

    def __init__(self, url: str, cluster: str = "") -> None:
        try:
            import clickhouse_connect
        except ImportError:
            raise RelayError("[store] url needs clickhouse-connect (pip install "
                             "clickhouse-connect; ./run.sh setup installs it)") from None
        # Their retries and driver errors are logged as warnings, one failure in
        # several lines: the failure is ours to report, once.
        for name in ("urllib3", "clickhouse_connect"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.url = url
        self.cluster = cluster
        name = hashlib.sha256(f"{_redacted(url)} {cluster}".encode()).hexdigest()[:16]
        self.journal = f"loaded-{name}.jsonl"
        try:
            self._client = clickhouse_connect.get_client(dsn=url)
        except Exception as exc:
            raise RelayError(f"[store] url {_redacted(url)}: {_first_line(exc)}") from None
        self._lock = threading.Lock()

    def command(self, sql: str) -> None:
        with self._lock:
            try:
                self._client.command(sql)
            except Exception as exc:
                raise StoreError(_first_line(exc)) from None

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            try:
                result = self._client.query(sql, parameters=params or {})
            except Exception as exc:
                raise StoreError(_first_line(exc)) from None
        return [_plain(row) for row in result.named_results()]

    def insert_lines(self, data: bytes, token: str) -> None:
        settings: dict[str, Any] = {"insert_deduplication_token": token}
        if self.cluster:
            # Deduplication happens on the shards: wait for them.
            settings["distributed_foreground_insert"] = 1
        with self._lock:
            try:
                self._client.raw_insert(f"{DATABASE}.records", ["record"], data,
                                        settings=settings, fmt="LineAsString")
            except Exception as exc:
                raise StoreError(_first_line(exc)) from None

    def close(self) -> None:
        self._client.close()


class StoreError(RelayError):
    """The engine refused a statement or could not be reached."""


def _escape_controls(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") \
        .replace("\r", "\\r")


def _literal(value: Any) -> str:
    """An array or a tuple as a ClickHouse literal (strings quoted and escaped)."""
    if isinstance(value, str):
        return "'" + _escape_controls(value).replace("'", "\\'") + "'"
    if isinstance(value, list | tuple):
        inner = ", ".join(_literal(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return str(value)


def _escaped(value: Any) -> str:
    """A query parameter as ClickHouse reads it: a scalar as text in its escaped
    (TSV) form, an array or a tuple as a literal."""
    if isinstance(value, list | tuple):
        return _literal(value)
    return _escape_controls(str(value))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep:
        return url
    scheme, _, creds = head.rpartition("//")
    return f"{scheme}//{creds.split(':')[0]}:***@{tail}"


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A server row with the types JSONEachRow gives the embedded one."""
    return {k: (v.isoformat() if isinstance(v, datetime | date) else v) for k, v in row.items()}


@dataclass(frozen=True)
class StoreSettings:
    """``[store]``: empty url = the embedded engine under the collector's directory."""

    url: str = ""
    cluster: str = ""


def store_dir(data_dir: Path) -> Path:
    return Path(data_dir) / STORE_DIR


def open_backend(data_dir: Path, settings: StoreSettings) -> Backend:
    if settings.url:
        return Server(settings.url, settings.cluster)
    if settings.cluster:
        raise RelayError("[store] cluster needs [store] url (a server of that cluster)")
    return Embedded(store_dir(data_dir) / EMBEDDED_DIR)


def create_schema(backend: Backend, keep_days: int = DEFAULT_KEEP_DAYS,
                  cluster: str = "") -> None:
    for statement in ddl(keep_days, cluster):
        backend.command(statement)


# ---------------------------------------------------------------------------
# Loading the spool


@dataclass(frozen=True)
class Segment:
    """Bytes [start, end) of one relay's day: whole lines."""

    relay: str
    day: str
    start: int
    end: int

    def key(self) -> tuple[str, str]:
        return self.relay, self.day


@dataclass
class Journal:
    """Positions, and the plan of a pass not known to be done."""

    path: Path
    positions: dict[tuple[str, str], int] = field(default_factory=dict)
    pending: list[Segment] = field(default_factory=list)
    pending_token: str = ""

    @classmethod
    def load(cls, path: Path) -> Journal:
        j = cls(path)
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            return j
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn last line: its pass is replayed from the plan before it
            if "positions" in entry:
                j.positions = {(r, d): int(n) for r, d, n in entry["positions"]}
            elif "plan" in entry:
                j.pending = [Segment(*s) for s in entry["segments"]]
                j.pending_token = entry["plan"]
            elif entry.get("done") == j.pending_token:
                j._apply(j.pending)
                j.pending, j.pending_token = [], ""
        return j

    def _apply(self, segments: Iterable[Segment]) -> None:
        for s in segments:
            if s.end > self.positions.get(s.key(), 0):
                self.positions[s.key()] = s.end

    def _append(self, entry: dict[str, Any]) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(entry, separators=(",", ":")).encode() + b"\n")
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def plan(self, segments: list[Segment], token: str) -> None:
        self._append({"plan": token, "segments": [list(vars(s).values()) for s in segments]})
        self.pending, self.pending_token = segments, token

    def done(self) -> None:
        self._append({"done": self.pending_token})
        self._apply(self.pending)
        self.pending, self.pending_token = [], ""
        if self.path.stat().st_size > JOURNAL_MAX_BYTES:
            self.compact()

    def forget_before(self, day: str) -> None:
        self.positions = {k: v for k, v in self.positions.items() if k[1] >= day}

    def compact(self) -> None:
        entry = {"positions": [[r, d, n] for (r, d), n in sorted(self.positions.items())]}
        write_atomic(self.path, json.dumps(entry, separators=(",", ":")).encode() + b"\n")


def _token(segments: list[Segment]) -> str:
    text = json.dumps([list(vars(s).values()) for s in segments], separators=(",", ":"))
    return "relay-load-" + hashlib.sha256(text.encode()).hexdigest()


class Loader:
    """Loads the spool under ``root`` into ``backend``, pass by pass (one INSERT
    each); :meth:`mark` names the days that grew since the last pass."""

    def __init__(self, root: Path, backend: Backend, keep_days: int = DEFAULT_KEEP_DAYS,
                 *, pass_max_bytes: int = PASS_MAX_BYTES) -> None:
        self.root = Path(root)
        self.backend = backend
        self.keep_days = keep_days
        self.pass_max_bytes = pass_max_bytes
        ensure_dir(store_dir(self.root))
        self.journal = Journal.load(store_dir(self.root) / backend.journal)
        self._marked: set[tuple[str, str]] = set()
        self._marked_lock = threading.Lock()  # mark() runs on the collector's loop
        self._scan_all = True  # after a start: every day of every relay
        self._days = reader.DayReader()
        self._unreadable: set[tuple[str, str]] = set()
        self.loaded_records = 0
        self.loaded_bytes = 0

    def mark(self, relay: str, day: str) -> None:
        """The collector synced new lines of ``relay``'s ``day``."""
        with self._marked_lock:
            self._marked.add((relay, day))

    def _relays(self) -> list[Path]:
        return [d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("@")]

    def _candidates(self) -> Iterator[tuple[str, reader.Day]]:
        with self._marked_lock:
            marked, self._marked = self._marked, set()
        if self._scan_all:
            self._scan_all = False
            for d in sorted(self._relays()):
                for day in reader.days(d):
                    yield d.name, day
            return
        for relay, name in sorted(marked):
            day = reader.day_in(self.root / relay, name)
            if day.files:
                yield relay, day

    def _read(self, day: reader.Day, start: int, limit: int) -> bytes:
        """Up to ``limit`` bytes of the day's content (its .zst, then its late
        records) from ``start``, cut after the last complete line."""
        parts, offset = [], 0
        for path in day.files:
            size = reader.uncompressed_size(path)
            if start < offset + size and limit > 0:
                data = self._days.read(path, max(0, start - offset), limit)
                parts.append(data)
                limit -= len(data)
            offset += size
        data = b"".join(parts)
        return data[:data.rfind(b"\n") + 1]

    def plan(self) -> tuple[list[Segment], bytes]:
        segments: list[Segment] = []
        chunks: list[bytes] = []
        room = self.pass_max_bytes
        oldest = (datetime.now(UTC).date() - timedelta(days=self.keep_days)).isoformat()
        left: set[tuple[str, str]] = set()
        for relay, day in self._candidates():
            if day.name < oldest:
                continue
            start = self.journal.positions.get((relay, day.name), 0)
            try:
                size = sum(reader.uncompressed_size(p) for p in day.files)
                data = self._read(day, start, room) if start < size and room > 0 else b""
            except (OSError, ValueError) as exc:
                # Retention may have compressed the day meanwhile: the next pass
                # reads it again (a day that stays unreadable is named once).
                if (relay, day.name) not in self._unreadable:
                    self._unreadable.add((relay, day.name))
                    log.warning("store: cannot read %s/%s: %s (retrying)", relay, day.name,
                                exc)
                left.add((relay, day.name))
                continue
            if data:
                segments.append(Segment(relay, day.name, start, start + len(data)))
                chunks.append(data)
                room -= len(data)
            if start + len(data) < size and (data or room < size - start):
                left.add((relay, day.name))  # the next pass goes on with it
        with self._marked_lock:
            self._marked |= left
        self.journal.forget_before(oldest)
        return segments, b"".join(chunks)

    def run_pass(self) -> int:
        """Load what the spool has beyond the positions; the records loaded."""
        if self.journal.pending:
            # A pass that may or may not have reached the engine: the same bytes
            # under the same token, which the engine drops if it has them.
            segments = self.journal.pending
            data = b"".join(self._segment(s) for s in segments)
            self._insert(segments, data, self.journal.pending_token)
        segments, data = self.plan()
        if not segments:
            return 0
        token = _token(segments)
        self.journal.plan(segments, token)
        self._insert(segments, data, token)
        return data.count(b"\n")

    def _segment(self, s: Segment) -> bytes:
        data = self._read(reader.day_in(self.root / s.relay, s.day), s.start, s.end - s.start)
        if len(data) != s.end - s.start:
            raise StoreError(f"spool {s.relay}/{s.day} is shorter than a planned load "
                             f"({s.start}-{s.end}): the spool was changed by hand")
        return data

    def _insert(self, segments: list[Segment], data: bytes, token: str) -> None:
        self.backend.insert_lines(data, token)
        self.journal.done()
        self.loaded_records += data.count(b"\n")
        self.loaded_bytes += len(data)

    def run_until_loaded(self) -> int:
        """Passes until the spool is loaded (``relay collector load``)."""
        total = 0
        while n := self.run_pass():
            total += n
        return total

    def close(self) -> None:
        self._days.close()
