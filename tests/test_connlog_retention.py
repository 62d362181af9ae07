"""Local retention of the connection log: compress after N days, delete after keep."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relay.connlog import daylog, reader
from relay.connlog.forwarder import LogReader, Position
from relay.connlog.retention import (
    apply_retention,
    check_keep_days,
    run_connlog_retention,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC).timestamp()


def clock() -> float:
    return NOW


def day(n: int) -> str:
    """The day n days before NOW."""
    return (datetime.fromtimestamp(NOW, UTC) - timedelta(days=n)).date().isoformat()


def fill(data_dir: Path, ages: range) -> dict[str, list[dict]]:
    """One log with two records on each day of the given ages (days before NOW)."""
    by_day: dict[str, list[dict]] = {}
    for age in ages:
        t = NOW - age * 86400
        log = daylog.ConnectionLog(data_dir, clock=lambda t=t: t)
        by_day[day(age)] = [log.append({"action": "connect", "n": i}) for i in range(2)]
        log.close()
    return by_day


def test_compress_and_delete_by_age(tmp_path: Path) -> None:
    by_day = fill(tmp_path, range(0, 100))
    audit: list[dict] = []
    actions = apply_retention(tmp_path / "connlog", keep_days=90, compress_after_days=1,
                              clock=clock, audit=audit.append)
    assert actions == audit
    names = {p.name for p in (tmp_path / "connlog").iterdir()}
    assert f"{day(0)}.jsonl" in names and f"{day(1)}.jsonl" in names  # today, yesterday plain
    for age in range(2, 91):
        assert f"{day(age)}.jsonl.zst" in names and f"{day(age)}.jsonl" not in names
    for age in range(91, 100):
        assert not any(n.startswith(day(age)) for n in names)
    deleted = [a for a in audit if a["action"] == "connlog-deleted"]
    compressed = [a for a in audit if a["action"] == "connlog-compressed"]
    assert sorted(a["day"] for a in deleted) == sorted(day(a) for a in range(91, 100))
    assert len(compressed) == 89 and all(a["bytes_out"] > 0 for a in compressed)
    # Every kept record still reads back, in order, from plain and .zst days.
    kept = [r for age in range(90, -1, -1) for r in by_day[day(age)]]
    assert list(reader.iter_records(tmp_path)) == kept
    for p in (tmp_path / "connlog").iterdir():
        assert p.stat().st_mode & 0o777 == 0o600
    # A second pass has nothing to do.
    assert apply_retention(tmp_path / "connlog", clock=clock) == []


def test_keep_is_never_below_90_days_and_configurable_upward(tmp_path: Path) -> None:
    assert check_keep_days(90) == 90  # the README's floor, not a constant read back
    with pytest.raises(ValueError, match="at least 90"):
        check_keep_days(89)
    with pytest.raises(ValueError, match="at least 90"):
        apply_retention(tmp_path, keep_days=30, clock=clock)
    fill(tmp_path, range(95, 125))
    apply_retention(tmp_path / "connlog", keep_days=120, clock=clock)
    left = sorted(p.name[:10] for p in (tmp_path / "connlog").iterdir())
    assert left == sorted(day(a) for a in range(95, 121))


def test_late_lines_for_a_compressed_day_are_merged(tmp_path: Path) -> None:
    by_day = fill(tmp_path, range(5, 6))
    d = tmp_path / "connlog"
    apply_retention(d, clock=clock)
    # A torn last line (crash mid-write) must not swallow the next record.
    (d / f"{day(5)}.jsonl").write_bytes(b'{"id":"late","action":"ban"}\n{"id":"torn"')
    [action] = apply_retention(d, clock=clock)
    assert action["merged"] is True
    lines = reader.uncompressed(d / f"{day(5)}.jsonl.zst").splitlines()
    assert [json.loads(x)["id"] for x in lines[:3]] == [r["id"] for r in by_day[day(5)]] + ["late"]
    assert lines[3] == b'{"id":"torn"'
    assert not (d / f"{day(5)}.jsonl").exists()


def test_forwarder_offsets_stay_valid_across_compression(tmp_path: Path) -> None:
    by_day = fill(tmp_path, range(3, 4))
    d = tmp_path / "connlog"
    first, pos, _ = LogReader(d).read(Position(), 1 << 20, NOW)
    one_line = first.index(b"\n") + 1
    apply_retention(d, clock=clock)
    assert not (d / f"{day(3)}.jsonl").exists()
    rest, end, notes = LogReader(d).read(Position(day(3), one_line), 1 << 20, NOW)
    assert json.loads(rest)["id"] == by_day[day(3)][1]["id"] and notes == []
    assert end == pos


def test_leftover_tmp_and_foreign_files_are_ignored(tmp_path: Path) -> None:
    d = tmp_path / "connlog"
    daylog.ensure_dir(d)
    (d / "README").write_text("not a day")
    (d / "2020-13-45.jsonl").write_text("bad date\n")
    (d / f"{day(10)}.jsonl.zst.tmp").write_bytes(b"half")
    assert apply_retention(d, clock=clock) == []
    assert len(os.listdir(d)) == 3


def test_retention_task_audits_on_the_loop(tmp_path: Path) -> None:
    fill(tmp_path, range(0, 95))
    audit: list[dict] = []

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def record(action: dict) -> None:
            assert asyncio.get_running_loop() is loop  # the connlog writer's thread
            if action["action"] == "connlog-sealed":  # the evidence chain's, tested there
                return
            audit.append(action)
            if len(audit) == 4 + 89:  # deleted: ages 91..94; compressed: ages 2..90
                stop.set()

        task = asyncio.create_task(run_connlog_retention(tmp_path, 90, stop, record,
                                                         clock=clock, interval=0.05))
        await asyncio.wait_for(task, 30)

    asyncio.run(main())
    assert {a["action"] for a in audit} == {"connlog-deleted", "connlog-compressed"}
    assert sum(a["action"] == "connlog-deleted" for a in audit) == 4
