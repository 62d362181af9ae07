"""Retention over 15 simulated days with an injected clock and disk: archiving
after 14 days, deletion by age, the free-disk guard, refusing sessions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from packetlog_synth import make_records, to_c

from relay.packetlog import segments
from relay.packetlog.retention import DAY, SEARCHABLE_SECONDS, Retention

START = 1_700_006_400.0  # a UTC midnight + 6 h multiple
SEGMENT = 6 * 3600       # rotation under test every 6 h: 60 segments in 15 days
PER_SEGMENT = 300


def _simulate(tmp_path: Path, retention_kw: dict[str, Any]) -> tuple[
        list[dict[str, Any]], list[float], Retention, int]:
    clock = [START]
    audit: list[dict[str, Any]] = []
    w = segments.PacketLogWriter(tmp_path, segment_seconds=SEGMENT,
                                  clock=lambda: clock[0], audit=audit.append)
    w.open()
    ret = Retention(tmp_path, audit=audit.append, clock=lambda: clock[0], **retention_kw)
    total = 0
    while clock[0] < START + 15 * DAY:
        recs = make_records(PER_SEGMENT, seed=int(clock[0]), start_ns=int(clock[0] * 1e9))
        w.write(to_c(recs), len(recs))
        total += len(recs)
        clock[0] += SEGMENT
        w.tick()
        ret.run()
        # Invariant at every step: nothing with records younger than 14 days is
        # archived or deleted.
        for p in segments.packets_dir(tmp_path).iterdir():
            if p.name.endswith(segments.ARCHIVE_SUFFIX):
                assert clock[0] - segments.segment_index(p)["t_max"] / 1e9 >= SEARCHABLE_SECONDS
    w.close()
    return audit, clock, ret, total


def test_archive_after_14_days_and_still_readable(tmp_path: Path) -> None:
    audit, clock, ret, total = _simulate(tmp_path, {})
    archives = [a for a in audit if a["action"] == "packetlog-archive"]
    # Segments whose newest record is 14 days old by the end: day 0 up to ~day 1.
    assert 3 <= len(archives) <= 6
    for a in archives:
        assert a["records"] == PER_SEGMENT and Path(a["archive"]).exists()
        assert not Path(a["file"]).exists()
    d = segments.packets_dir(tmp_path)
    segs = list(d.glob("*" + segments.SEGMENT_SUFFIX))
    assert len(segs) + len(archives) == 60
    assert all(clock[0] - segments.segment_index(p)["t_max"] / 1e9 < SEARCHABLE_SECONDS
               for p in segs)
    # Archives are in the same format: every record is still there.
    assert sum(1 for _ in segments.iter_records(tmp_path)) == total
    assert not [a for a in audit if a["action"] == "packetlog-delete"]
    assert ret.disk_too_full() is False


def _segments_by_age(data: Path, now: float, ages: dict[str, float]) -> dict[str, Path]:
    """One closed segment per name, whose newest record is ``ages[name]`` seconds
    before ``now`` and whose oldest is an hour older still."""
    clock = [now - 40 * DAY]
    rotated: list[dict[str, Any]] = []
    w = segments.PacketLogWriter(data, segment_seconds=SEGMENT, clock=lambda: clock[0],
                                  audit=rotated.append)
    w.open()
    for i, age in enumerate(ages.values()):
        recs = make_records(2, seed=i)
        recs[0]["time_ns"] = int((now - age - 3600) * 1e9)
        recs[1]["time_ns"] = int((now - age) * 1e9)
        w.write(to_c(recs), len(recs))
        clock[0] += SEGMENT
        w.tick()
    assert [r["action"] for r in rotated] == ["packetlog-rotate"] * len(ages)
    return {name: Path(r["file"]) for name, r in zip(ages, rotated, strict=True)}


def test_delete_after_cuts_at_the_newest_record_to_the_second(tmp_path: Path) -> None:
    """The cut-off: a file whose newest record is delete_after old or older goes,
    one a second younger stays (archived), whatever the age of its oldest record."""
    delete_after = 20 * DAY
    now = START + 60 * DAY
    files = _segments_by_age(tmp_path, now, {
        "a second past": delete_after + 1, "exactly at": delete_after,
        "a second short": delete_after - 1, "fifteen days": 15 * DAY, "today": 3600})
    audit: list[dict[str, Any]] = []
    Retention(tmp_path, audit=audit.append, clock=lambda: now, delete_after=delete_after).run()
    def archive(name: str) -> Path:
        return files[name].with_name(files[name].name.removesuffix(segments.SEGMENT_SUFFIX)
                                     + segments.ARCHIVE_SUFFIX)

    # Every file past 14 days is archived first; the deletion pass then takes the
    # archives at or past the cut-off.
    archived = {a["file"] for a in audit if a["action"] == "packetlog-archive"}
    assert archived == {str(files[n]) for n in
                        ("a second past", "exactly at", "a second short", "fifteen days")}
    deleted = [a for a in audit if a["action"] == "packetlog-delete"]
    assert {a["file"] for a in deleted} == {str(archive("a second past")),
                                            str(archive("exactly at"))}
    assert {a["reason"] for a in deleted} == {"older than delete_after"}
    assert not archive("a second past").exists() and not archive("exactly at").exists()
    assert archive("a second short").exists() and archive("fifteen days").exists()
    assert files["today"].exists()


def test_delete_after_is_at_least_14_days() -> None:
    Retention("/nonexistent", audit=print, delete_after=SEARCHABLE_SECONDS)
    with pytest.raises(ValueError, match="at least 14 days"):
        Retention("/nonexistent", audit=print, delete_after=SEARCHABLE_SECONDS - 1)


def test_disk_guard_deletes_oldest_archives_only(tmp_path: Path) -> None:
    free = [10 << 30]
    _, _, ret, _ = _simulate(tmp_path, {"disk_free": lambda: free[0]})
    d = segments.packets_dir(tmp_path)
    archives = sorted(d.glob("*" + segments.ARCHIVE_SUFFIX))
    segs = sorted(d.glob("*" + segments.SEGMENT_SUFFIX))
    assert len(archives) >= 3
    # The disk fills up: each deletion frees the file's size.
    free[0] = ret.min_free_bytes - archives[0].stat().st_size - 1
    sizes = {str(p): p.stat().st_size for p in archives}

    def freed() -> int:
        gone = sum(s for p, s in sizes.items() if not Path(p).exists())
        return ret.min_free_bytes - sizes[str(archives[0])] - 1 + gone

    ret.disk_free = freed
    done = ret.run()
    assert [a["file"] for a in done] == [str(p) for p in archives[:2]]
    assert all(a["reason"] == "disk guard" for a in done)
    assert all(p.exists() for p in segs)  # younger than 14 days: never touched
    # With no archive left to delete the guard stops, and sessions are refused.
    ret.disk_free = lambda: 1 << 20
    ret.run()
    assert not list(d.glob("*" + segments.ARCHIVE_SUFFIX))
    assert all(p.exists() for p in segs)
    assert ret.disk_too_full() is True and "refusing new sessions" in ret.why_refused()
