"""Hash chains over closed log files: the append side, and what both verifiers
(relay/investigate/evidence.py for a relay's data directory,
relay/central/collector.py for the collector's store) check links and files with.

``DATA_DIR/chain/packets.jsonl`` and ``DATA_DIR/chain/connlog.jsonl`` hold one JSON
object per line, a *link*, appended whenever a packet-log segment closes, is
archived or deleted, and whenever a connection-log day is sealed or deleted::

    {"n": 7, "time": "...Z", "event": "close", "file": "seg-...rpl",
     "size": 123, "sha256": "<file digest>", ..., "prev": "<digest of line n-1>"}

``prev`` is the SHA-256 of the previous line's bytes (64 zeros for the first), so
each link holds the digest of its predecessor and a link's own digest is that of
its line: editing, dropping or reordering a line breaks every later ``prev``. The
files are bound through their digests; the digest of the newest link (the head)
also goes into the audit record the writer sends to the connection log, which is
shipped off the relay, so a truncated chain cannot pass for a short one.

This module imports nothing of the log modules, so they can call it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.safeout import escape_text
from relay.times import rfc3339_ms

CHAIN_DIR = "chain"
PACKETS_CHAIN = "packets.jsonl"
CONNLOG_CHAIN = "connlog.jsonl"
GENESIS = "0" * 64
FILE_MODE = 0o600
DIR_MODE = 0o700
# A link line is a few hundred bytes: the last 64 KiB of the chain hold the head
# (a longer run of bad lines at the end is searched in more such windows).
TAIL_BYTES = 64 << 10
# Files are hashed in 1 MiB reads: large enough for hashlib's speed, small enough
# not to matter next to a segment's decoder buffers.
HASH_CHUNK = 1 << 20


def chain_path(data_dir: str | os.PathLike[str], name: str) -> Path:
    return Path(data_dir) / CHAIN_DIR / name


def line_digest(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def file_digest(path: Path) -> tuple[str, int]:
    """(SHA-256 hex, size) of a file's bytes."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def parse_link(line: bytes) -> dict[str, Any] | None:
    """The link a line holds, or None when it is not one (torn, or edited)."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict) or type(doc.get("n")) is not int:
        return None
    return doc


def _head(fd: int) -> tuple[int, str]:
    """(next link number, digest of the last valid link) of an open chain file.

    A crash mid-append leaves a last line without its newline: it is ended with
    one first, so it stays one bad line (verify reports it) and the new link
    chains to the last good link before it rather than to the torn bytes."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, GENESIS
    if os.pread(fd, 1, size - 1) != b"\n":
        os.write(fd, b"\n")  # O_APPEND: at the end
        size += 1
    start = size
    while start > 0:
        start = max(0, start - TAIL_BYTES)
        lines = os.pread(fd, size - start, start).split(b"\n")[:-1]
        if start > 0:
            lines = lines[1:]  # the first line may begin before the window
        for line in reversed(lines):
            link = parse_link(line)
            if link is not None:
                return link["n"] + 1, line_digest(line)
    return 0, GENESIS


def append_link(path: Path, fields: dict[str, Any], now: float) -> dict[str, Any]:
    """Append a link (``fields`` plus n, time, prev) under an exclusive lock, synced
    before returning; returns it with its own ``digest`` added."""
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        # The writer, the retention loop and an operator's command may append at once.
        fcntl.flock(fd, fcntl.LOCK_EX)
        n, prev = _head(fd)
        link = {"n": n, "time": rfc3339_ms(now), **fields, "prev": prev}
        line = json.dumps(link, separators=(",", ":"), sort_keys=True).encode()
        os.write(fd, line + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return {**link, "digest": line_digest(line)}


def read_links(path: Path) -> list[tuple[bytes, dict[str, Any] | None]]:
    """(line bytes, parsed link or None when the line is not a link) of every line,
    in order."""
    if not path.exists():
        return []
    return [(line, parse_link(line)) for line in path.read_bytes().splitlines()]


# ------------------------------------------------------------------ verifying


@dataclass
class Report:
    """What a verify found: problems (each a kind, the file and a detail), notes,
    and what was checked."""

    problems: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, kind: str, where: str, detail: str) -> None:
        self.problems.append({"kind": kind, "file": where, "detail": detail})

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes,
                "checked": dict(self.checked)}

    def text(self) -> str:
        # File names and details come from the bundle or the directory checked:
        # a hostile one's member names are shown escaped, one line each.
        lines = [f"{p['kind'].upper()}: {escape_text(p['file'])}: {escape_text(p['detail'])}"
                 for p in self.problems]
        lines += [f"note: {escape_text(n)}" for n in self.notes]
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.checked.items()))
        lines.append(f"{'OK' if self.ok else 'FAILED'}: checked {counts or 'nothing'}; "
                     f"{len(self.problems)} problem(s)")
        return "\n".join(lines) + "\n"


def check_links(lines: list[tuple[bytes, dict[str, Any] | None]], name: str,
                report: Report, first: int = 0) -> None:
    """Link numbers consecutive from ``first`` and each ``prev`` the digest of the
    link before (the first link's ``prev`` is taken on trust unless first == 0).
    A line that is not a link (torn by a crash mid-append, or edited) is one
    problem; the links after it are checked against the last good one, which is
    what :func:`append_link` chains a new link to."""
    prev = GENESIS if first == 0 else None
    n = first
    for i, (line, doc) in enumerate(lines):
        if doc is None:
            after = f"after link {n - 1}" if n > first else "before the first link"
            report.problem("broken-chain", f"{name} line {i + 1}",
                           f"not a link ({after}): a write cut short by a crash, or an edit")
            continue
        where = f"{name} link {n}"
        if doc.get("n") != n:
            report.problem("broken-chain", where,
                           f"numbered {doc.get('n')}: links removed, added or reordered")
        elif prev is not None and doc.get("prev") != prev:
            report.problem("broken-chain", where,
                           "prev is not the digest of the link before: the chain was edited")
        prev = line_digest(line)
        n += 1
    report.checked[f"{name} links"] += len(lines)


def link_desc(link: dict[str, Any]) -> str:
    """How a problem names the link it is about: its number and what it holds."""
    records = f", {link['records']} records" if link.get("records") is not None else ""
    return f"chain link {link.get('n')} ({link.get('event')}{records})"


def compare(report: Report, where: str, got: tuple[str, int], link: dict[str, Any],
            by_digest: dict[str, str]) -> None:
    """A file's (digest, size) against the link that chains it: reordered (it holds
    another file's chained content), truncated or modified."""
    digest, size = got
    if digest == link.get("sha256"):
        return
    other = by_digest.get(digest)
    if other is not None:
        report.problem("reordered", where, f"holds the content chained as {other}")
    elif size < int(link.get("size") or 0):
        report.problem("truncated", where, f"{size} bytes, chained with {link.get('size')}")
    else:
        report.problem("modified", where, f"content replaced or modified since "
                                          f"{link_desc(link)}: SHA-256 {digest[:16]}..., "
                                          f"chained {str(link.get('sha256'))[:16]}...")


def check_file(report: Report, where: str, got: tuple[str, int],
               link: dict[str, Any] | None, by_digest: dict[str, str]) -> bool:
    """A file's (digest, size) against its link (:func:`compare`), or, when it has
    none, reordered if it holds another file's chained content. False when it is
    neither: an unchained file, which each verifier judges by its own rules."""
    if link is not None:
        compare(report, where, got, link, by_digest)
    elif got[0] in by_digest:
        report.problem("reordered", where, f"holds the content chained as {by_digest[got[0]]}")
    else:
        return False
    return True


def content_digest(data: bytes) -> tuple[str, int]:
    """(SHA-256 hex, size) of content in memory, as :func:`file_digest` of a file."""
    return hashlib.sha256(data).hexdigest(), len(data)


def sealed_days(links: list[tuple[bytes, dict[str, Any] | None]]) -> dict[str, dict[str, Any]]:
    """Day -> the newest close link of each day-log day that no delete link has
    removed since: what the directory must hold."""
    expected: dict[str, dict[str, Any]] = {}
    for _, link in links:
        if link and link.get("event") == "close":
            expected[str(link.get("day"))] = link
        elif link and link.get("event") == "delete":
            expected.pop(str(link.get("day")), None)
    return expected


def by_digest(expected: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Chained digest -> the name chained with it (to tell reordered files)."""
    return {str(link.get("sha256")): name for name, link in expected.items()}
