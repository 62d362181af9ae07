"""Hostile strings in the logs, shown by the real CLI: the table and text output
escapes every control and bidi character, CSV cells are neutralised against
formula injection, JSON stays valid and exact. The records are planted straight
into connection-log day files (as a relay of an older version or a forged copy
would leave them), never through the writer that cleans them."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from relay import cli

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


# What a search of planted records ends with: a connection log and no packet log,
# so the packet counts are unknown and the results incomplete (relay.errors).
NO_PACKET_LOG = 3


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
    assert code == NO_PACKET_LOG
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
    assert code == NO_PACKET_LOG
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
    assert code == NO_PACKET_LOG
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
    assert code == NO_PACKET_LOG
    text = assert_terminal_safe(out)
    assert "EVILTAG1\\x1b]0;x\\x07\\u202e" in text and "\\x1b[31mrelay\\u202e" in text
    code, out, _ = relay("logs", "ua-lookup", "--data-dir", str(data), "--json",
                         "Mozilla/5.0 EVILTAG1")
    assert code == NO_PACKET_LOG
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
    assert code == NO_PACKET_LOG
    assert {r["session_id"] for r in map(json.loads, out.decode().splitlines())} == \
        {sid(1), sid(3)}
    # Bad time, naive time, not JSON; and the packet log that is not there.
    assert err.count("relay: warning:") == 4, err
    assert "\x1b" not in err
    code, out, err = search(data, "--dst", "203.0.113.7", "--client-ip", "198.51.100.7")
    assert code == NO_PACKET_LOG and sid(1) in out.decode()
    code, out, err = relay("logs", "connections", "--data-dir", str(data))
    assert code == 3  # a line that is not a record: the listing may lack one
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
    assert code == 3 and "no packet log" in err, err  # 3: the bundle has no packets
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
    assert code == 2 and out == b""
    assert err.startswith(f"relay: error: -o {link}: is a symbolic link") and \
        err.count("\n") == 1, err
    assert victim.read_text() == "precious\n" and victim.stat().st_mode & 0o777 == 0o644
    assert link.is_symlink() and link.readlink() == victim
    # A dangling link: nothing is created where it points.
    link.unlink()
    link.symlink_to(tmp / "created-by-the-link")
    code, _, err = relay(*argv[command], "-o", str(link))
    assert code == 2 and "is a symbolic link" in err
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


# ------------------------------------------------------------------ verify-bundle


@pytest.fixture
def members(tmp_path: Path) -> dict[str, bytes]:
    """The members of a bundle disclose wrote (a session with no packets)."""
    data = tmp_path / "data"
    plant(data, session_records(1, "host.example"))
    bundle = tmp_path / "good.tar"
    code, _, err = relay("logs", "disclose", "--data-dir", str(data), "--at",
                         f"{DAY}T12:30:00Z", "-o", str(bundle))
    assert code == 3 and "no packet log" in err, err  # 3: the bundle has no packets
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]


Entry = tuple[str, bytes] | tarfile.TarInfo


def write_bundle(path: Path, entries: list[Entry]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tar.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tar.addfile(info, io.BytesIO(e[1]))
    return path


def with_manifest(members: dict[str, bytes], change: Any) -> list[Entry]:
    manifest = json.loads(members["manifest.json"])
    changed = change(manifest)
    raw = changed if isinstance(changed, bytes) else json.dumps(changed).encode()
    return [("manifest.json", raw), *((n, b) for n, b in members.items()
                                      if n != "manifest.json")]


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def verify_bundle(capsys: pytest.CaptureFixture[str], bundle: Path) -> tuple[int, str, str]:
    code = cli.main(["logs", "verify-bundle", str(bundle)])
    out, err = capsys.readouterr()
    assert code == (2 if err else 3), out + err  # 2: not a bundle; 3: damaged members
    assert err.count("\n") <= 1 and "Traceback" not in err, err
    return code, out, err


def drop(d: dict[str, Any], key: str) -> dict[str, Any]:
    d.pop(key)
    return d


MALFORMED_MANIFESTS = {
    "not JSON": (lambda m: b"{not json", "manifest.json is not JSON"),
    "nested": (lambda m: b"[" * 100_000, "manifest.json is not JSON"),
    "a list": (lambda m: [m], "malformed: not a JSON object"),
    "other format": (lambda m: {**m, "format": "x"}, "malformed: its format is not"),
    "no members": (lambda m: drop(m, "members"), "malformed: members must list"),
    "member missing": (lambda m: {**m, "members": {k: v for k, v in m["members"].items()
                                                   if k != "packets.pcapng"}},
                       "malformed: members must list"),
    "digest a number": (lambda m: {**m, "members": {k: {**v, "sha256": 5} for k, v in
                                                    m["members"].items()}},
                        "malformed: members sessions.json: needs sha256"),
    "size negative": (lambda m: {**m, "members": {k: {**v, "size": -1} for k, v in
                                                  m["members"].items()}},
                      "needs sha256 (text) and size"),
    "sources a list": (lambda m: {**m, "sources": {"packets": [], "connlog": {}}},
                       "malformed: sources packets"),
    "no chain": (lambda m: drop(m, "chain"), "malformed: chain packets"),
    "chain line a number": (lambda m: {**m, "chain": {"packets": [], "connlog": [5]}},
                            "malformed: chain connlog"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_MANIFESTS))
def test_verify_bundle_malformed_manifest(capsys: pytest.CaptureFixture[str],
                                          members: dict[str, bytes], tmp_path: Path,
                                          case: str) -> None:
    change, message = MALFORMED_MANIFESTS[case]
    bundle = write_bundle(tmp_path / "b.tar", with_manifest(members, change))
    _, out, err = verify_bundle(capsys, bundle)
    assert out == "" and err.startswith(f"relay: error: {bundle}: ") and message in err, err


def test_verify_bundle_not_a_bundle(capsys: pytest.CaptureFixture[str],
                                    members: dict[str, bytes], tmp_path: Path) -> None:
    from relay.investigate.evidence import (
        MAX_BUNDLE_ENTRIES,
        MAX_MANIFEST_BYTES,
        MAX_TAR_HEADER_BYTES,
    )

    good = list(members.items())
    cases: dict[str, tuple[list[Entry], str]] = {
        "no manifest": (good[1:], "no manifest.json"),
        "manifest twice": ([good[0], *good], "manifest.json is not a single file"),
        "manifest a link": ([special("manifest.json", tarfile.SYMTYPE, "/etc/passwd"),
                             *good[1:]], "manifest.json is not a single file"),
        "huge manifest": ([("manifest.json", b" " * (MAX_MANIFEST_BYTES + 1)), *good[1:]],
                          f"more than {MAX_MANIFEST_BYTES}"),
        "too many entries": ([*good, *((f"x{i}", b"") for i in range(MAX_BUNDLE_ENTRIES))],
                             f"more than {MAX_BUNDLE_ENTRIES} entries"),
    }
    for case, (entries, message) in cases.items():
        bundle = write_bundle(tmp_path / "b.tar", entries)
        _, out, err = verify_bundle(capsys, bundle)
        assert out == "" and message in err, (case, err)
    # A PAX header larger than the cap (a 1 MiB file name) is refused unread.
    bundle = write_bundle(tmp_path / "b.tar", [*good, ("n" * (MAX_TAR_HEADER_BYTES * 16), b"")])
    _, _, err = verify_bundle(capsys, bundle)
    assert "extended header" in err and f"more than {MAX_TAR_HEADER_BYTES}" in err
    # Cut in the middle of a member's data.
    raw = write_bundle(tmp_path / "b.tar", good).read_bytes()
    with tarfile.open(tmp_path / "b.tar") as tar:
        cut = tar.getmember("sessions.json").offset_data + 10
    (tmp_path / "b.tar").write_bytes(raw[:cut])
    _, _, err = verify_bundle(capsys, tmp_path / "b.tar")
    assert err == f"relay: error: {tmp_path / 'b.tar'}: damaged bundle (unexpected end of " \
        "data)\n"


def test_verify_bundle_bad_members(capsys: pytest.CaptureFixture[str],
                                   members: dict[str, bytes], tmp_path: Path) -> None:
    good = dict(members)
    manifest, rest = good.pop("manifest.json"), good
    entries: list[Entry] = [
        ("manifest.json", manifest),
        ("sessions.json", rest["sessions.json"]),
        special("connlog.jsonl", tarfile.SYMTYPE, "/etc/shadow"),
        special("packets.jsonl", tarfile.LNKTYPE, "sessions.json"),
        ("packets.pcapng", rest["packets.pcapng"] + b"\0" * 512),  # longer than listed
        special("dev", tarfile.CHRTYPE),
        ("../../etc/cron.d/evil", b"x"),
        ("/abs", b"x"),
        ("\x1b[2J\u202eevil", b"x"),
    ]
    _, out, _ = verify_bundle(capsys, write_bundle(tmp_path / "b.tar", entries))
    assert_terminal_safe(out.encode())
    lines = out.splitlines()
    assert "UNEXPECTED: connlog.jsonl: a symbolic link (to /etc/shadow), not a file" in lines
    assert "UNEXPECTED: packets.jsonl: a hard link (to sessions.json), not a file" in lines
    assert "UNEXPECTED: dev: a device, not a file" in lines
    assert any(x.startswith("OVERSIZED: packets.pcapng: ") for x in lines)
    assert "UNSAFE-PATH: ../../etc/cron.d/evil: a path, not a member name: a bundle is flat" \
        in lines
    assert any(x.startswith("UNSAFE-PATH: /abs:") for x in lines)
    assert "UNEXPECTED: \\x1b[2J\\u202eevil: not listed in the manifest" in lines
    assert not any(x.startswith("MISSING") for x in lines)  # one line per cause
    assert lines[-1].startswith("FAILED")
    # Members that hold no records, their digests in the manifest (a forged
    # bundle): one line each, never a traceback.
    bad = {"connlog.jsonl": b"[" * 200_000 + b"\n{}\nnot json\n",
           "packets.jsonl": b"x" * (2 << 20) + b"\n"}

    def listed(m: dict[str, Any]) -> dict[str, Any]:
        for name, blob in bad.items():
            m["members"][name] = {"sha256": hashlib.sha256(blob).hexdigest(),
                                  "size": len(blob)}
        return m

    _, out, _ = verify_bundle(capsys, write_bundle(tmp_path / "b.tar", with_manifest(
        {**members, **bad}, listed)))
    lines = out.splitlines()
    assert "MALFORMED: connlog.jsonl line 1: not a JSON object (2 such line(s))" in lines
    assert any(x.startswith("OVERSIZED: packets.jsonl line 1: longer than") for x in lines)
    assert not any("digest" in x for x in lines)


# RSS growth allowed while verifying a bundle with a 200 MB member: the chunk
# (1 MiB) and tarfile's buffers, far below the member.
VERIFY_RSS_BOUND_MB = 32
BIG_MEMBER = 200 << 20


def sparse_bundle(path: Path, members: dict[str, bytes], big: str, size: int) -> None:
    """A tar whose member ``big`` is ``size`` zero bytes, a hole on disk."""
    with open(path, "wb") as f:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = size if name == big else len(blob)
            f.write(info.tobuf(tarfile.PAX_FORMAT))
            if name == big:
                f.seek(-(-size // 512) * 512, io.SEEK_CUR)
            else:
                f.write(blob + b"\0" * (-len(blob) % 512))
        f.write(b"\0" * 1024)


def test_verify_bundle_memory_is_flat(members: dict[str, bytes], tmp_path: Path) -> None:
    manifest = json.loads(members["manifest.json"])
    digest = hashlib.sha256()
    zeros = b"\0" * (1 << 20)
    for _ in range(BIG_MEMBER >> 20):
        digest.update(zeros)
    manifest["members"]["sessions.json"] = {"sha256": digest.hexdigest(), "size": BIG_MEMBER}
    bundle = tmp_path / "big.tar"
    sparse_bundle(bundle, {**members, "manifest.json": json.dumps(manifest).encode()},
                  "sessions.json", BIG_MEMBER)
    assert bundle.stat().st_blocks * 512 < (1 << 20)  # sparse: the test costs no disk
    probe = (
        "import resource, sys, json\n"
        "from relay import cli\n"
        "from relay.investigate import evidence  # imports before the measure\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "code = cli.main(['logs', 'verify-bundle', '--json', sys.argv[1]])\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'code': code, 'growth_kb': after - before}), file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-c", probe, str(bundle)], capture_output=True,
                         text=True, timeout=300)
    assert "Traceback" not in res.stderr, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"], report  # the 200 MB member was read, hashed and matched
    growth = json.loads(res.stderr.splitlines()[-1])["growth_kb"] / 1024
    print(f"verify-bundle RSS growth with a {BIG_MEMBER >> 20} MB member: {growth:.1f} MB")
    assert growth < VERIFY_RSS_BOUND_MB, growth
