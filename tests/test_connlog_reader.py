"""relay/connlog/reader.py: listing day files, reading them from an offset (a .zst
streamed), a day's content, and its lines and records under one torn-line rule,
the same for every reader of the connection log."""

from __future__ import annotations

import json
import os
import tarfile
import time
from datetime import UTC, date
from pathlib import Path
from typing import Any

import pytest
import zstandard

from relay import cli, sessionquery
from relay.connlog import reader
from relay.connlog.forwarder import LogReader, Position
from relay.investigate import evidence, search

DAY1, DAY2 = "2026-03-28", "2026-03-29"
pack = zstandard.ZstdCompressor().compress


def session(letter: str, day: str, start: str, end: str) -> list[dict[str, Any]]:
    sid = letter * 21 + "A"
    base = {"session_id": sid, "server": {"id": "relay-1", "ip": "192.0.2.1"},
            "client": {"ip": "198.51.100.7", "port": 40000}, "protocol": "cstp"}
    return [{"id": f"{letter}-c", "time": f"{day}T{start}.000Z", "action": "connect", **base},
            {"id": f"{letter}-d", "time": f"{day}T{end}.000Z", "action": "disconnect",
             "connect_time": f"{day}T{start}.000Z", **base}]


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)


def connlog(data: Path) -> Path:
    d = data / "connlog"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def messages(day: reader.Day) -> list[str]:
    errors: list[str] = []
    list(reader.lines(day, errors.append))
    return errors


def test_days_lists_plain_and_compressed_files_the_plain_one_while_both_exist(
        tmp_path: Path) -> None:
    d = connlog(tmp_path)
    (d / "2026-03-27.jsonl.zst").write_bytes(pack(b'{"n":1}\n'))
    (d / f"{DAY1}.jsonl").write_bytes(b'{"n":2}\n')
    (d / f"{DAY1}.jsonl.zst").write_bytes(pack(b'{"n":2}\n'))  # retention mid-compression
    (d / "2026-02-30.jsonl").write_bytes(b"{}\n")  # a day's shape, no day
    for foreign in ("README", "junk.jsonl", f"{DAY2}.jsonl.zst.tmp", f"{DAY2}.json"):
        (d / foreign).write_bytes(b"x")
    days = reader.log_days(tmp_path)
    assert [x.name for x in days] == ["2026-02-30", "2026-03-27", DAY1]
    assert [x.date for x in days] == [None, date(2026, 3, 27), date(2026, 3, 28)]
    assert [x.newest for x in days] == [False, False, True]
    both = days[2]
    assert both.files == [d / f"{DAY1}.jsonl.zst", d / f"{DAY1}.jsonl"]
    assert both.source == d / f"{DAY1}.jsonl"
    assert days[1].source == d / "2026-03-27.jsonl.zst"
    assert reader.days(tmp_path / "nowhere") == []
    assert reader.day_in(d, DAY1) == reader.Day(DAY1, both.zst, both.plain)


def test_reading_from_an_offset_streams_a_compressed_day(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "READ_CHUNK", 4096)
    data = b"".join(b'{"n":%d}\n' % i for i in range(20000))
    plain, zst = tmp_path / f"{DAY1}.jsonl", tmp_path / f"{DAY2}.jsonl.zst"
    plain.write_bytes(data)
    zst.write_bytes(pack(data))
    for path in (plain, zst):
        chunks = list(reader.stream(path, 1234))
        assert b"".join(chunks) == data[1234:]
        assert max(map(len, chunks)) <= 4096  # never the whole day in memory
        assert reader.uncompressed(path) == data
        assert reader.uncompressed_size(path) == len(data)
    unsized = tmp_path / "2026-03-30.jsonl.zst"
    unsized.write_bytes(zstandard.ZstdCompressor(write_content_size=False).compress(data))
    assert reader.uncompressed_size(unsized) == len(data)
    days = reader.DayReader()
    try:
        assert days.read(zst, 0, 100) == data[:100]
        assert days.read(zst, 100, 5000) == data[100:5100]  # on from the kept reader
        assert days.read(zst, 50, 10) == data[50:60]  # backwards: decompressed again
        assert days.read(plain, 7, 3) == data[7:10]
        assert days.read(zst, len(data) - 3, 100) == data[-3:]
    finally:
        days.close()


def test_content_joins_the_parts_each_ended_and_lines_follow_it(tmp_path: Path) -> None:
    d = connlog(tmp_path)
    (d / f"{DAY1}.jsonl.zst").write_bytes(pack(b'{"a":1}\n{"torn"'))
    (d / f"{DAY1}.jsonl").write_bytes(b'{"b":2}\n{"late')
    [day] = reader.log_days(tmp_path)
    assert reader.content(day) == b'{"a":1}\n{"torn"\n{"b":2}\n{"late\n'
    errors: list[str] = []
    got = [(p.name, n, raw) for p, n, raw in reader.lines(day, errors.append)]
    assert got == [(f"{DAY1}.jsonl.zst", 1, b'{"a":1}'), (f"{DAY1}.jsonl.zst", 2, b'{"torn"'),
                   (f"{DAY1}.jsonl", 1, b'{"b":2}')]
    assert errors == [f"{d / DAY1}.jsonl:2: incomplete last line (6 bytes, no LF) skipped: "
                      "being written, or torn by a crash"]
    blocks = list(reader.blocks(day))
    assert all(block.endswith(b"\n") for _, _, block in blocks)
    assert b"".join(block for _, _, block in blocks) + b'{"late\n' == reader.content(day)


def test_an_incomplete_last_line_is_torn_once_a_later_day_exists_and_it_is_quiet(
        tmp_path: Path) -> None:
    d = connlog(tmp_path)
    first = d / f"{DAY1}.jsonl"
    first.write_bytes(b'{"n":1}\n{"n":2}')
    [day] = reader.log_days(tmp_path)
    assert "being written, or torn by a crash" in messages(day)[0]
    old = time.time() - reader.TORN_TAIL_GRACE_S - 5
    os.utime(first, (old, old))
    assert "being written, or torn by a crash" in messages(day)[0]  # still the newest day
    (d / f"{DAY2}.jsonl").write_bytes(b'{"n":3}\n')
    day = reader.log_days(tmp_path)[0]
    assert messages(day) == [f"{first}:2: incomplete last line (7 bytes, no LF) skipped: "
                             "torn by a crash"]
    os.utime(first)  # changed just now: the writer may still be at it
    assert "being written" in messages(reader.log_days(tmp_path)[0])[0]
    now = 1000.0
    assert not reader.tail_is_torn(now - 60, False, now)
    assert not reader.tail_is_torn(now - 1, True, now)
    assert reader.tail_is_torn(now - reader.TORN_TAIL_GRACE_S - 0.1, True, now)


def test_bad_lines_are_skipped_and_compressed_days_read(tmp_path: Path) -> None:
    d = connlog(tmp_path)
    (d / "2024-01-01.jsonl.zst").write_bytes(pack(b'{"action":"connect","n":1}\n'))
    (d / "2024-01-02.jsonl").write_bytes(b'[1,2]\n\xff\xfe\n{"action":"connect","n":2}\n')
    errors: list[str] = []
    recs = list(reader.iter_records(tmp_path, errors.append))
    assert [r["n"] for r in recs] == [1, 2]
    assert len(errors) == 2


def test_hostile_lines_and_a_damaged_archive_are_reported_not_raised(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A line nested deeper than the JSON parser recurses, and an archived day
    that is not zstd: one warning each from every reader (before, relay logs
    connections ended in a RecursionError or ZstdError traceback, and search in
    the RecursionError), the good records still answered."""
    d = connlog(tmp_path)
    (d / f"{DAY1}.jsonl.zst").write_bytes(b"not zstd at all")
    nested = b"[" * 100_000 + b'{"action":"connect"}'
    good = session("A", DAY2, "10:00:00", "11:00:00")
    (d / f"{DAY2}.jsonl").write_bytes(nested + b"\n" + jsonl(good))
    # 3: the listing may lack records (relay.errors.EXIT_INCOMPLETE).
    assert cli.main(["logs", "connections", "--json", "--data-dir", str(tmp_path)]) == 3
    out, err = capsys.readouterr()
    assert [json.loads(x)["id"] for x in out.splitlines()] == ["A-c", "A-d"]
    assert "Traceback" not in err and err.count("relay: warning:") == 2, err
    assert f"{DAY1}.jsonl.zst:1: unreadable" in err and f"{DAY2}.jsonl:1: not JSON" in err
    errors: list[str] = []
    rows, _ = search.find_sessions(tmp_path, sessionquery.Query(), errors.append)
    assert list(rows) == ["A" * 21 + "A"] and len(errors) == 2


def test_the_same_torn_day_gives_the_same_records_to_every_reader(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A crash tore the last line of a day exactly before its LF, so that the bytes
    are a whole JSON record; a later day exists and the file is quiet. The
    forwarder, relay logs connections, search and disclose all leave it out (search
    and disclose used to answer it, the others not)."""
    data = tmp_path / "data"
    d = connlog(data)
    a, c = session("A", DAY1, "10:00:00", "11:00:00"), session("C", DAY2, "09:00:00",
                                                              "09:30:00")
    torn = session("B", DAY1, "12:00:00", "13:00:00")[0]
    first = d / f"{DAY1}.jsonl"
    first.write_bytes(jsonl(a) + jsonl([torn])[:-1])
    (d / f"{DAY2}.jsonl").write_bytes(jsonl(c))
    old = time.time() - reader.TORN_TAIL_GRACE_S - 5
    os.utime(first, (old, old))
    complete = {"A-c", "A-d", "C-c", "C-d"}

    # The forwarder: everything it would ship, and the note it makes.
    shipped: set[str] = set()
    notes: list[str] = []
    logs, pos = LogReader(d), Position()
    try:
        while True:
            chunk, nxt, skips = logs.read(pos, 1 << 20, time.time())
            notes += [s.note for s in skips]
            shipped |= {json.loads(line)["id"] for line in chunk.splitlines()}
            if nxt == pos:
                break
            pos = nxt
    finally:
        logs.close()
    assert shipped == complete
    assert any("torn last line" in n for n in notes)

    # relay logs connections (and ua-lookup, on the same iterator).
    assert cli.main(["logs", "connections", "--json", "--data-dir", str(data)]) == 3
    out, err = capsys.readouterr()
    assert {json.loads(x)["id"] for x in out.splitlines()} == complete
    assert "incomplete last line" in err and "torn by a crash" in err

    # search, and disclose's bundle.
    errors: list[str] = []
    rows, known = search.find_sessions(data, sessionquery.Query(), errors.append)
    assert {rec["id"] for r in rows.values() for rec in (r.connect, r.disconnect) if rec} \
        == complete
    assert "B" * 21 + "A" not in known and any("incomplete last line" in e for e in errors)
    bundle = tmp_path / "case.tar"
    evidence.disclose(data, sessionquery.Query(), UTC, bundle, on_error=lambda *_: None, argv=[])
    with tarfile.open(bundle) as tar:
        member = tar.extractfile("connlog.jsonl")
        assert member is not None
        assert {json.loads(x)["id"] for x in member.read().splitlines()} == complete
