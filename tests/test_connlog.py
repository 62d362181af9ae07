"""The connection log file format: private files, one JSON per line, torn lines."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from relay.connlog import daylog, reader
from relay.serve.sessions import tags_in_log


def test_records_go_to_the_day_of_their_time_with_ids(tmp_path: Path) -> None:
    clock = iter([86400 * 20000 + 10.5, 86400 * 20001 + 0.25]).__next__
    log = daylog.ConnectionLog(tmp_path, clock=clock)
    a = log.append({"action": "connect", "session_id": "abcdefgh-rest"})
    b = log.append({"action": "disconnect", "session_id": "abcdefgh-rest"})
    log.close()
    assert a["time"] == "2024-10-04T00:00:10.500Z" and b["time"] == "2024-10-05T00:00:00.250Z"
    assert a["id"] != b["id"] and len(a["id"]) == 24
    files = [d.source for d in reader.log_days(tmp_path)]
    assert [f.name for f in files] == ["2024-10-04.jsonl", "2024-10-05.jsonl"]
    assert stat.S_IMODE((tmp_path / "connlog").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert list(reader.iter_records(tmp_path)) == [a, b]
    assert tags_in_log(tmp_path) == {"abcdefgh"}


def test_torn_line_is_reported_and_does_not_corrupt_the_next(tmp_path: Path) -> None:
    log = daylog.ConnectionLog(tmp_path, clock=lambda: 1e9)
    first = log.append({"action": "connect"})
    log.close()
    path = reader.log_days(tmp_path)[0].source
    with open(path, "ab") as f:
        f.write(b'{"action":"disconn')  # a crash mid-write
    errors: list[str] = []
    assert list(reader.iter_records(tmp_path, errors.append)) == [first]
    assert "incomplete last line" in errors[0]
    log = daylog.ConnectionLog(tmp_path, clock=lambda: 1e9)
    second = log.append({"action": "connect"})
    errors.clear()
    assert list(reader.iter_records(tmp_path, errors.append)) == [first, second]
    assert len(errors) == 1 and "not JSON" in errors[0]


def test_client_strings_cannot_break_a_line(tmp_path: Path) -> None:
    log = daylog.ConnectionLog(tmp_path)
    evil = 'x"}\n{"action":"forged"}\u2028'
    log.append({"action": "connect", "client_software": {"name": evil}})
    raw = reader.log_days(tmp_path)[0].source.read_bytes()
    assert raw.count(b"\n") == 1
    [rec] = reader.iter_records(tmp_path)
    assert rec["client_software"]["name"] == evil and json.loads(raw)["action"] == "connect"
