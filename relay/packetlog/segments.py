"""The packet log on disk: segment files of compressed record blocks, and reading them.

Files
-----
``DATA_DIR/packets/`` (mode 0700) holds, all mode 0600:

- ``seg-YYYYMMDDTHHMMSSZ.rpl.open`` the segment being written (at most one);
- ``seg-YYYYMMDDTHHMMSSZ.rpl`` closed segments (one per ``segment_seconds``,
  an hour by default), the name being the UTC start of the segment's period;
  a segment started within a period that already has a file (a restart within
  the hour) is named after its own start time instead, with ``-1``, ``-2``, ...
  appended if that is taken too (two starts within a second). A name once used
  by a segment, its archive or its corrupt remains is never used again, and no
  segment is ever renamed over another file;
- ``seg-YYYYMMDDTHHMMSSZ.rpa`` archives (relay/packetlog/retention.py): the same format,
  re-encoded in larger blocks at a higher zstd level once a segment is 14 days old;
- ``*.corrupt`` a segment that could not be recovered, kept for inspection.

Segment format (all integers little endian)
-------------------------------------------
::

    file header  16 B   magic "RLYPKTS1", u64 creation time (ns since the epoch)
    block frame  40 B   magic "RBLK", u32 records, u64 first time, u64 last time,
                        u32 raw length, u32 compressed length,
                        u32 CRC-32 of the payload, u32 CRC-32 of the 36 bytes before
                 ...    payload: zstd frame of the encoded block (below)
    ...                 more blocks
    index        ...    zstd frame of a JSON object: t_min, t_max (ns), records,
                        blocks [[offset, t_min, t_max, records], ...], sessions
                        [session IDs], client_ips [...], addresses [every source and
                        destination IP seen, a superset of the destinations]
    trailer      24 B   u64 index offset, u32 index length, u32 CRC-32 of the index,
                        magic "RLYIDXE1"

Only closed segments have the index and trailer. Readers use the trailer to skip a
whole segment (by time, session, client IP or address), then the block frames'
time ranges to skip blocks; a segment without a valid trailer is scanned frame by
frame, and a frame whose CRC fails ends the scan with a report.

Encoded block (before zstd; cext/blockcodec.c writes it, its relay_block_decode
and relay/packetlog/blockcodec_py.py read it). Varints are LEB128, signed values zigzag::

    u8 layout version (1), varint record count n
    varint sessions, each: 16 B session ID, u8 record flags, u8 client family (4/6,
        0 when unattributed), client IP (4 or 16 B, none for family 0), u16 client port
    varint addresses, each: u8 family, 4 or 16 B
    varint flows, each: varint session index, u8 direction, varint source address
        index, varint destination address index, u16 source port, u16 destination port
    u64 time of the first record (ns since the epoch)
    column time:   n zigzag varints, difference to the previous record's time
    column flow:   n varints, index into the flow table
    column flags:  n bytes, the TCP flags
    column length: n varints, TCP payload length
    column window, seq, ack: n zigzag varints each, difference to the previous
        record of the same flow (starting from 0), modulo 2^32

So a record costs its time delta, a flow index, its flags and small per-flow deltas
before zstd; session IDs, addresses and ports are stored once per block.

Durability: blocks are appended and ``fdatasync``-ed at least every
``FLUSH_INTERVAL`` seconds, so a crash loses at most the last unflushed second. A
closed segment is fsync-ed, renamed from ``.rpl.open`` to ``.rpl`` and never
written again. On start, :meth:`PacketLogWriter.open` recovers a leftover
``.rpl.open``: it keeps every block whose CRCs check, truncates the torn rest,
writes the index and closes it under the first free name by the rule above
(the same function as a normal close), and reports what it did.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import itertools
import json
import logging
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import zstandard

from relay import chain, sessionid
from relay.cext import ffi, lib
from relay.fsutil import fsync_dir
from relay.packetlog.blockcodec_py import BlockError, read_tables
from relay.times import rfc3339_ns

log = logging.getLogger("relay.packetlog.segments")

PACKETS_DIR = "packets"
SEGMENT_SUFFIX = ".rpl"
OPEN_SUFFIX = ".rpl.open"
ARCHIVE_SUFFIX = ".rpa"
CORRUPT_SUFFIX = ".corrupt"
FILE_MODE = 0o600
DIR_MODE = 0o700

FILE_MAGIC = b"RLYPKTS1"
FILE_HEADER = struct.Struct("<8sQ")
BLOCK_MAGIC = b"RBLK"
BLOCK_HEADER = struct.Struct("<4sIQQIII")  # + u32 header CRC
BLOCK_FRAME_LEN = BLOCK_HEADER.size + 4
TRAILER_MAGIC = b"RLYIDXE1"
TRAILER = struct.Struct("<QII8s")

# The issue: segments are closed every hour by default.
DEFAULT_SEGMENT_SECONDS = 3600
# The issue: a crash loses at most the last unflushed second.
FLUSH_INTERVAL = 1.0
# Records per block while writing: large enough for zstd and the per-flow deltas
# to find repetition (measured: 8192 gives ~5 B/record on web traffic, 1024 about
# a third more), small enough (768 KiB of records) to stay in L2 while encoding.
BLOCK_RECORDS = 8192
# zstd level 3 is zstd's default and compresses a block in ~1 ms; higher levels
# cost several times the CPU for a few percent here, which archives pay instead.
ZSTD_LEVEL = 3
# Archives are written once and kept long: maximum-but-sane zstd level, and blocks
# 8x larger so more packets of each flow share a block.
ARCHIVE_ZSTD_LEVEL = 19
ARCHIVE_BLOCK_RECORDS = 65536
# A block frame claiming more than this is corrupt (a block of BLOCK_RECORDS
# records encodes to far less; archives' blocks too).
MAX_BLOCK_BYTES = 64 << 20

TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")
RF_UNATTRIBUTED = 0x01

Audit = Callable[[dict[str, Any]], None]
ErrorReport = Callable[[str, str], None]


def _log_error(path: str, reason: str) -> None:
    log.warning("packet log %s: %s", path, reason)


def packets_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / PACKETS_DIR


def _ensure_dir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    # mkdir's mode is filtered by the umask, and an existing directory keeps its own.
    os.chmod(path, DIR_MODE)


def segment_name(start_s: int) -> str:
    return "seg-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(start_s))


# Every file one segment name can have over its life: while written, closed,
# archived, or set aside as corrupt. A name with any of them is used.
STEM_SUFFIXES = (OPEN_SUFFIX, SEGMENT_SUFFIX, ARCHIVE_SUFFIX, OPEN_SUFFIX + CORRUPT_SUFFIX)


def _free_stems(directory: Path, period: str, started_s: int,
                own: Path | None = None) -> Iterator[str]:
    """Segment names no file uses (``own`` aside), in the order to try: the
    period's name, then the segment's start time, then that with -1, -2, ...
    Checking is not claiming: callers claim a name with O_EXCL or
    :func:`_rename_noreplace` and move on to the next when that fails."""
    started = segment_name(started_s)
    candidates = itertools.chain(dict.fromkeys((period, started)),
                                 (f"{started}-{n}" for n in itertools.count(1)))
    for stem in candidates:
        paths = [directory / (stem + suffix) for suffix in STEM_SUFFIXES]
        if not any(p.exists() and p != own for p in paths):
            yield stem


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1  # linux/fs.h


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that raises FileExistsError rather than replace ``dst``."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst),
                       RENAME_NOREPLACE) == 0:
        return
    err = ctypes.get_errno()
    if err != errno.EINVAL:
        raise OSError(err, os.strerror(err), str(src), None, str(dst))
    # A file system without RENAME_NOREPLACE: link(2) does not replace either. A
    # crash between the two calls leaves both names on one file (recovery sees it).
    os.link(src, dst)
    os.unlink(src)


def _publish_segment(path: Path, created_ns: int) -> Path:
    """Rename a finished ``.rpl.open`` to the first free closed-segment name and
    make the rename durable; the one way segments are closed, by the writer and
    by recovery alike."""
    period = path.name.removesuffix(OPEN_SUFFIX)
    for stem in _free_stems(path.parent, period, created_ns // 1_000_000_000, own=path):
        final = path.with_name(stem + SEGMENT_SUFFIX)
        try:
            _rename_noreplace(path, final)
        except FileExistsError:
            continue
        fsync_dir(path.parent)
        return final
    raise AssertionError("unreachable: _free_stems never ends")


def addr_str(family: int, raw: bytes) -> str:
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, bytes(raw[:4]))
    if family == 6:
        return socket.inet_ntop(socket.AF_INET6, bytes(raw[:16]))
    return ""


def flags_str(flags: int) -> str:
    return ",".join(name for bit, name in enumerate(TCP_FLAG_NAMES) if flags >> bit & 1)


# ------------------------------------------------------------------ encoding


class _Encoder:
    """Encodes and compresses blocks of C records; one per writer."""

    def __init__(self, block_records: int, level: int) -> None:
        self.cap = lib.relay_block_bound(block_records)
        self.buf = ffi.new("uint8_t[]", self.cap)
        self.zstd = zstandard.ZstdCompressor(level=level)
        self.range = ffi.new("uint64_t[2]")

    def frame(self, recs: Any, n: int) -> tuple[bytes, bytes, int, int]:
        """(frame bytes, raw encoded block, t_min, t_max) of n records."""
        size = lib.relay_block_encode(recs, n, self.buf, self.cap)
        if size < 0:
            raise MemoryError("block encoder out of memory")
        raw = bytes(ffi.buffer(self.buf, size))
        payload = self.zstd.compress(raw)
        # Records of different CPUs interleave slightly out of order: the block's
        # time range comes from all of them.
        lib.relay_block_time_range(recs, n, self.range)
        t_min, t_max = self.range[0], self.range[1]
        head = BLOCK_HEADER.pack(BLOCK_MAGIC, n, t_min, t_max, len(raw), len(payload),
                                 zlib.crc32(payload))
        return head + struct.pack("<I", zlib.crc32(head)) + payload, raw, t_min, t_max


@dataclass
class _Index:
    t_min: int | None = None
    t_max: int | None = None
    records: int = 0
    blocks: list[list[int]] = field(default_factory=list)
    sessions: set[str] = field(default_factory=set)
    client_ips: set[str] = field(default_factory=set)
    addresses: set[str] = field(default_factory=set)

    def add(self, offset: int, n: int, t_min: int, t_max: int, raw: bytes) -> None:
        self.blocks.append([offset, t_min, t_max, n])
        self.records += n
        self.t_min = t_min if self.t_min is None else min(self.t_min, t_min)
        self.t_max = t_max if self.t_max is None else max(self.t_max, t_max)
        tables = read_tables(raw)
        for s in tables.sessions:
            if not s.rflags & RF_UNATTRIBUTED:
                self.sessions.add(sessionid.to_text(s.session_id))
                self.client_ips.add(addr_str(s.client_family, s.client_ip))
        for family, a in tables.addresses:
            self.addresses.add(addr_str(family, a))

    def to_bytes(self) -> bytes:
        doc = {"t_min": self.t_min, "t_max": self.t_max, "records": self.records,
               "blocks": self.blocks, "sessions": sorted(self.sessions),
               "client_ips": sorted(self.client_ips), "addresses": sorted(self.addresses)}
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(json.dumps(doc).encode())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _SegmentFile:
    """One segment being written: header, frames, then index and trailer on close."""

    def __init__(self, path: Path, created_ns: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        self.created_ns = created_ns
        self.offset = 0
        self.index = _Index()
        # Hashed as written, so the chain link costs no re-read of the segment.
        self.sha = hashlib.sha256()
        self._append(FILE_HEADER.pack(FILE_MAGIC, created_ns))

    @classmethod
    def resume(cls, path: Path, good_end: int, index: _Index,
               created_ns: int) -> _SegmentFile:
        self = cls.__new__(cls)
        self.path = path
        self.created_ns = created_ns
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        os.ftruncate(self.fd, good_end)
        os.lseek(self.fd, good_end, os.SEEK_SET)
        self.offset = good_end
        self.index = index
        self.sha = hashlib.sha256()
        with open(path, "rb") as f:
            self.sha.update(f.read(good_end))
        return self

    def _append(self, data: bytes) -> None:
        _write_all(self.fd, data)
        self.sha.update(data)
        self.offset += len(data)

    def add_frame(self, frame: bytes, raw: bytes, n: int, t_min: int, t_max: int) -> None:
        self.index.add(self.offset, n, t_min, t_max, raw)
        self._append(frame)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def finish(self) -> None:
        """Append the index and trailer, sync and close the file (not renamed)."""
        body = self.index.to_bytes()
        trailer = TRAILER.pack(self.offset, len(body), zlib.crc32(body), TRAILER_MAGIC)
        self._append(body + trailer)
        os.fsync(self.fd)
        os.close(self.fd)

    def publish(self) -> Path:
        """Finish a segment and give it its closed name (never replacing a file)."""
        self.finish()
        return _publish_segment(self.path, self.created_ns)

    def link_fields(self, final: Path) -> dict[str, Any]:
        """What the evidence chain records of this closed file: its digest, and its
        time range so that searches skip it without opening it."""
        return {"file": final.name, "size": self.offset, "sha256": self.sha.hexdigest(),
                "t_min": self.index.t_min, "t_max": self.index.t_max,
                "records": self.index.records}


def link_closed(seg: _SegmentFile, final: Path, clock: Callable[[], float]) -> dict[str, Any]:
    """Append the chain link of a segment just closed (relay/chain.py). A failure
    (disk full) must not stop the capture: it is logged, the digest is empty, and
    verify later reports the segment as unchained."""
    try:
        return chain.append_link(chain.chain_path(final.parent.parent, chain.PACKETS_CHAIN),
                                 {"event": "close", **seg.link_fields(final)}, clock())
    except OSError as exc:
        log.error("packet log %s: evidence chain not appended: %s", final, exc)
        return {"digest": ""}


# ------------------------------------------------------------------ disk use


class DiskUsage:
    """Bytes and number of the packet log's closed files (segments and archives),
    kept without listing the directory, so a metrics scrape costs O(1): the
    writer adds each segment it closes, and :meth:`rescan` (off the event loop:
    at start and after each retention pass, which archives and deletes) counts
    the directory afresh. Thread-safe: the writer adds on the loop's thread while
    a rescan runs in a worker thread."""

    CLOSED_SUFFIXES = (SEGMENT_SUFFIX, ARCHIVE_SUFFIX)

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        # Segments closed while a rescan lists the directory, merged into its
        # result (by name, so one it saw already is not counted twice).
        self._during_rescan: dict[str, int] | None = None

    def add(self, path: Path, size: int) -> None:
        with self._lock:
            self._bytes += size - self._sizes.get(path.name, 0)
            self._sizes[path.name] = size
            if self._during_rescan is not None:
                self._during_rescan[path.name] = size

    def rescan(self) -> None:
        with self._lock:
            self._during_rescan = {}
        sizes: dict[str, int] = {}
        with contextlib.suppress(FileNotFoundError), os.scandir(self.dir) as it:
            for entry in it:
                if entry.name.endswith(self.CLOSED_SUFFIXES):
                    with contextlib.suppress(FileNotFoundError):
                        sizes[entry.name] = entry.stat().st_size
        with self._lock:
            sizes.update(self._during_rescan or {})
            self._during_rescan = None
            self._sizes = sizes
            self._bytes = sum(sizes.values())

    def totals(self) -> tuple[int, int]:
        """(bytes, files) of the closed segments and archives."""
        with self._lock:
            return self._bytes, len(self._sizes)


# ------------------------------------------------------------------ writer


class PacketLogWriter:
    """Appends record blocks to hourly segments under DATA_DIR/packets/.

    Not thread-safe: one owner calls :meth:`write`, :meth:`tick` and
    :meth:`close`. ``clock`` returns wall-clock seconds (injected by tests);
    ``audit`` receives a dict for every recovery and rotation.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *,
                 segment_seconds: int = DEFAULT_SEGMENT_SECONDS,
                 clock: Callable[[], float] = time.time,
                 audit: Audit | None = None) -> None:
        self.dir = packets_dir(data_dir)
        self.segment_seconds = segment_seconds
        self.clock = clock
        self.audit = audit or (lambda rec: None)
        self._encoder = _Encoder(BLOCK_RECORDS, ZSTD_LEVEL)
        self._seg: _SegmentFile | None = None
        self._seg_start = 0
        self._dirty = False
        self._last_sync = clock()
        self.bytes_written = 0
        self.usage = DiskUsage(self.dir)

    # -- start-up -----------------------------------------------------------------

    def open(self) -> list[dict[str, Any]]:
        """Create the directory and recover any segment a crash left open; returns
        the audit records of what was recovered (also sent to ``audit``)."""
        _ensure_dir(self.dir)
        recovered = [recover_segment(path, self.audit)
                     for path in sorted(self.dir.glob("*" + OPEN_SUFFIX))]
        self.usage.rescan()
        return recovered

    # -- writing ------------------------------------------------------------------

    def write(self, recs: Any, n: int) -> None:
        """Append n records (a cffi ``struct relay_record *``) as one block."""
        if n <= 0:
            return
        for start in range(0, n, BLOCK_RECORDS):
            count = min(BLOCK_RECORDS, n - start)
            frame, raw, t_min, t_max = self._encoder.frame(recs + start, count)
            seg = self._segment_for(self.clock())
            seg.add_frame(frame, raw, count, t_min, t_max)
            self.bytes_written += len(frame)
            self._dirty = True

    def tick(self) -> None:
        """Call at least every FLUSH_INTERVAL: syncs new blocks to disk and closes
        the segment when its period is over, even if no packet arrives."""
        now = self.clock()
        if self._seg and now >= self._seg_start + self.segment_seconds:
            self._close_segment()
        elif self._dirty and now - self._last_sync >= FLUSH_INTERVAL:
            self.sync()

    def sync(self) -> None:
        if self._seg and self._dirty:
            self._seg.sync()
        self._dirty = False
        self._last_sync = self.clock()

    def close(self) -> None:
        if self._seg:
            self._close_segment()

    @property
    def current_path(self) -> Path | None:
        return self._seg.path if self._seg else None

    @property
    def current_size(self) -> int:
        """Bytes of the segment being written (0 when none is open)."""
        return self._seg.offset if self._seg else 0

    def _segment_for(self, now: float) -> _SegmentFile:
        start = int(now // self.segment_seconds) * self.segment_seconds
        if self._seg and start != self._seg_start:
            self._close_segment()
        if not self._seg:
            self._seg = self._new_segment(start, now)
            self._seg_start = start
        return self._seg

    def _new_segment(self, start: int, now: float) -> _SegmentFile:
        _ensure_dir(self.dir)
        leftover = self.dir / (segment_name(start) + OPEN_SUFFIX)
        if leftover.exists():  # left by a crash and not recovered by open(): do it now
            recover_segment(leftover, self.audit)
        # A period that already has a segment (a restart within it) gets a second
        # one under a new name: never one that a later close or recovery could
        # rename over the first.
        for stem in _free_stems(self.dir, segment_name(start), int(now)):
            with contextlib.suppress(FileExistsError):
                return _SegmentFile(self.dir / (stem + OPEN_SUFFIX), int(now * 1e9))
        raise AssertionError("unreachable: _free_stems never ends")

    def _close_segment(self) -> None:
        assert self._seg
        seg = self._seg
        self._seg = None
        final = seg.publish()
        self._dirty = False
        self.usage.add(final, seg.offset)
        link = link_closed(seg, final, self.clock)
        self.audit({"action": "packetlog-rotate", "file": str(final),
                    "records": seg.index.records, "bytes": seg.offset,
                    "chain_link": link["digest"]})


# --------------------------------------------------------------- scanning


@dataclass
class Frame:
    offset: int
    records: int
    t_min: int
    t_max: int
    payload: bytes


def _read_frames(f: Any, start: int, end: int | None) -> Iterator[Frame | str]:
    """Frames from ``start``; yields a reason string instead when one is bad, and
    stops there."""
    offset = start
    while end is None or offset < end:
        f.seek(offset)
        head = f.read(BLOCK_FRAME_LEN)
        if not head and end is None:
            return
        if len(head) < BLOCK_FRAME_LEN:
            yield f"truncated block header at byte {offset}"
            return
        magic, n, t_min, t_max, raw_len, comp_len, crc = BLOCK_HEADER.unpack_from(head)
        (hcrc,) = struct.unpack_from("<I", head, BLOCK_HEADER.size)
        if magic != BLOCK_MAGIC or zlib.crc32(head[:BLOCK_HEADER.size]) != hcrc:
            yield f"bad block header at byte {offset}"
            return
        if comp_len > MAX_BLOCK_BYTES or raw_len > MAX_BLOCK_BYTES:
            yield f"implausible block length at byte {offset}"
            return
        payload = f.read(comp_len)
        if len(payload) < comp_len:
            yield f"truncated block at byte {offset}"
            return
        if zlib.crc32(payload) != crc:
            yield f"block checksum mismatch at byte {offset}"
            return
        yield Frame(offset, n, t_min, t_max, payload)
        offset += BLOCK_FRAME_LEN + comp_len


def _read_index(f: Any, size: int) -> dict[str, Any] | None:
    if size < FILE_HEADER.size + TRAILER.size:
        return None
    f.seek(size - TRAILER.size)
    off, length, crc, magic = TRAILER.unpack(f.read(TRAILER.size))
    if magic != TRAILER_MAGIC or off + length + TRAILER.size != size:
        return None
    f.seek(off)
    body = f.read(length)
    if zlib.crc32(body) != crc:
        return None
    doc: dict[str, Any] = json.loads(zstandard.ZstdDecompressor().decompress(body))
    doc["index_offset"] = off
    return doc


def _check_header(f: Any) -> bool:
    f.seek(0)
    head = f.read(FILE_HEADER.size)
    return len(head) == FILE_HEADER.size and head[:8] == FILE_MAGIC


def _set_aside(path: Path) -> Path:
    """Rename an unrecoverable file to ``NAME.corrupt`` (``NAME.N.corrupt`` when
    that exists), never over another file."""
    names = itertools.chain([path.name + CORRUPT_SUFFIX],
                            (f"{path.name}.{n}{CORRUPT_SUFFIX}" for n in itertools.count(1)))
    for name in names:
        try:
            _rename_noreplace(path, path.with_name(name))
        except FileExistsError:
            continue
        fsync_dir(path.parent)
        return path.with_name(name)
    raise AssertionError("unreachable: the names never end")


def recover_segment(path: Path, audit: Audit) -> dict[str, Any]:
    """Keep the good blocks of a segment a crash left open, cut the torn rest and
    close it with its index. Returns the audit record."""
    st = path.stat()
    if st.st_nlink > 1:
        # _rename_noreplace's link(2) fallback was cut between link and unlink:
        # the segment is closed under its other name already.
        path.unlink()
        fsync_dir(path.parent)
        rec = {"action": "packetlog-recover", "file": str(path), "records": 0,
               "reason": "already closed under another name: this name removed"}
        audit(rec)
        return rec
    size = st.st_size
    with open(path, "rb") as f:
        if not _check_header(f):
            bad = _set_aside(path)
            rec = {"action": "packetlog-corrupt", "file": str(bad),
                   "reason": "bad or missing file header"}
            audit(rec)
            return rec
        f.seek(0)
        created_ns = FILE_HEADER.unpack(f.read(FILE_HEADER.size))[1]
        index = _Index()
        end = FILE_HEADER.size
        reason = None
        for frame in _read_frames(f, FILE_HEADER.size, None):
            if isinstance(frame, str):
                reason = frame
                break
            raw = zstandard.ZstdDecompressor().decompress(frame.payload)
            index.add(frame.offset, frame.records, frame.t_min, frame.t_max, raw)
            end = frame.offset + BLOCK_FRAME_LEN + len(frame.payload)
    seg = _SegmentFile.resume(path, end, index, created_ns)
    final = seg.publish()
    link = link_closed(seg, final, time.time)
    rec = {"action": "packetlog-recover", "file": str(final), "from": str(path),
           "records": index.records,
           "blocks": len(index.blocks), "truncated_bytes": size - end,
           "chain_link": link["digest"]}
    if reason:
        rec["reason"] = reason
    audit(rec)
    return rec


# ------------------------------------------------------------------ reading


def _to_ns(t: datetime | float | int | None) -> int | None:
    if t is None:
        return None
    if isinstance(t, datetime):
        if t.tzinfo is None:
            raise ValueError("times must carry a timezone")
        return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000
    return int(t * 1_000_000_000)


def segment_files(data_dir: str | os.PathLike[str], archives: bool = True) -> list[Path]:
    """Closed segments, archives (by default) and the open segment, oldest first."""
    d = packets_dir(data_dir)
    if not d.is_dir():
        return []
    suffixes = (SEGMENT_SUFFIX, OPEN_SUFFIX) + ((ARCHIVE_SUFFIX,) if archives else ())
    return sorted((p for p in d.iterdir() if p.name.endswith(suffixes)),
                  key=lambda p: p.name)


class _Decoder:
    def __init__(self) -> None:
        self.cap = 0
        self.recs: Any = None

    def decode(self, raw: bytes) -> tuple[Any, int]:
        n = lib.relay_block_count(raw, len(raw))
        if n < 0:
            raise BlockError("bad block header")
        if n > self.cap:
            self.cap = max(n, BLOCK_RECORDS)
            self.recs = ffi.new("struct relay_record[]", self.cap)
        got = lib.relay_block_decode(raw, len(raw), self.recs, self.cap)
        if got != n:
            raise BlockError("block does not decode")
        return self.recs, n


def record_dict(r: Any) -> dict[str, Any]:
    """A C record as the JSON object `relay logs packets --json` prints."""
    unattributed = r.rflags & RF_UNATTRIBUTED
    return {
        "time": rfc3339_ns(r.time_ns),
        "session_id": "" if unattributed else sessionid.to_text(bytes(r.session_id)),
        "client_ip": addr_str(r.client_family, bytes(r.client_ip)),
        "client_port": r.client_port,
        "direction": "in" if r.direction == 0 else "out",
        "src_ip": addr_str(r.family, bytes(r.src_ip)),
        "src_port": r.src_port,
        "dst_ip": addr_str(r.family, bytes(r.dst_ip)),
        "dst_port": r.dst_port,
        "seq": r.seq,
        "ack": r.ack,
        "flags": flags_str(r.tcp_flags),
        "window": r.window,
        "len": r.payload_len,
    }


def iter_records(data_dir: str | os.PathLike[str], session: str | None = None,
                 start: datetime | float | None = None, end: datetime | float | None = None,
                 *, client_ip: str | None = None, address: str | None = None,
                 archives: bool = True,
                 on_error: ErrorReport = _log_error) -> Iterator[dict[str, Any]]:
    """Records in time order per segment, filtered; ``start``/``end`` are aware
    datetimes or epoch seconds (end exclusive). Segments and blocks whose index
    rules them out are not decompressed. A corrupt or truncated segment is
    reported through ``on_error(path, reason)`` and the reading carries on."""
    lo, hi = _to_ns(start), _to_ns(end)
    want_session = sessionid.to_raw(session) if session else None
    dec = _Decoder()
    for path in segment_files(data_dir, archives):
        try:
            yield from _iter_segment(path, dec, want_session, session, lo, hi, client_ip,
                                     address, on_error)
        except (OSError, BlockError, zstandard.ZstdError, ValueError) as exc:
            on_error(str(path), str(exc))


def _iter_segment(path: Path, dec: _Decoder, want_session: bytes | None,
                  session: str | None, lo: int | None, hi: int | None,
                  client_ip: str | None, address: str | None,
                  on_error: ErrorReport) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not _check_header(f):
            on_error(str(path), "bad or missing file header")
            return
        index = None if path.name.endswith(OPEN_SUFFIX) else _read_index(f, size)
        if index is None and not path.name.endswith(OPEN_SUFFIX):
            on_error(str(path), "no valid index (truncated?): scanning its blocks")
        if index is not None:
            if index["records"] == 0:
                return
            if (lo is not None and index["t_max"] < lo) or \
               (hi is not None and index["t_min"] >= hi):
                return
            if (session and session not in index["sessions"]) or \
               (client_ip and client_ip not in index["client_ips"]) or \
               (address and address not in index["addresses"]):
                return
            end_of_frames: int | None = index["index_offset"]
        else:
            end_of_frames = None
        zd = zstandard.ZstdDecompressor()
        for frame in _read_frames(f, FILE_HEADER.size, end_of_frames):
            if isinstance(frame, str):
                # A torn tail is normal for the segment still being written.
                if not path.name.endswith(OPEN_SUFFIX):
                    on_error(str(path), frame)
                return
            if (lo is not None and frame.t_max < lo) or (hi is not None and frame.t_min >= hi):
                continue
            recs, n = dec.decode(zd.decompress(frame.payload))
            for i in range(n):
                r = recs[i]
                if (lo is not None and r.time_ns < lo) or (hi is not None and r.time_ns >= hi):
                    continue
                if want_session is not None and bytes(r.session_id) != want_session:
                    continue
                rec = record_dict(r)
                if client_ip and rec["client_ip"] != client_ip:
                    continue
                if address and address not in (rec["src_ip"], rec["dst_ip"]):
                    continue
                yield rec


# ------------------------------------------------------------------ archives


def archive_segment(src: Path, dst: Path) -> tuple[int, int]:
    """Re-encode a closed segment into an archive (larger blocks, higher zstd
    level); returns (records, archive bytes). The archive is complete and synced
    before this returns; the caller removes the source."""
    tmp = dst.with_name(dst.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    enc = _Encoder(ARCHIVE_BLOCK_RECORDS, ARCHIVE_ZSTD_LEVEL)
    batch = ffi.new("struct relay_record[]", ARCHIVE_BLOCK_RECORDS)
    fill = 0
    dec = _Decoder()
    zd = zstandard.ZstdDecompressor()
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not _check_header(f):
            raise BlockError(f"{src}: bad file header")
        f.seek(0)
        created = FILE_HEADER.unpack(f.read(FILE_HEADER.size))[1]
        index = _read_index(f, size)
        out = _SegmentFile(tmp, created)
        try:
            stop = index["index_offset"] if index else None
            for frame in _read_frames(f, FILE_HEADER.size, stop):
                if isinstance(frame, str):
                    raise BlockError(f"{src}: {frame}")
                recs, n = dec.decode(zd.decompress(frame.payload))
                i = 0
                while i < n:
                    take = min(n - i, ARCHIVE_BLOCK_RECORDS - fill)
                    ffi.memmove(batch + fill, recs + i, take * ffi.sizeof("struct relay_record"))
                    fill += take
                    i += take
                    if fill == ARCHIVE_BLOCK_RECORDS:
                        frame_b, raw, t0, t1 = enc.frame(batch, fill)
                        out.add_frame(frame_b, raw, fill, t0, t1)
                        fill = 0
            if fill:
                frame_b, raw, t0, t1 = enc.frame(batch, fill)
                out.add_frame(frame_b, raw, fill, t0, t1)
            out.finish()
            # Replacing is safe here: dst is this segment's own archive name, left
            # only by an archiving of the same source that crashed before its end.
            os.rename(tmp, dst)
            fsync_dir(dst.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(out.fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    return out.index.records, dst.stat().st_size


def disk_use(data_dir: str | os.PathLike[str]) -> int:
    """Bytes used by the packet log (segments and archives)."""
    d = packets_dir(data_dir)
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file()) if d.is_dir() else 0


def segment_index(path: Path) -> dict[str, Any] | None:
    """The index of a closed segment or archive; None when it has none (open,
    torn or corrupt)."""
    with open(path, "rb") as f:
        if not _check_header(f):
            return None
        return _read_index(f, os.fstat(f.fileno()).st_size)
