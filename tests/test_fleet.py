"""The collector's store and the fleet search (relay/central/store.py, fleet.py).

Sessions are planted around two DST changes (Europe/Berlin's on 2026-10-25,
America/New_York's on 2026-11-01), on two relays; the three fleet questions
("who was connected to server S at T", "which sessions reached D in a window",
"every session of client X") must name exactly the planted sessions. The store
runs embedded (chDB) everywhere; the contract test runs the same assertions
against a ClickHouse server too when RELAY_CLICKHOUSE_URL names one (a scratch
server: database ``relay`` is dropped and created again).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from shiputil import free_port, make_pki, start_collector, start_forwarder, wait_until

from relay.central import fleet, store
from relay.connlog.daylog import ConnectionLog
from relay.errors import EXIT_NOTHING, EXIT_OK, EXIT_USAGE, RelayError
from relay.sessionquery import EXACT, NEAR, Query
from relay.times import parse_time, parse_zone

BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"
SID = {name: name.ljust(26, "0") for name in ("alpha", "bravo", "charl", "delta", "echoo")}
# name: relay, client, connect, disconnect (None: still open), destinations
PLANTED: dict[str, tuple[str, str, str, str | None, list[dict[str, Any]]]] = {
    # 02:30 CEST to 02:30 CET: the same wall time, an hour apart, in Berlin.
    "alpha": ("relay-1", "198.51.100.10", "2026-10-25T00:30:00.000Z", "2026-10-25T01:30:00.000Z",
              [{"host": "example.com", "ip": "203.0.113.7", "port": 443, "scheme": "tls"}]),
    "bravo": ("relay-1", "198.51.100.11", "2026-10-25T01:40:00.000Z", None, []),
    "charl": ("relay-1", "198.51.100.10", "2026-10-24T10:00:00.000Z", "2026-10-24T11:00:00.000Z",
              [{"host": "other.test", "ip": "203.0.113.9", "port": 80, "scheme": "http"}]),
    # 01:00 EDT to 01:30 EST in New York.
    "delta": ("relay-2", "198.51.100.10", "2026-11-01T05:00:00.000Z", "2026-11-01T06:30:00.000Z",
              [{"host": "Example.COM.", "ip": "203.0.113.7", "port": 443, "scheme": "tls"}]),
    "echoo": ("relay-2", "198.51.100.12", "2026-11-01T06:31:00.000Z", "2026-11-01T06:40:00.000Z",
              [{"host": "example.com", "ip": "203.0.113.8", "port": 443, "scheme": "tls"}]),
}
SERVER_IP = {"relay-1": "192.0.2.1", "relay-2": "192.0.2.2"}
# Sessions on neither relay's questions: other clients, other days.
NOISE = 200


def records_of(name: str) -> list[dict[str, Any]]:
    relay, client, start, end, dests = PLANTED[name]
    connect = {"time": start, "action": "connect", "session_id": SID[name],
               "server": {"id": relay, "ip": SERVER_IP[relay], "hostname": None},
               "client": {"ip": client, "port": 40000, "hostname": None},
               "protocol": "cstp", "client_software": {"name": "openconnect", "version": "9"},
               "virtual_ip": "10.211.0.2"}
    if end is None:
        return [connect]
    return [connect, {**connect, "time": end, "action": "disconnect", "connect_time": start,
                      "destinations": dests, "destinations_dropped": 0, "reason": "client"}]


def noise(relay: str, i: int) -> list[dict[str, Any]]:
    sid = f"noise{relay[-1]}{i:05d}".ljust(26, "0")
    start = f"2026-11-{10 + i % 10:02d}T{i % 24:02d}:00:00.000Z"
    end = f"2026-11-{10 + i % 10:02d}T{i % 24:02d}:30:00.000Z"
    connect = {"time": start, "action": "connect", "session_id": sid,
               "server": {"id": relay, "ip": SERVER_IP[relay]},
               "client": {"ip": f"198.18.{i // 250}.{i % 250 + 1}", "port": 1}}
    return [connect, {**connect, "time": end, "action": "disconnect", "connect_time": start,
                      "destinations": [{"host": "noise.test", "ip": "203.0.113.99",
                                        "port": 443}]}]


def plant_relay(data_dir: Path, relay: str) -> list[dict[str, Any]]:
    """The relay's connection log with its planted sessions and noise."""
    log = ConnectionLog(data_dir)
    try:
        recs = [r for name in PLANTED if PLANTED[name][0] == relay for r in records_of(name)]
        recs += [r for i in range(NOISE) for r in noise(relay, i)]
        return [log.append(r) for r in recs]
    finally:
        log.close()


def plant_spool(root: Path) -> int:
    """The collector's spool as it files what the relays send: one directory per
    relay, a file per UTC day."""
    n = 0
    for relay in SERVER_IP:
        tmp = root / "@relays" / relay
        for rec in plant_relay(tmp, relay):
            d = root / relay
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"{rec['time'][:10]}.jsonl", "a") as f:
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            n += 1
    return n


def ask(source: Any, tz: str = "UTC", **filters: Any) -> dict[str, str | None]:
    """session name -> match, of the fleet search for ``filters`` (--at and
    --from/--to read in ``tz``)."""
    zone = parse_zone(tz)
    q = Query(**{k: v for k, v in filters.items() if k not in ("at", "lo", "hi")})
    for key in ("at", "lo", "hi"):
        if key in filters:
            setattr(q, key, parse_time(filters[key], zone).timestamp())
    rows = fleet.sessions(source(q), q, on_error=pytest.fail)
    names = {v: k for k, v in SID.items()}
    return {names.get(r.session_id, r.session_id): r.match for r in rows}


def check_the_fleet_questions(source: Any) -> None:
    """The assertions both the embedded store and a server must pass."""
    # 1. Who was connected to relay-1 (by id, or by its address) at T: Berlin
    # wall time, which the DST change makes ambiguous without its offset.
    assert ask(source, BERLIN, server_id="relay-1", at="2026-10-25T02:45:00+02:00") == \
        {"alpha": EXACT}
    assert ask(source, BERLIN, server_ip="192.0.2.1", at="2026-10-25T02:45:00+01:00") == \
        {"bravo": EXACT}  # an hour later: alpha has gone, bravo is still open
    with pytest.raises(RelayError, match="ambiguous"):
        ask(source, BERLIN, server_id="relay-1", at="2026-10-25 02:45")
    # Between alpha's end (01:30Z) and bravo's start (01:40Z): nobody, unless asked.
    assert ask(source, server_id="relay-1", at="2026-10-25T01:35:00Z") == {}
    assert ask(source, server_id="relay-1", at="2026-10-25T01:35:00Z", slack=300) == \
        {"alpha": NEAR, "bravo": NEAR}
    # The bounds are inclusive: connected at its connect and at its disconnect.
    assert ask(source, server_id="relay-2", at="2026-11-01T06:30:00Z") == {"delta": EXACT}
    assert ask(source, NEW_YORK, server_ip="192.0.2.2", at="2026-11-01 01:35-05:00") == \
        {"echoo": EXACT}
    # 2. Which sessions reached a host or an address in a window (New York's day
    # of its DST change is 25 hours long; --to is exclusive).
    day_ny = {"lo": "2026-11-01 00:00", "hi": "2026-11-02 00:00"}
    assert ask(source, NEW_YORK, host="example.com", **day_ny) == {"delta": None, "echoo": None}
    assert ask(source, NEW_YORK, dst_ip="203.0.113.7", **day_ny) == {"delta": None}
    assert ask(source, NEW_YORK, dst_ip="203.0.113.7", dst_port=80, **day_ny) == {}
    assert ask(source, host="example.com") == {"alpha": None, "delta": None, "echoo": None}
    assert ask(source, dst_ip="203.0.113.9", dst_port=80) == {"charl": None}
    # 3. Every session of a client address, across relays and days.
    assert ask(source, client_ip="198.51.100.10") == \
        {"charl": None, "alpha": None, "delta": None}
    assert ask(source, BERLIN, client_ip="198.51.100.10", lo="2026-10-25 00:00",
               hi="2026-10-26 00:00") == {"alpha": None}
    # And the noise is there, answering for itself.
    assert len(ask(source, server_id="relay-2", lo="2026-11-10T00:00:00Z")) == NOISE


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[Path, store.Backend]]:
    backend = store.open_backend(tmp_path, store.StoreSettings())
    store.create_schema(backend)
    try:
        yield tmp_path, backend
    finally:
        backend.close()


def count(backend: store.Backend, table: str = "records") -> int:
    return int(backend.rows(f"SELECT count() AS n FROM relay.{table}")[0]["n"])


@pytest.mark.parametrize("keys_max", [fleet.KEYS_MAX, 1], ids=["keys", "subqueries"])
def test_the_three_fleet_questions_name_exactly_the_planted_sessions(
        embedded: tuple[Path, store.Backend], keys_max: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidates passed as a list, and (past KEYS_MAX) joined by the engine."""
    monkeypatch.setattr(fleet, "KEYS_MAX", keys_max)
    root, backend = embedded
    n = plant_spool(root)
    loader = store.Loader(root, backend)
    assert loader.run_until_loaded() == n
    check_the_fleet_questions(lambda q: fleet.fetch(backend, q))


def server_backend(url: str) -> store.Backend:
    """The scratch server of RELAY_CLICKHOUSE_URL, its relay database new."""
    backend = store.Server(url)
    backend.command(f"DROP DATABASE IF EXISTS {store.DATABASE} SYNC")
    store.create_schema(backend)
    return backend


def test_contract_the_same_queries_against_a_clickhouse_server(
        embedded: tuple[Path, store.Backend]) -> None:
    """Against RELAY_CLICKHOUSE_URL when set (an unreachable one fails, it is not
    skipped); when unset, the same assertions against the embedded engine, so
    the contract itself is always exercised."""
    root, backend = embedded
    url = os.environ.get("RELAY_CLICKHOUSE_URL", "")
    if url:
        backend = server_backend(url)
        assert backend.journal != store.JOURNAL  # its own positions
    n = plant_spool(root)
    assert store.Loader(root, backend).run_until_loaded() == n
    assert count(backend) == n
    check_the_fleet_questions(lambda q: fleet.fetch(backend, q))


def test_the_cluster_ddl_is_parsed_by_the_embedded_engine(
        embedded: tuple[Path, store.Backend]) -> None:
    _, backend = embedded
    statements = store.ddl(120, "fleet")
    for text in statements:
        [row] = backend.rows("SELECT formatQuery({q:String}) AS sql", {"q": text})
        assert "ON CLUSTER fleet" in row["sql"]
    engines = " ".join(statements)
    assert "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', " \
           "'{replica}')" in engines
    assert engines.count("ENGINE = Distributed(fleet, relay, ") == len(store.FRONT_TABLES)
    assert "toIntervalDay(120)" in engines
    # The local layout is the same template with other engines.
    local = " ".join(store.ddl(90))
    assert "ON CLUSTER" not in local and "Replicated" not in local
    assert local.count("PARTITION BY day") == engines.count("PARTITION BY day") == 3
    with pytest.raises(RelayError):
        store.ddl(90, "fleet; DROP TABLE x")


def test_a_pass_replayed_is_stored_once(embedded: tuple[Path, store.Backend]) -> None:
    root, backend = embedded
    n = plant_spool(root)
    loader = store.Loader(root, backend)
    assert loader.run_until_loaded() == n
    tables = {t: count(backend, t) for t in store.FRONT_TABLES}
    assert tables["records"] == n
    # Every pass of the journal again, as after a crash before its "done" line:
    # the engine drops the inserts it has (by their deduplication token).
    plans = [json.loads(line) for line in loader.journal.path.read_bytes().splitlines()]
    for plan in [p for p in plans if "plan" in p]:
        loader.journal.plan([store.Segment(*s) for s in plan["segments"]], plan["plan"])
        again = store.Loader(root, backend)
        assert again.journal.pending
        again.run_pass()
        assert not again.journal.pending
    assert {t: count(backend, t) for t in store.FRONT_TABLES} == tables
    # Positions survive a restart: nothing more is loaded.
    assert store.Loader(root, backend).run_until_loaded() == 0
    assert count(backend) == n


def test_loading_goes_on_from_its_position_across_compression_and_late_records(
        embedded: tuple[Path, store.Backend]) -> None:
    """A day compressed by retention and then given late records keeps its
    offsets: the loader goes on after what it loaded, into the late file."""
    import zstandard

    root, backend = embedded
    d = root / "relay-1"
    d.mkdir()
    recs = records_of("alpha")
    day = d / "2026-10-25.jsonl"
    day.write_text(json.dumps({"id": "a" * 24, **recs[0]}) + "\n")
    loader = store.Loader(root, backend)
    assert loader.run_pass() == 1
    (d / "2026-10-25.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        day.read_bytes()))
    day.write_text(json.dumps({"id": "b" * 24, **recs[1]}) + "\n")  # a late record
    loader.mark("relay-1", "2026-10-25")
    assert loader.run_pass() == 1
    assert count(backend) == 2
    assert ask(lambda q: fleet.fetch(backend, q), at="2026-10-25T01:00:00Z") == \
        {"alpha": EXACT}


KILLED_LOADER = """
import sys
from pathlib import Path
from relay.central import store
root = Path(sys.argv[1])
backend = store.open_backend(root, store.StoreSettings())
store.create_schema(backend)
loader = store.Loader(root, backend, pass_max_bytes=int(sys.argv[2]))
loader.run_until_loaded()
print("loaded", flush=True)
"""


def bulk_spool(root: Path, relays: int, per_relay: int) -> int:
    for r in range(relays):
        d = root / f"relay-{r}"
        d.mkdir(parents=True)
        with open(d / "2026-11-20.jsonl", "w") as f:
            for i in range(per_relay):
                rec = {"id": f"{r:04d}{i:020d}", "time": "2026-11-20T12:00:00.000Z",
                       "action": "connect", "session_id": f"{r:04d}{i:022d}",
                       "server": {"id": f"relay-{r}", "ip": "192.0.2.1"},
                       "client": {"ip": f"198.18.{i % 250}.{r % 250}", "port": 1},
                       "padding": "x" * 400}
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")
    return relays * per_relay


def test_a_loader_killed_mid_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    n = bulk_spool(tmp_path, 4, 25_000)
    journal = tmp_path / store.STORE_DIR / store.JOURNAL

    def pending() -> bool:
        """The journal's last line is a plan: an insert is under way."""
        try:
            lines = journal.read_bytes().splitlines()
        except FileNotFoundError:
            return False
        return bool(lines) and b'"plan"' in lines[-1] and len(lines) >= 3

    kills = 0
    for _ in range(3):  # killed during a later pass, each time
        p = subprocess.Popen([sys.executable, "-c", KILLED_LOADER, str(tmp_path), str(4 << 20)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while not pending() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
        finally:
            p.wait(30)
    assert kills, "the loader finished before it could be killed"
    out = subprocess.run([sys.executable, "-c", KILLED_LOADER, str(tmp_path), str(4 << 20)],
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "loaded", out.stderr
    backend = store.open_backend(tmp_path, store.StoreSettings())
    try:
        # Physically once (no FINAL, no merge): the replayed inserts were dropped.
        [row] = backend.rows("SELECT count() AS n, uniqExact(id) AS ids FROM relay.records")
        assert (int(row["n"]), int(row["ids"])) == (n, n)
        assert count(backend, "client_sessions") == n
    finally:
        backend.close()


# ---------------------------------------------------------------------------
# End to end: two relays, their certificates, one collector


def collector_search(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli", "collector", "search",
                           "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=120)


def searched(data_dir: Path, *args: str) -> list[dict[str, Any]]:
    out = collector_search(data_dir, "--json", *args)
    assert out.returncode in (EXIT_OK, EXIT_NOTHING), out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_two_relays_ship_to_one_collector_and_the_fleet_search_finds_their_sessions(
        tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    collected = tmp_path / "collector"
    collector = start_collector(tmp_path, port, pki, data_dir=collected)
    relays = {"relay-1": (pki.client_cert, pki.client_key),
              "relay-2": (pki.other_relay_cert, pki.other_relay_key)}
    total = 0
    forwarders = []
    try:
        for relay, (cert, key) in relays.items():
            total += len(plant_relay(tmp_path / relay, relay))
            forwarders.append(start_forwarder(tmp_path, tmp_path / relay, port, pki,
                                              server_id=relay, cert=cert, key=key,
                                              log_name=f"forwarder-{relay}.log"))
        # Every session of both relays reaches the store (asked of the running
        # collector over its socket: the embedded store is its alone).
        sessions = len(PLANTED) + 2 * NOISE
        wait_until(lambda: len(searched(collected, "--from", "2026-10-01T00:00:00Z"))
                   == sessions, timeout=120, what="every session in the store")
        rows = searched(collected, "--tz", BERLIN, "--server-id", "relay-1",
                        "--at", "2026-10-25T02:45:00+02:00")
        assert [(r["session_id"], r["match"], r["server_id"]) for r in rows] == \
            [(SID["alpha"], EXACT, "relay-1")]
        # Times print in the asked zone, each with its own side of the change.
        assert (rows[0]["connect"], rows[0]["disconnect"]) == \
            ("2026-10-25T02:30:00.000+02:00", "2026-10-25T02:30:00.000+01:00")
        rows = searched(collected, "--tz", NEW_YORK, "--host", "EXAMPLE.com.",
                        "--from", "2026-11-01 00:00", "--to", "2026-11-02 00:00")
        assert [r["session_id"] for r in rows] == [SID["delta"], SID["echoo"]]
        assert rows[0]["connect"] == "2026-11-01T01:00:00.000-04:00"
        assert rows[0]["disconnect"] == "2026-11-01T01:30:00.000-05:00"
        rows = searched(collected, "--client-ip", "::ffff:198.51.100.10")
        assert {(r["session_id"], r["server_id"]) for r in rows} == \
            {(SID["charl"], "relay-1"), (SID["alpha"], "relay-1"), (SID["delta"], "relay-2")}
        table = collector_search(collected, "--client-ip", "198.51.100.10", "--format", "table")
        assert table.stdout.splitlines()[0].split()[:4] == \
            ["session", "match", "server_id", "server_ip"]
        assert len(table.stdout.splitlines()) == 4
        csv = collector_search(collected, "--client-ip", "198.51.100.12", "--format", "csv")
        assert csv.stdout.splitlines()[1].startswith(SID["echoo"])
        none = collector_search(collected, "--client-ip", "198.51.100.250")
        assert none.returncode == EXIT_NOTHING and "no matching session" in none.stderr
        bad = collector_search(collected, "--at", "2026-11-01 01:30", "--tz", NEW_YORK)
        assert bad.returncode == EXIT_USAGE and "ambiguous" in bad.stderr
        assert "Traceback" not in bad.stderr
    finally:
        for f in forwarders:
            f.stop()
        collector.stop()
    # Stopped: the search opens the embedded store itself.
    assert len(searched(collected, "--from", "2026-10-01T00:00:00Z")) == len(PLANTED) + 2 * NOISE
    assert total == sum(len(records_of(n)) for n in PLANTED) + 4 * NOISE


def test_the_collector_killed_mid_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """A spool bigger than a pass; the collector SIGKILLed while a pass is under
    way, twice; started again, it loads every record once."""
    pki = make_pki(tmp_path / "pki")
    collected = tmp_path / "collector"
    n = bulk_spool(collected, 3, 60_000)
    journal = collected / store.STORE_DIR / store.JOURNAL

    def mid_pass() -> bool:
        try:
            lines = journal.read_bytes().splitlines()
        except FileNotFoundError:
            return False
        return bool(lines) and b'"plan"' in lines[-1]

    for _ in range(2):
        port = free_port()
        proc = start_collector(tmp_path, port, pki, data_dir=collected)
        wait_until(lambda p=proc: mid_pass() or p.p.poll() is not None, timeout=120,
                   what="a load under way")
        proc.kill(signal.SIGKILL)
    port = free_port()
    proc = start_collector(tmp_path, port, pki, data_dir=collected)
    try:
        wait_until(lambda: len(searched(collected, "--server-id", "relay-2",
                                        "--from", "2026-11-01T00:00:00Z")) == 60_000,
                   timeout=300, what="the whole spool in the store")
    finally:
        proc.stop()
    out = subprocess.run([sys.executable, "-c", COUNTS, str(collected)], capture_output=True,
                         text=True, timeout=120)
    assert json.loads(out.stdout) == {"n": n, "ids": n}, out.stderr


COUNTS = """
import json, sys
from pathlib import Path
from relay.central import store
b = store.open_backend(Path(sys.argv[1]), store.StoreSettings())
[row] = b.rows("SELECT count() AS n, uniqExact(id) AS ids FROM relay.records")
print(json.dumps({k: int(v) for k, v in row.items()}))
"""


def test_parameters_reach_the_engine_as_given(embedded: tuple[Path, store.Backend]) -> None:
    """Strings with quotes, backslashes and line breaks, and arrays of tuples of
    them, are data to the engine, never SQL."""
    _, backend = embedded
    nasty = "it's \\ a\n\t'); DROP TABLE relay.records; --"
    [row] = backend.rows("SELECT {s:String} AS s, {a:Array(Tuple(String, String))} AS a",
                         {"s": nasty, "a": [(nasty, "x"), ("y", "\\'")]})
    assert row["s"] == nasty
    assert row["a"] == [[nasty, "x"], ["y", "\\'"]]
    assert count(backend) == 0  # the table is still there


def test_the_query_socket_answers_queries_and_refuses_anything_else(
        embedded: tuple[Path, store.Backend]) -> None:
    import asyncio
    import socket as socketmod

    root, backend = embedded
    plant_spool(root)
    store.Loader(root, backend).run_until_loaded()
    path = fleet.socket_path(root)
    q = Query(client_ip="198.51.100.10")

    def raw_line(data: bytes) -> dict[str, Any]:
        with socketmod.socket(socketmod.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(data)
            return json.loads(s.makefile("rb").readline())

    async def main() -> tuple[Any, ...]:
        server = await fleet.serve_queries(path, backend)
        try:
            pairs = await asyncio.to_thread(fleet.ask_collector, path, q)
            bad = await asyncio.to_thread(raw_line, b'{"drop": "table"}\n')
            worse = await asyncio.to_thread(raw_line, b"\xff" * 10 + b"\n")
            return pairs, bad, worse, path.stat().st_mode & 0o777
        finally:
            server.close()

    pairs, bad, worse, mode = asyncio.run(main())
    assert {r.session_id for r in fleet.sessions(pairs, q, pytest.fail)} == \
        {SID["alpha"], SID["charl"], SID["delta"]}
    assert "bad query" in bad["error"] and "bad query" in worse["error"]
    assert mode == 0o600
    # No collector there: None, so that the search opens the store itself.
    assert fleet.ask_collector(root / "nothing.sock", q) is None


@pytest.mark.parametrize("args, message", [
    (["--store-cluster", "fleet"], "cluster needs [store] url"),
    (["--store-url", "http://127.0.0.1:9/"], "[store] url http://127.0.0.1:9/"),
    (["--at", "2026-11-01 01:30", "--tz", NEW_YORK], "ambiguous"),
    (["--slack", "5"], "--slack widens --at"),
])
def test_collector_search_errors_are_one_line(tmp_path: Path, args: list[str],
                                              message: str) -> None:
    (tmp_path / store.STORE_DIR).mkdir()
    out = collector_search(tmp_path, *args)
    assert out.returncode == EXIT_USAGE and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_collector_search_of_a_directory_without_a_store(tmp_path: Path) -> None:
    out = collector_search(tmp_path / "nowhere")
    assert out.returncode == EXIT_USAGE and "no store here" in out.stderr, out.stderr


class RecordingStore:
    """A store that keeps what it is handed (a unit-test stand-in for a server)."""

    journal = "loaded-recording.jsonl"

    def __init__(self) -> None:
        self.inserted: list[tuple[bytes, str]] = []

    def insert_lines(self, data: bytes, token: str) -> None:
        self.inserted.append((data, token))


def test_another_store_is_loaded_from_the_whole_spool(
        embedded: tuple[Path, store.Backend]) -> None:
    """The spool is the replay source: a store the collector has not loaded
    before (say a server, after the embedded one) gets every record, by its own
    journal."""
    root, backend = embedded
    n = plant_spool(root)
    assert store.Loader(root, backend).run_until_loaded() == n
    other = RecordingStore()
    assert store.Loader(root, other).run_until_loaded() == n  # type: ignore[arg-type]
    assert sum(data.count(b"\n") for data, _ in other.inserted) == n
    assert store.Loader(root, backend).run_until_loaded() == 0


def test_a_long_query_shows_its_elapsed_time_on_a_terminal_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from relay.investigate import options

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(options, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(options, "PROGRESS_EVERY_S", 0.01)
    shown, piped = Terminal(), io.StringIO()
    with options.Elapsed("querying the store", shown), \
            options.Elapsed("querying the store", piped):
        wait_until(lambda: "querying the store... " in shown.getvalue(), timeout=10,
                   what="the progress line")
    assert shown.getvalue().endswith("\r\033[K")  # cleared when done
    assert piped.getvalue() == ""
