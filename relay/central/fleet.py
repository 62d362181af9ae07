"""``relay collector search``: the sessions of the whole fleet, from the store.

The same filters, time-zone rules, ``--at`` exactness and output as ``relay logs
search`` on a relay (relay/sessionquery.py; the options are
relay/investigate/options.py). The SQL only narrows: it returns, per session
(relay id, session id), its connect and disconnect records, for every session
that *may* match (the keys and indexes do the work: the relay id is the sort
key's prefix, a client address and a destination have tables of their own
ordered by them). Then :func:`relay.sessionquery.session_matches` decides,
record by record, exactly as on a relay, and sets ``match`` (exact or near)
under ``--at``. A destination (``--dst``, ``--host``) is one the disconnect
record lists: packets never leave a relay.

The embedded engine can be opened by one process only, the collector's: while
it runs, a search asks it over a Unix socket in ``DATA_DIR/@store`` (0600, in a
0700 directory), sending the query's filters as one JSON line and reading the
sessions' records back. With ``[store] url`` a search asks the server itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from relay.central.store import DATABASE, Backend, StoreError, store_dir
from relay.errors import RelayError
from relay.sessionquery import (
    Query,
    SessionRow,
    dst_in_destinations,
    session_matches,
    session_record_problem,
)

log = logging.getLogger("relay.central.fleet")

QUERY_SOCKET = "query.sock"
# A query's filters as JSON are a few hundred bytes; anything near this is not one.
QUERY_MAX_BYTES = 64 << 10
# A search's connection to the collector that sends no query within this is dropped.
QUERY_READ_TIMEOUT_S = 10.0
# Sessions named in one query as a parameter (a list of keys, about 60 bytes
# each): 1,000 keep it near 64 kB, under ClickHouse's 128 KiB cap on an HTTP
# field (http_max_field_value_size) even URL-encoded. Past it the engine joins
# the candidates' subquery itself, and the records are read 1,000 sessions a query.
KEYS_MAX = 1_000

Pairs = list[tuple[str, str]]
OnError = Callable[[str], None]

_MS = "toUnixTimestamp64Milli({col})"


def candidates_sql(q: Query) -> tuple[str, dict[str, Any]] | None:
    """SELECT (server_id, session_id) of the sessions a client address or a
    destination names, from the tables ordered by them; None when ``q`` has
    neither filter."""
    params: dict[str, Any] = {}
    parts = []
    if q.client_ip:
        params["client_ip"] = q.client_ip
        parts.append(f"SELECT server_id, session_id FROM {DATABASE}.client_sessions "
                     "WHERE client_ip = {client_ip:String}")
    if q.host or q.dst_ip:
        cond = []
        if q.host:
            cond.append("host = {host:String}")
            params["host"] = q.host
        if q.dst_ip:
            cond.append("ip = {dst_ip:String}")
            params["dst_ip"] = q.dst_ip
        if q.dst_port is not None:
            cond.append("port = {dst_port:UInt16}")
            params["dst_port"] = q.dst_port
        lo, _ = q.session_window
        if lo is not None:
            # Listed by the disconnect record: a session that ended before lo
            # cannot match.
            cond.append(f"{_MS.format(col='time')} >= {{lo_ms:Int64}}")
            params["lo_ms"] = int(lo * 1000) - 1
        parts.append(f"SELECT server_id, session_id FROM {DATABASE}.destinations "
                     f"WHERE {' AND '.join(cond)}")
    if not parts:
        return None
    # Both filters: the sessions in both lists.
    return (" INTERSECT ".join(f"SELECT DISTINCT * FROM ({p})" for p in parts), params)


def _key_filter(keys: list[tuple[str, str]] | str, params: dict[str, Any]) -> list[str]:
    """WHERE terms for the sessions ``keys`` (a list, or a subquery's SQL)."""
    if isinstance(keys, str):
        return [f"(server_id, session_id) IN ({keys})"]
    # The relay ids first: the sort key's prefix, so whole ranges are skipped.
    params["servers"] = sorted({k[0] for k in keys})
    params["keys"] = sorted(keys)
    return ["server_id IN {servers:Array(String)}",
            "(server_id, session_id) IN {keys:Array(Tuple(String, String))}"]


def sql_of(q: Query, keys: list[tuple[str, str]] | str | None = None
           ) -> tuple[str, dict[str, Any]]:
    """SELECT (server_id, session_id, times) of every session that may match
    ``q`` (among ``keys``, the candidates of :func:`candidates_sql` as a list or
    as its SQL, when given), ``times`` those of its records; with its
    parameters. Only narrow columns: the records themselves are read by
    :func:`records_sql`, where the times find their granules."""
    params: dict[str, Any] = {}
    where = ["action IN ('connect', 'disconnect')", "session_id != ''"]
    if q.server_id:
        where.append("server_id = {server_id:String}")
        params["server_id"] = q.server_id
    if q.server_ip:
        where.append("server_ip = {server_ip:String}")
        params["server_ip"] = q.server_ip
    if q.session:
        where.append("startsWith(session_id, {session:String})")
        params["session"] = q.session
    if keys is not None:
        where += _key_filter(keys, params)
    lo, hi = q.session_window
    having = []
    if hi is not None:
        having.append("(start IS NULL OR start <= {hi_ms:Int64})")
        params["hi_ms"] = int(hi * 1000) + 1
    if lo is not None:
        having.append("(end IS NULL OR end >= {lo_ms:Int64})")
        params["lo_ms"] = int(lo * 1000) - 1
    sql = (
        "SELECT server_id, session_id, groupUniqArray(time) AS times, "
        f"coalesce(minIfOrNull({_MS.format(col='time')}, action = 'connect'), "
        f"minIfOrNull({_MS.format(col='connect_time')}, action = 'disconnect')) AS start, "
        f"maxIfOrNull({_MS.format(col='time')}, action = 'disconnect') AS end "
        f"FROM {DATABASE}.records WHERE {' AND '.join(where)} "
        "GROUP BY server_id, session_id"
        + (f" HAVING {' AND '.join(having)}" if having else ""))
    return sql, params


def records_sql(found: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """SELECT (server_id, session_id, connect, disconnect) of the sessions of
    :func:`sql_of`'s rows: (relay id, time) is the sort key's prefix, so only
    the granules that hold their records are read."""
    params: dict[str, Any] = {"times": sorted({(r["server_id"], t) for r in found
                                                for t in r["times"]})}
    where = ["action IN ('connect', 'disconnect')",
             *_key_filter([(r["server_id"], r["session_id"]) for r in found], params),
             "(server_id, time) IN {times:Array(Tuple(String, DateTime64(3, 'UTC')))}"]
    return ("SELECT server_id, session_id, "
            "argMaxIf(record, time, action = 'connect') AS connect, "
            "argMaxIf(record, time, action = 'disconnect') AS disconnect "
            f"FROM {DATABASE}.records WHERE {' AND '.join(where)} "
            "GROUP BY server_id, session_id"), params


def fetch(backend: Backend, q: Query) -> Pairs:
    """(connect, disconnect) JSON of every session that may match ("" for none)."""
    keys: list[tuple[str, str]] | str | None = None
    candidates = candidates_sql(q)
    if candidates is not None:
        sql, params = candidates
        rows = backend.rows(f"{sql} LIMIT {KEYS_MAX + 1}", params)
        if not rows:
            return []
        # Past KEYS_MAX the engine joins the candidates itself (no list of them
        # travels in the query).
        keys = [(r["server_id"], r["session_id"]) for r in rows] \
            if len(rows) <= KEYS_MAX else sql
    sql, params = sql_of(q, keys)
    if isinstance(keys, str):
        params.update(candidates[1] if candidates else {})
    out: Pairs = []
    found = backend.rows(sql, params)
    for i in range(0, len(found), KEYS_MAX):
        out += [(r["connect"], r["disconnect"])
                for r in backend.rows(*records_sql(found[i:i + KEYS_MAX]))]
    return out


def sessions(pairs: Pairs, q: Query, on_error: OnError) -> list[SessionRow]:
    """The sessions of ``pairs`` that match ``q`` (relay.sessionquery's rules)."""
    out = []
    for connect, disconnect in pairs:
        row: SessionRow | None = None
        for text in (connect, disconnect):
            if not text:
                continue
            try:
                rec = json.loads(text)
            except ValueError:
                on_error("a stored record is not JSON, skipped")
                continue
            problem = session_record_problem(rec)
            if problem is not None:
                on_error(f"record {str(rec.get('id'))[:64]!r}: {problem}, skipped")
                continue
            row = row or SessionRow(rec["session_id"])
            row.add(rec)
        if row is None or not session_matches(row, q):
            continue
        if q.packet_filter and not (row.disconnect and dst_in_destinations(row.disconnect, q)):
            continue
        out.append(row)
    out.sort(key=lambda r: (r.connect_ts or 0.0, str(r.obj("server").get("id")), r.session_id))
    return out


# ---------------------------------------------------------------------------
# The collector answers searches on its embedded store


def socket_path(data_dir: Path) -> Path:
    return store_dir(data_dir) / QUERY_SOCKET


def query_to_json(q: Query) -> bytes:
    return json.dumps(asdict(q)).encode() + b"\n"


def query_from_json(line: bytes) -> Query:
    try:
        data = json.loads(line)
        known = {f.name for f in fields(Query)}
        if not isinstance(data, dict) or set(data) - known:
            raise ValueError("not a query")
        return Query(**data)
    except (ValueError, TypeError) as exc:
        raise RelayError(f"bad query: {exc}") from None


async def serve_queries(path: Path, backend: Backend) -> asyncio.AbstractServer:
    """Answer searches on ``path`` until the returned server is closed."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), QUERY_READ_TIMEOUT_S)
            if len(line) > QUERY_MAX_BYTES or not line.endswith(b"\n"):
                raise RelayError("bad query: not one line")
            q = query_from_json(line)
            pairs = await asyncio.to_thread(fetch, backend, q)
            for pair in pairs:
                writer.write(json.dumps(pair).encode() + b"\n")
                await writer.drain()
            writer.write(json.dumps({"end": len(pairs)}).encode() + b"\n")
        except (RelayError, TimeoutError, ValueError) as exc:
            writer.write(json.dumps({"error": str(exc)}).encode() + b"\n")
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(handle, path=str(path), limit=QUERY_MAX_BYTES)
    os.chmod(path, 0o600)
    return server


def ask_collector(path: Path, q: Query) -> Pairs | None:
    """The pairs from the collector serving ``path``; None when none listens
    there (no socket, or one left by a collector that is gone)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        sock.sendall(query_to_json(q))
        pairs: Pairs = []
        with sock.makefile("rb") as f:
            for line in f:
                item = json.loads(line)
                if isinstance(item, dict):
                    if "error" in item:
                        raise StoreError(f"the collector: {item['error']}")
                    return pairs
                pairs.append((item[0], item[1]))
        raise StoreError("the collector closed the search connection before the end")
    finally:
        sock.close()
