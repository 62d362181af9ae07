"""The connection log: one JSON object per line, one file per UTC day.

Layout: ``DATA_DIR/connlog/YYYY-MM-DD.jsonl`` (directory 0700, files 0600: the log
names client addresses and must not be world-readable). Each record is written
and fdatasync'ed before the event it describes is acknowledged, so a crash loses
no record that the relay acted on. Every record carries a unique ``id`` (used by
the forwarder and the collector to remove duplicates) and ``time`` in UTC,
RFC 3339 with milliseconds.

Days older than the retention's compression age are recompressed to
``YYYY-MM-DD.jsonl.zst``. This module is the writer; every reader goes through
relay/connlog/reader.py, which takes both forms, never stops at a bad line (it
reports it through ``on_error`` and goes on) and has the one rule for a torn
last line.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay.times import rfc3339_ms

SUBDIR = "connlog"
SUFFIX = ".jsonl"
ZST_SUFFIX = ".jsonl.zst"
FILE_MODE = 0o600
DIR_MODE = 0o700


def new_record_id() -> str:
    # 96 random bits: collision-free across relays for the life of a log archive.
    return secrets.token_hex(12)


def ensure_dir(path: Path) -> Path:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


def open_for_append(path: Path) -> int:
    """A descriptor appending to the day file ``path`` (created 0600). A crash
    mid-write left its last line without LF (relay/connlog/reader.py skips such a
    line): it is ended first, so that it stays one bad line instead of swallowing
    the next record."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        os.write(fd, b"\n")
    return fd


class ConnectionLog:
    """Appends records to the day file of their timestamp."""

    def __init__(self, data_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.dir = ensure_dir(Path(data_dir) / SUBDIR)
        self.clock = clock
        self._day = ""
        self._fd = -1

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Stamp ``id`` and ``time`` (if absent), write, sync; return the record."""
        now = self.clock()
        full = {"id": new_record_id(), "time": rfc3339_ms(now), **record}
        day = full["time"][:10]
        line = (json.dumps(full, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        fd = self._open(day)
        os.write(fd, line)
        os.fdatasync(fd)
        return full

    def _open(self, day: str) -> int:
        if day != self._day:
            self.close()
            self._fd = open_for_append(self.dir / f"{day}{SUFFIX}")
            self._day = day
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._day = ""
