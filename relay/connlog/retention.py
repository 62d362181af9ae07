"""Retention of daily JSON-lines logs: compress old days, delete expired ones.

Used for the relay's own connection log (``DATA_DIR/connlog``) and, with the
same rules, for the collector's per-relay directories. A day file
``YYYY-MM-DD.jsonl`` older than ``compress_after_days`` becomes
``YYYY-MM-DD.jsonl.zst`` (relay/connlog/reader.py reads both, and byte offsets into the
uncompressed stream stay valid, which the forwarder's position relies on); a
day older than ``keep_days`` is deleted. ``keep_days`` is never below
:data:`MIN_KEEP_DAYS`.

Every action is reported through an ``audit`` callback as a record-shaped dict
(``{"action": "connlog-compressed", ...}``) so that the relay writes it to the
connection log itself: removing evidence must itself leave evidence.

A late line for an already compressed day (the collector receiving an old
backlog) lands in a new plain file beside the ``.zst``; the next pass merges
the two.

For the relay's own log (``chain_file`` given, as :func:`run_connlog_retention`
does), every day is sealed into the evidence chain (relay/chain.py) once it is
over: the link holds the SHA-256 of the day's uncompressed content, so compressing
it later changes nothing that verify checks; deleting a day appends a link too.
The collector's days take late records (a relay's backlog after an outage), so
there (``seal="compression"``) a day is sealed each time it is compressed, the
late lines merged in: the newest link of a day holds its content.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

import zstandard

from relay import chain
from relay.connlog import reader
from relay.connlog.daylog import FILE_MODE, SUBDIR, SUFFIX, ZST_SUFFIX
from relay.fsutil import fsync_dir, write_atomic
from relay.times import utc_date

# The floor: the connection log is kept at least 90 days.
MIN_KEEP_DAYS = 90
DEFAULT_KEEP_DAYS = 90
# Today's file is being appended and yesterday's is what the forwarder and an
# investigator most likely read next: both stay plain.
DEFAULT_COMPRESS_AFTER_DAYS = 1
# zstd level 10: about 10x on connection-log JSON at tens of MB/s, a day file
# of a busy relay compresses in about a second (levels above 15 are many times
# slower for a few per cent).
ZSTD_LEVEL = 10
# How often the relay and the collector run a pass; day boundaries are what
# matter, so hourly is prompt enough and costs one directory listing.
RETENTION_INTERVAL_S = 3600.0
# A day is sealed this long after its UTC midnight: a record stamped 23:59:59.999
# is written and synced within milliseconds, a minute covers a stalled disk.
SEAL_GRACE_S = 60.0

Audit = Callable[[dict[str, Any]], None]


def check_keep_days(keep_days: int) -> int:
    if keep_days < MIN_KEEP_DAYS:
        raise ValueError(f"logs are kept at least {MIN_KEEP_DAYS} days, not {keep_days}")
    return keep_days


def _dated(directory: Path) -> list[tuple[date, reader.Day]]:
    """The day files present, by their date (a name that is no date is not ours)."""
    return [(when, d) for d in reader.days(directory) if (when := d.date) is not None]


def seal_days(directory: Path, chain_file: Path,
              clock: Callable[[], float]) -> dict[str, Any]:
    """Append a chain link for every finished day not yet sealed; returns the days
    and the new chain head (for the audit record, which is shipped off the relay),
    or {} when there was nothing to seal."""
    sealed = {doc.get("day") for _, doc in chain.read_links(chain_file)
              if doc and doc.get("event") == "close"}
    now = clock()
    cutoff = utc_date(now - SEAL_GRACE_S)
    done: dict[str, Any] = {}
    for day, files in _dated(Path(directory)):
        if day >= cutoff or day.isoformat() in sealed:
            continue
        data = reader.content(files)
        link = chain.append_link(chain_file, {
            "event": "close", "day": day.isoformat(), "file": f"{day.isoformat()}{SUFFIX}",
            "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, now)
        done = {"days": [*done.get("days", []), day.isoformat()], "chain_link": link["digest"]}
    return done


def compress_day(files: reader.Day) -> tuple[Path, int, int, str]:
    """Replace the day's plain file (merged after an existing .zst) with one .zst
    file; returns it, the sizes in and out and the SHA-256 of the content.

    The new file is complete and synced before the plain one goes, so a crash
    at any point leaves every line in at least one file.
    """
    plain = files.plain
    assert plain is not None
    data = reader.content(files)
    out = plain.with_name(plain.name[: -len(SUFFIX)] + ZST_SUFFIX)
    packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    write_atomic(out, packed, mode=FILE_MODE)
    plain.unlink()
    fsync_dir(out.parent)
    return out, len(data), len(packed), hashlib.sha256(data).hexdigest()


def apply_retention(
    directory: Path,
    *,
    keep_days: int = DEFAULT_KEEP_DAYS,
    compress_after_days: int = DEFAULT_COMPRESS_AFTER_DAYS,
    clock: Callable[[], float] = time.time,
    audit: Audit | None = None,
    chain_file: Path | None = None,
    seal: Literal["day-end", "compression"] = "day-end",
) -> list[dict[str, Any]]:
    """One pass over ``directory``; returns (and audits) what it did. With
    ``chain_file``, days are sealed (finished days first, or each compression)
    and deletions linked."""
    check_keep_days(keep_days)
    if compress_after_days < 0:
        raise ValueError("compress_after_days must be >= 0")
    today = utc_date(clock())
    delete_before = today - timedelta(days=keep_days)
    compress_before = today - timedelta(days=compress_after_days)
    actions: list[dict[str, Any]] = []
    if chain_file is not None and seal == "day-end":
        sealed = seal_days(Path(directory), chain_file, clock)
        if sealed:
            actions.append({"action": "connlog-sealed", **sealed})
    for day, files in _dated(Path(directory)):
        if day < delete_before:
            paths = sorted(files.files)
            size = sum(p.stat().st_size for p in paths)
            if chain_file is not None:
                data = reader.content(files)
                chain.append_link(chain_file, {
                    "event": "delete", "day": day.isoformat(),
                    "file": f"{day.isoformat()}{SUFFIX}", "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "reason": f"older than {keep_days} days"}, clock())
            for p in paths:
                p.unlink()
            action = {"action": "connlog-deleted", "day": day.isoformat(),
                      "files": [str(p) for p in paths], "bytes": size,
                      "keep_days": keep_days}
        elif day < compress_before and files.plain is not None:
            out, size_in, size_out, digest = compress_day(files)
            action = {"action": "connlog-compressed", "day": day.isoformat(),
                      "file": str(out), "bytes_in": size_in, "bytes_out": size_out,
                      "merged": files.zst is not None}
            if chain_file is not None and seal == "compression":
                action["chain_link"] = chain.append_link(chain_file, {
                    "event": "close", "day": day.isoformat(),
                    "file": f"{day.isoformat()}{SUFFIX}", "size": size_in,
                    "sha256": digest}, clock())["digest"]
        else:
            continue
        actions.append(action)
        if audit is not None:
            audit(action)
    return actions


async def run_connlog_retention(
    data_dir: Path,
    keep_days: int,
    stop_event: asyncio.Event,
    audit: Audit,
    *,
    compress_after_days: int = DEFAULT_COMPRESS_AFTER_DAYS,
    clock: Callable[[], float] = time.time,
    interval: float = RETENTION_INTERVAL_S,
) -> None:
    """The relay's retention task: a pass at start, then every ``interval``.

    Compression runs in a worker thread (a day file can take a second); the
    audit records are written back on the event loop's thread, where the
    connection log's writer lives.
    """
    check_keep_days(keep_days)
    directory = Path(data_dir) / SUBDIR
    while not stop_event.is_set():
        actions = await asyncio.to_thread(
            apply_retention, directory, keep_days=keep_days,
            compress_after_days=compress_after_days, clock=clock,
            chain_file=chain.chain_path(data_dir, chain.CONNLOG_CHAIN))
        for action in actions:
            audit(action)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_event.wait(), interval)
