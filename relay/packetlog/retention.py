"""Retention of the packet log: archive, delete, and guard the disk.

Driven by the control plane: call :meth:`Retention.run` now and then (every
``RUN_INTERVAL``) and :meth:`Retention.disk_too_full` before accepting a session.
Time comes from the injected ``clock``, free space from the injected
``disk_free``, so 15 days are tested in a second.

- Closed segments stay as they are (fully searchable, fast) until their newest
  record is ``compress_after`` old (14 days by default, the issue's minimum), then
  are re-encoded into an archive (relay.packetlog.segments.archive_segment) and removed.
- With ``delete_after`` set, archives and segments whose newest record is older
  are deleted.
- When free space falls under ``min_free_bytes``, the oldest archives are deleted
  first, and never a file with a record younger than ``compress_after``.
- :meth:`disk_too_full` is true when free space is under ``refuse_free_bytes``
  even after that: the relay then refuses new sessions rather than run unlogged.

Every action is reported through ``audit`` as a dict, e.g.
``{"action": "packetlog-archive", "file": ..., "archive": ..., "records": ...}``,
for the connection log.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay import chain
from relay.packetlog import segments

DAY = 86400
# The issue: fully searchable for at least 14 days.
SEARCHABLE_SECONDS = 14 * DAY
# Keep this much free for the packet log to grow into before deleting archives:
# a busy relay writes ~5 bytes per packet, 1 GiB is hours of line rate.
MIN_FREE_BYTES = 1 << 30
# Under this, logging could fail within minutes: refuse new sessions.
REFUSE_FREE_BYTES = 256 << 20
# How often the control plane should call run(): archiving is by the day, the
# disk guard wants to react within minutes.
RUN_INTERVAL = 300.0


def _statvfs_free(path: Path) -> int:
    return shutil.disk_usage(path).free


class Retention:
    def __init__(self, data_dir: str | os.PathLike[str], *,
                 audit: Callable[[dict[str, Any]], None],
                 clock: Callable[[], float] = time.time,
                 compress_after: float = SEARCHABLE_SECONDS,
                 delete_after: float | None = None,
                 min_free_bytes: int = MIN_FREE_BYTES,
                 refuse_free_bytes: int = REFUSE_FREE_BYTES,
                 disk_free: Callable[[], int] | None = None) -> None:
        if delete_after is not None and delete_after < SEARCHABLE_SECONDS:
            raise ValueError("delete_after must be at least 14 days")
        self.dir = segments.packets_dir(data_dir)
        self.chain = chain.chain_path(data_dir, chain.PACKETS_CHAIN)
        self.audit = audit
        self.clock = clock
        self.compress_after = max(compress_after, SEARCHABLE_SECONDS)
        self.delete_after = delete_after
        self.min_free_bytes = min_free_bytes
        self.refuse_free_bytes = refuse_free_bytes
        self.disk_free = disk_free or (lambda: _statvfs_free(self.dir))

    def _newest(self, path: Path) -> float:
        """Wall-clock seconds of the file's newest record (mtime without index)."""
        index = segments.segment_index(path)
        if index and index["t_max"] is not None:
            return float(index["t_max"]) / 1e9
        return path.stat().st_mtime

    def _files(self, suffix: str) -> list[tuple[float, Path]]:
        if not self.dir.is_dir():
            return []
        return sorted((self._newest(p), p) for p in self.dir.iterdir()
                      if p.name.endswith(suffix))

    def run(self) -> list[dict[str, Any]]:
        """One pass of archiving, deletion by age and the disk guard; returns the
        audit records it emitted."""
        done: list[dict[str, Any]] = []

        def report(rec: dict[str, Any]) -> None:
            done.append(rec)
            self.audit(rec)

        now = self.clock()
        for newest, seg in self._files(segments.SEGMENT_SUFFIX):
            if now - newest < self.compress_after:
                continue
            dst = seg.with_name(seg.name.removesuffix(segments.SEGMENT_SUFFIX)
                                + segments.ARCHIVE_SUFFIX)
            before = seg.stat().st_size
            try:
                # The source's digest as archived: verify compares it with the
                # segment's own link, so a segment altered before archiving shows.
                source_sha, _ = chain.file_digest(seg)
                records, after = segments.archive_segment(seg, dst)
                index = segments.segment_index(dst) or {}
                sha, _ = chain.file_digest(dst)
            except (OSError, ValueError) as exc:
                report({"action": "packetlog-archive-failed", "file": str(seg),
                        "reason": str(exc)})
                continue
            link = chain.append_link(self.chain, {
                "event": "archive", "file": dst.name, "size": after, "sha256": sha,
                "source": seg.name, "source_sha256": source_sha, "t_min": index.get("t_min"),
                "t_max": index.get("t_max"), "records": records}, now)
            seg.unlink()
            report({"action": "packetlog-archive", "file": str(seg), "archive": str(dst),
                    "records": records, "bytes_before": before, "bytes_after": after,
                    "chain_link": link["digest"]})
        if self.delete_after is not None:
            for suffix in (segments.ARCHIVE_SUFFIX, segments.SEGMENT_SUFFIX):
                for newest, path in self._files(suffix):
                    if now - newest >= self.delete_after:
                        size = path.stat().st_size
                        self._unlink(path, "older than delete_after", now)
                        report({"action": "packetlog-delete", "file": str(path),
                                "bytes": size, "reason": "older than delete_after"})
        free = self.disk_free()
        if free < self.min_free_bytes:
            for newest, path in self._files(segments.ARCHIVE_SUFFIX):
                if free >= self.min_free_bytes or now - newest < SEARCHABLE_SECONDS:
                    break
                size = path.stat().st_size
                self._unlink(path, "disk guard", now)
                report({"action": "packetlog-delete", "file": str(path), "bytes": size,
                        "reason": "disk guard", "free_bytes": free,
                        "min_free_bytes": self.min_free_bytes})
                free = self.disk_free()
        return done

    def _unlink(self, path: Path, reason: str, now: float) -> None:
        """Delete a file and link the deletion, so verify does not call it missing."""
        sha, size = chain.file_digest(path)
        chain.append_link(self.chain, {"event": "delete", "file": path.name, "size": size,
                                       "sha256": sha, "reason": reason}, now)
        path.unlink()

    def disk_too_full(self) -> bool:
        return self.disk_free() < self.refuse_free_bytes

    def why_refused(self) -> str:
        return (f"the packet log's disk has {self.disk_free()} bytes free, under "
                f"{self.refuse_free_bytes}: refusing new sessions rather than run unlogged")
