"""Hostile strings in the logs, shown by the real CLI: the table and text output
escapes every control and bidi character, CSV cells are neutralised against
formula injection, JSON stays valid and exact. The records are planted straight
into connection-log day files (as a relay of an older version or a forged copy
would leave them), never through the writer that cleans them."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RELAY = Path(sys.executable).with_name("relay")
DAY = "2026-03-29"

# Each value with what a table must show for it (its escaped form).
HOSTILE = {
    "clear": ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),
    "title": ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),
    "cr": ("innocent\rGUILTY", "innocent\\rGUILTY"),
    "lf": ("line1\nline2", "line1\\nline2"),
    "tab": ("a\tb", "a\\tb"),
    "nul": ("a\x00b", "a\\x00b"),
    "del": ("a\x7fb", "a\\x7fb"),
    "c1_csi": ("\x9b31mred", "\\x9b31mred"),
    "rlo": ("evil\u202etxt.exe", "evil\\u202etxt.exe"),
    "isolate": ("\u2066abc\u2069", "\\u2066abc\\u2069"),
    "marks": ("\u200e\u200f\u061c", "\\u200e\\u200f\\u061c"),
    "zero_width": ("a\u200bb\ufeff", "a\\u200bb\\ufeff"),
    "tag_char": ("x\U000e0041", "x\\U000e0041"),
    "surrogate": ("s\ud800", "s\\ud800"),
    "lookalike": ("\\x1b is text", "\\\\x1b is text"),
}
# CSV cells that a spreadsheet would evaluate (OWASP "CSV Injection").
FORMULAS = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1:A9)", "  =1+1", "\t=1+1",
            "\r=1+1"]
SAFE_UNICODE = "Müller-PC 東京"  # printable non-ASCII stays as it is


def sid(i: int) -> str:
    return f"S{i:02d}".ljust(21, "x") + "A"


def session_records(i: int, text: str, start: str = "12:00:00",
                    end: str = "13:00:00") -> list[dict[str, Any]]:
    base = {"session_id": sid(i),
            "server": {"id": text, "ip": "192.0.2.1", "hostname": text},
            "client": {"ip": "198.51.100.7", "port": 40000 + i, "hostname": text},
            "protocol": text, "client_software": {"name": text, "version": "1.0"},
            "virtual_ip": "10.211.0.2"}
    return [{**base, "id": f"c{i}", "time": f"{DAY}T{start}.000Z", "action": "connect"},
            {**base, "id": f"d{i}", "time": f"{DAY}T{end}.000Z", "action": "disconnect",
             "connect_time": f"{DAY}T{start}.000Z", "reason": text,
             "destinations": [{"host": text, "ip": "203.0.113.7", "port": 443}]}]


def plant(data: Path, records: list[dict[str, Any]], raw_lines: tuple[bytes, ...] = ()) -> None:
    d = data / "connlog"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(d / f"{DAY}.jsonl", "ab") as f:
        for rec in records:
            try:  # raw UTF-8 as the relay writes; escaped where it cannot be encoded
                line = json.dumps(rec, ensure_ascii=False).encode()
            except UnicodeEncodeError:
                line = json.dumps(rec).encode()
            f.write(line + b"\n")
        for raw in raw_lines:
            f.write(raw + b"\n")


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A data directory with one session per hostile value; name -> session ID."""
    data = tmp_path / "data"
    values = [v for v, _ in HOSTILE.values()] + FORMULAS + [SAFE_UNICODE]
    recs = [r for i, v in enumerate(values) for r in session_records(i, v)]
    plant(data, recs)
    return data, {v: sid(i) for i, v in enumerate(values)}


def relay(*argv: str) -> tuple[int, bytes, str]:
    res = subprocess.run([str(RELAY), *argv], capture_output=True, timeout=120)
    err = res.stderr.decode()
    assert "Traceback" not in err, err
    return res.returncode, res.stdout, err


def assert_terminal_safe(out: bytes, line_end: bytes = b"\n") -> str:
    """Nothing but printable characters and the line ends."""
    text = out.decode("utf-8")  # strict: a lone surrogate could not have been written
    body = text.replace(line_end.decode(), "")
    bad = sorted({f"U+{ord(c):04X}" for c in body if not c.isprintable()})
    assert not bad, f"raw non-printable characters in the output: {bad}"
    return text


def search(data: Path, *argv: str) -> tuple[int, bytes, str]:
    return relay("logs", "search", "--data-dir", str(data), "--at", f"{DAY}T12:30:00Z", *argv)


def test_search_table_escapes(hostile: tuple[Path, dict[str, str]]) -> None:
    data, sids = hostile
    code, out, _ = search(data)
    assert code == 0
    text = assert_terminal_safe(out)
    lines = text.splitlines()
    assert len(lines) == 1 + len(sids)  # a header, one line per session: no line broken
    for raw, shown in HOSTILE.values():
        line = next(x for x in lines if x.startswith(sids[raw]))
        # The host name and the client software column both show the escaped text.
        assert line.count(shown) >= 2, (shown, line)
    assert any(SAFE_UNICODE in x for x in lines)


def test_search_json_is_exact_and_escaped(hostile: tuple[Path, dict[str, str]]) -> None:
    data, sids = hostile
    code, out, _ = search(data, "--json")
    assert code == 0
    assert_terminal_safe(out)
    rows = {r["session_id"]: r for r in map(json.loads, out.decode().splitlines())}
    for raw, _ in HOSTILE.values():
        row = rows[sids[raw]]
        assert row["client_hostname"] == raw and row["protocol"] == raw
        assert row["client_software"] == f"{raw} 1.0"
    assert b"\\u001b[2J" in out and b"\\u202e" in out and b"\\ud800" in out
    assert SAFE_UNICODE.encode() in out  # readable UTF-8, not \u escapes


def test_search_csv_neutralised(hostile: tuple[Path, dict[str, str]]) -> None:
    data, sids = hostile
    # 1 session ID in 64 begins with "-" (secrets.token_urlsafe): neutralised too.
    dash = "-" + "d" * 20 + "A"
    plant(data, [{**r, "session_id": dash} for r in session_records(98, "dash")])
    code, out, _ = search(data, "--format", "csv")
    assert code == 0
    # The csv module ends rows with CRLF; inside the cells there is no control left.
    assert_terminal_safe(out, line_end=b"\r\n")
    rows = {r["session_id"]: r for r in csv.DictReader(io.StringIO(out.decode(), newline=""))}
    assert len(rows) == len(sids) + 1 and rows["'" + dash]["client_hostname"] == "dash"
    for formula in FORMULAS:
        cell = rows[sids[formula]]["client_hostname"]
        assert cell.startswith("'"), cell
        shown = formula.replace("\t", "\\t").replace("\r", "\\r")
        assert cell == "'" + shown
    for raw, shown in HOSTILE.values():
        assert rows[sids[raw]]["client_hostname"] == shown
    assert rows[sids[SAFE_UNICODE]]["client_hostname"] == SAFE_UNICODE
    # Numbers and times are never neutralised (none of our columns is negative).
    row = rows[sids["+1+1"]]
    assert row["client_port"].isdigit() and row["packets"] == "0"
    assert row["connect_utc"] == f"{DAY}T12:00:00.000Z"


def test_connections_and_ua_lookup_escape(hostile: tuple[Path, dict[str, str]]) -> None:
    data, sids = hostile
    code, out, _ = relay("logs", "connections", "--data-dir", str(data))
    assert code == 0
    lines = assert_terminal_safe(out).splitlines()
    assert len(lines) == 2 * len(sids)
    for raw, shown in HOSTILE.values():
        mine = [x for x in lines if sids[raw] in x]
        assert len(mine) == 2 and all(shown in x for x in mine), (shown, mine)
    code, out, _ = relay("logs", "connections", "--data-dir", str(data), "--json")
    assert code == 0
    assert_terminal_safe(out)
    recs = [json.loads(x) for x in out.decode().splitlines()]
    assert {r["client"]["hostname"] for r in recs} >= {v for v, _ in HOSTILE.values()}
    # ua-lookup: a forged session ID and relay name carrying escapes.
    evil_sid = "EVILTAG1\x1b]0;x\x07\u202e"
    plant(data, [{**session_records(99, "\x1b[31mrelay\u202e")[0], "session_id": evil_sid}])
    code, out, _ = relay("logs", "ua-lookup", "--data-dir", str(data), "Mozilla/5.0 EVILTAG1")
    assert code == 0
    text = assert_terminal_safe(out)
    assert "EVILTAG1\\x1b]0;x\\x07\\u202e" in text and "\\x1b[31mrelay\\u202e" in text
    code, out, _ = relay("logs", "ua-lookup", "--data-dir", str(data), "--json",
                         "Mozilla/5.0 EVILTAG1")
    assert code == 0
    assert_terminal_safe(out)
    assert json.loads(out)["session_id"] == evil_sid


def test_records_of_the_wrong_shape(tmp_path: Path) -> None:
    """Fields of another type or a time that is not one: a warning, no traceback,
    and the good records still answered."""
    data = tmp_path / "data"
    good = session_records(1, "ok")
    bad = {"session_id": sid(2), "action": "connect", "time": "\x1b[2Jnot a time",
           "client": "198.51.100.9"}
    odd = {**session_records(3, "odd")[1], "client": ["x"], "server": 7,
           "client_software": "str", "destinations": 5, "packets": "many"}
    naive = {**session_records(4, "naive")[0], "time": f"{DAY}T12:00:00"}
    plant(data, [*good, bad, odd, naive], raw_lines=(b'\x1b[2J{"action": "connect", torn',))
    code, out, err = search(data, "--json")
    assert code == 0
    assert {r["session_id"] for r in map(json.loads, out.decode().splitlines())} == \
        {sid(1), sid(3)}
    assert err.count("relay: warning:") == 3, err  # bad time, naive time, not JSON
    assert "\x1b" not in err
    code, out, err = search(data, "--dst", "203.0.113.7", "--client-ip", "198.51.100.7")
    assert code == 0 and sid(1) in out.decode()
    code, out, err = relay("logs", "connections", "--data-dir", str(data))
    assert code == 0
    assert_terminal_safe(out)
    assert_terminal_safe(err.encode())


# ------------------------------------------------------------------ -o files


@pytest.fixture
def outputs(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    """A data directory and, per command that takes -o, its argv up to -o."""
    data = tmp_path / "data"
    plant(data, session_records(1, "host.example"))
    bundle = tmp_path / "case.tar"
    code, _, err = relay("logs", "disclose", "--data-dir", str(data), "--at",
                         f"{DAY}T12:30:00Z", "-o", str(bundle))
    assert code == 0, err
    at = ["--data-dir", str(data), "--at", f"{DAY}T12:30:00Z"]
    return tmp_path, {
        "search": ["logs", "search", *at, "--format", "csv"],
        "export-pcap": ["logs", "export-pcap", *at],
        "disclose": ["logs", "disclose", *at],
        "verify": ["logs", "verify", "--data-dir", str(data)],
        "verify-bundle": ["logs", "verify-bundle", str(bundle)],
    }


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("command", ["search", "export-pcap", "disclose", "verify",
                                     "verify-bundle"])
def test_output_refuses_symlink(outputs: tuple[Path, dict[str, list[str]]],
                                command: str) -> None:
    tmp, argv = outputs
    victim = tmp / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    out_dir = tmp / "out"
    out_dir.mkdir()
    link = out_dir / "result"
    link.symlink_to(victim)
    code, out, err = relay(*argv[command], "-o", str(link))
    assert code == 1 and out == b""
    assert err.startswith(f"relay: error: -o {link}: is a symbolic link") and \
        err.count("\n") == 1, err
    assert victim.read_text() == "precious\n" and victim.stat().st_mode & 0o777 == 0o644
    assert link.is_symlink() and link.readlink() == victim
    # A dangling link: nothing is created where it points.
    link.unlink()
    link.symlink_to(tmp / "created-by-the-link")
    code, _, err = relay(*argv[command], "-o", str(link))
    assert code == 1 and "is a symbolic link" in err
    assert not (tmp / "created-by-the-link").exists()
    assert leftovers(out_dir) == []


@pytest.mark.parametrize("command", ["search", "export-pcap", "disclose", "verify",
                                     "verify-bundle"])
def test_output_private_and_replaced_atomically(outputs: tuple[Path, dict[str, list[str]]],
                                                command: str) -> None:
    tmp, argv = outputs
    target = tmp / "out" / "result"
    target.parent.mkdir()
    res = subprocess.run([str(RELAY), *argv[command], "-o", str(target)], umask=0,
                         capture_output=True, timeout=120)
    assert b"Traceback" not in res.stderr and target.stat().st_size > 0, res.stderr
    assert target.stat().st_mode & 0o777 == 0o600
    first = target.read_bytes()
    # An existing file (world-readable, with a second hard link) is replaced by a
    # new private file; the other link keeps the old content, nothing is written
    # through it.
    target.write_bytes(b"old")
    target.chmod(0o644)
    other = tmp / "other-link"
    other.hardlink_to(target)
    res = subprocess.run([str(RELAY), *argv[command], "-o", str(target)], umask=0,
                         capture_output=True, timeout=120)
    assert b"Traceback" not in res.stderr, res.stderr
    assert target.stat().st_mode & 0o777 == 0o600 and target.stat().st_nlink == 1
    assert other.read_bytes() == b"old"
    if command in ("search", "export-pcap", "verify-bundle"):
        assert target.read_bytes() == first  # same answer (disclose and verify stamp times)
    else:
        assert target.read_bytes() != b"old"
    assert leftovers(target.parent) == []


def test_output_link_planted_while_writing(tmp_path: Path) -> None:
    """A symbolic link put at the path after the check is replaced by the rename,
    never followed."""
    from relay.safeout import private_file

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "result"
    with private_file(target) as f:
        f.write("answer\n")
        target.symlink_to(victim)
    assert not target.is_symlink() and target.read_text() == "answer\n"
    assert victim.read_text() == "precious\n"
    assert leftovers(tmp_path) == []
