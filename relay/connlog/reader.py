"""The one reader of day logs: the relay's connection log (``DATA_DIR/connlog``)
and the collector's per-relay copies, ``YYYY-MM-DD.jsonl`` and, once retention
has compressed a day, ``YYYY-MM-DD.jsonl.zst``.

Everything that reads these files goes through here: the list of days, a day
file's uncompressed bytes from an offset (a .zst is decompressed as a stream,
:data:`READ_CHUNK` at a time, never whole), a day's content for its chain digest,
and its lines and records.

The files of a day. A day's content is its .zst's lines, then its plain file's.
In the collector's store a plain file beside a .zst holds late records (merged
at the next retention pass); in the relay's own log both exist only for the
moment retention has written the .zst and not yet removed the plain file, and
the forwarder, whose offsets are into one file, reads the plain one
(:attr:`Day.source`).

The one torn-line rule. A record is a line, and a line is complete only with its
LF (the writer writes a record and its LF in one call, then syncs). The bytes
after a day's last LF are therefore *incomplete*, never a record: the iterators
skip them and report them through ``on_error``, the forwarder does not ship them.
They are *torn* for good (:func:`tail_is_torn`) once a later day exists and the
file has not changed for :data:`TORN_TAIL_GRACE_S`; before that they may be a
line being written. The forwarder waits for such a line and moves on past a torn
one; the iterators say which it is. Where parts are joined (a .zst and its late
plain file; retention compressing them) a part that does not end with LF gets
one, so that a torn line stays one bad line and never glues itself to the next
record; :func:`content`, what the chain digests, joins every part so, its final
torn line included, as the writer leaves it when it next opens the day.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from relay.connlog.daylog import SUBDIR, SUFFIX, ZST_SUFFIX

# Reads of a day file and decompressed pieces of a .zst day: 1 MiB bounds the
# memory a compressed day costs (a busy relay's day is hundreds of MB).
READ_CHUNK = 1 << 20
# zstd's largest frame header (ZSTD_FRAMEHEADERSIZE_MAX in zstd.h), which holds
# the uncompressed size that retention writes into every .zst day.
ZSTD_FRAME_HEADER_MAX = 18
# A day file whose last line has no LF is being written, unless a later day
# exists and the file has not changed for this long: then a crash tore it. The
# writer syncs each record within milliseconds; 10 s covers a stalled disk.
TORN_TAIL_GRACE_S = 10.0

_DAY_FILE = re.compile(rf"^(\d{{4}}-\d{{2}}-\d{{2}})({re.escape(SUFFIX)}|{re.escape(ZST_SUFFIX)})$")

OnError = Callable[[str], None]


@dataclass(frozen=True)
class Day:
    """The files of one day (``name`` YYYY-MM-DD) present when it was listed."""

    name: str
    zst: Path | None = None
    plain: Path | None = None
    # No later day was listed: an incomplete last line may be being written.
    newest: bool = True

    @property
    def date(self) -> date | None:
        """The day, or None for a name shaped like one that is not (2026-02-30)."""
        try:
            return date.fromisoformat(self.name)
        except ValueError:
            return None

    @property
    def files(self) -> list[Path]:
        """The files holding the day's content, in its order."""
        return [p for p in (self.zst, self.plain) if p is not None]

    @property
    def source(self) -> Path:
        """The one file that holds the whole day in the relay's log: the plain one
        while retention has both for a moment."""
        return self.plain or self.files[0]


def days(directory: Path) -> list[Day]:
    """The days of a directory of day files, oldest first."""
    found: dict[str, dict[str, Path]] = {}
    if not Path(directory).is_dir():
        return []
    for p in Path(directory).iterdir():
        m = _DAY_FILE.match(p.name)
        if m:
            found.setdefault(m.group(1), {})["zst" if m.group(2) == ZST_SUFFIX else "plain"] = p
    names = sorted(found)
    return [Day(name, found[name].get("zst"), found[name].get("plain"),
                newest=name == names[-1]) for name in names]


def log_days(data_dir: Path) -> list[Day]:
    """The days of the relay's connection log."""
    return days(Path(data_dir) / SUBDIR)


def day_in(directory: Path, name: str) -> Day:
    """The files of day ``name`` in ``directory`` now (it is taken as the newest)."""
    plain = Path(directory) / f"{name}{SUFFIX}"
    zst = Path(directory) / f"{name}{ZST_SUFFIX}"
    return Day(name, zst if zst.exists() else None, plain if plain.exists() else None)


def is_zst(path: Path) -> bool:
    return path.name.endswith(ZST_SUFFIX)


# ------------------------------------------------------------ bytes


def _decompressing(f: BinaryIO) -> Any:
    # Across frames: a .zst day is one frame, but a concatenation is still read whole.
    return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)


def stream(path: Path, offset: int = 0) -> Iterator[bytes]:
    """A day file's uncompressed bytes from ``offset``, READ_CHUNK at a time."""
    with open(path, "rb") as f:
        source: Any = f
        if is_zst(path):
            source = _decompressing(f)
            source.seek(offset)  # decompresses up to it: no index into a zstd frame
        else:
            f.seek(offset)
        while chunk := source.read(READ_CHUNK):
            yield chunk


def uncompressed(path: Path) -> bytes:
    """A day file's whole uncompressed content (an archived day decompressed)."""
    return b"".join(stream(path))


def uncompressed_size(path: Path) -> int:
    """Bytes of a day file's uncompressed lines: a stat, or the size a .zst frame
    header declares (retention writes it), so no day is decompressed to be sized."""
    if not is_zst(path):
        return path.stat().st_size
    with open(path, "rb") as f:
        size = zstandard.frame_content_size(f.read(ZSTD_FRAME_HEADER_MAX))
    if size < 0:  # a frame without its size (not one of ours): count it
        size = sum(len(c) for c in stream(path))
    return int(size)


class DayReader:
    """Reads day files at offsets. Keeps the decompressor of the .zst it last read,
    so that consecutive reads of a compressed day cost one pass, not one each."""

    def __init__(self) -> None:
        # (path, inode, mtime) of the open .zst, its reader, its file, its position.
        self._zst: tuple[tuple[Path, int, int], Any, Any, int] | None = None

    def close(self) -> None:
        if self._zst is not None:
            self._zst[2].close()
            self._zst = None

    def read(self, path: Path, offset: int, size: int) -> bytes:
        """At most ``size`` uncompressed bytes of ``path`` from ``offset``."""
        if not is_zst(path):
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(size)
        st = path.stat()
        key = (path, st.st_ino, st.st_mtime_ns)
        if self._zst is None or self._zst[0] != key or self._zst[3] > offset:
            self.close()
            f = open(path, "rb")  # noqa: SIM115 - kept open with its reader
            self._zst = (key, _decompressing(f), f, 0)
        _, reader, f, at = self._zst
        if at < offset:
            reader.seek(offset)
        parts, want = [], size
        while want and (chunk := reader.read(min(want, READ_CHUNK))):
            parts.append(chunk)
            want -= len(chunk)
        data = b"".join(parts)
        self._zst = (key, reader, f, offset + len(data))
        return data


def _ended(part: bytes) -> bytes:
    return part if not part or part.endswith(b"\n") else part + b"\n"


def content(day: Day) -> bytes:
    """The day's content as one stream, whichever files hold it, each part ended
    with LF (the chain digest is over this, so it survives compression and
    merging)."""
    return b"".join(_ended(uncompressed(p)) for p in day.files)


# ------------------------------------------------------------ lines and records


def tail_is_torn(mtime: float, later_day: bool, now: float) -> bool:
    """Whether a day file's incomplete last line is torn for good (no writer will
    end it): a later day exists and the file has been quiet for the grace."""
    return later_day and now - mtime > TORN_TAIL_GRACE_S


def blocks(day: Day, on_error: OnError | None = None) -> Iterator[tuple[Path, int, bytes]]:
    """The day's complete lines about READ_CHUNK at a time: (file, number of the
    block's first line in it, the lines each ending with LF), the parts joined as
    :func:`content` joins them. The incomplete tail is reported; an unreadable
    part is reported and the rest of it passed over."""
    files = day.files
    for i, path in enumerate(files):
        lineno, carry = 1, b""
        try:
            for chunk in stream(path):
                data = carry + chunk
                end = data.rfind(b"\n") + 1
                carry = data[end:]
                if end:
                    yield path, lineno, data[:end]
                    lineno += data.count(b"\n", 0, end)
        except (OSError, zstandard.ZstdError) as exc:
            if on_error:
                on_error(f"{path}:{lineno}: unreadable from here, the rest skipped: {exc}")
            continue
        if not carry:
            continue
        if i < len(files) - 1:
            yield path, lineno, carry + b"\n"  # a later part follows: ended, as joined
        elif on_error:
            try:
                mtime = path.stat().st_mtime
            except OSError:  # compressed meanwhile: no writer has it
                mtime = 0.0
            why = "torn by a crash" if tail_is_torn(mtime, not day.newest, time.time()) \
                else "being written, or torn by a crash"
            on_error(f"{path}:{lineno}: incomplete last line ({len(carry)} bytes, no LF) "
                     f"skipped: {why}")


def lines(day: Day, on_error: OnError | None = None) -> Iterator[tuple[Path, int, bytes]]:
    """(file, line number, line without its LF) of every complete line of the day
    (see :func:`blocks`)."""
    for path, first, block in blocks(day, on_error):
        for n, line in enumerate(block.split(b"\n")[:-1], first):
            yield path, n, line


def records(day: Day, on_error: OnError | None = None, *, containing: bytes = b""
            ) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(file, line number, record) of every line of the day that is a JSON
    object; the others reported. With ``containing``, lines without those bytes
    are passed over unparsed (a cheap first filter)."""
    for path, n, raw in lines(day, on_error):
        if containing not in raw:
            continue
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError):
            if on_error:
                on_error(f"{path}:{n}: not JSON, skipped")
            continue
        if not isinstance(rec, dict):
            if on_error:
                on_error(f"{path}:{n}: not a JSON object, skipped")
            continue
        yield path, n, rec


def iter_records(data_dir: Path, on_error: OnError | None = None
                 ) -> Iterator[dict[str, Any]]:
    """Every record of the relay's connection log, oldest day first."""
    for day in log_days(data_dir):
        for _, _, rec in records(day, on_error):
            yield rec
