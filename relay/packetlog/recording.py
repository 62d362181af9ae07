"""The packet-log duty of ``relay serve``: capture, packet log, retention, and the
audit of capture being switched off and on.

Bundles relay.packetlog.capture (eBPF on the TAP device, C drain), relay.packetlog.segments (the
segments) and relay.packetlog.retention (archive, delete, disk guard) behind the few calls
the relay core makes: start, add/remove a session, why new sessions must be
refused, metrics, reload, close.

Threads: pyroute2's synchronous API cannot run inside the running (uv)loop, and
bcc's compile takes most of a second, so start, close and retention passes run
in a worker thread; the drain runs on the loop (relay.packetlog.capture). Audit records
raised in a worker thread are handed to the loop thread, the only writer of the
connection log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from relay.config import Config, parse_duration
from relay.metrics import Metric
from relay.packetlog import segments
from relay.packetlog.capture import Capture, FilterWatcher
from relay.packetlog.retention import RUN_INTERVAL, Retention
from relay.packetlog.segments import PacketLogWriter

log = logging.getLogger("relay")

Audit = Callable[[dict[str, Any]], None]


class Recording:
    def __init__(self, cfg: Config, dev: str, audit: Audit) -> None:
        self.cfg = cfg
        self.dev = dev
        self.audit = audit
        self.data_dir = cfg.data_dir
        self.writer = PacketLogWriter(self.data_dir,
                                      segment_seconds=parse_duration(cfg.logs.packet_segment),
                                      audit=audit)
        self.capture = Capture(dev, self.writer, pin_root=cfg.pin_root)
        self.retention = self._retention(cfg)
        self.watcher: FilterWatcher | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _retention(self, cfg: Config) -> Retention:
        return Retention(
            self.data_dir, audit=self._threadsafe_audit,
            compress_after=parse_duration(cfg.logs.compress_after),
            delete_after=parse_duration(cfg.logs.delete_after) if cfg.logs.delete_after else None)

    def _threadsafe_audit(self, record: dict[str, Any]) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.audit, record)
        else:
            self.audit(record)

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self.writer.open()  # recovery audits go straight to the connection log
        await loop.run_in_executor(None, self.capture.start)
        self.capture.start_drain(loop)
        self.watcher = FilterWatcher(self.dev, self._on_filter_change, loop=loop)
        await loop.run_in_executor(None, self.watcher.start)
        self._task = asyncio.create_task(self._retention_loop())
        log.info("capture attached to %s (tc clsact ingress and egress), packet log in %s",
                 self.dev, segments.packets_dir(self.data_dir))

    def _on_filter_change(self, attached: bool) -> None:
        action = "logging-on" if attached else "logging-off"
        message = ("packet capture restored on" if attached
                   else "packet capture removed from") + f" {self.dev}"
        (log.info if attached else log.warning)("%s", message)
        self.audit({"action": action, "dev": self.dev, "message": message})

    async def _retention_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await loop.run_in_executor(None, self._retention_pass)
            await asyncio.sleep(RUN_INTERVAL)

    def _retention_pass(self) -> None:
        """In a worker thread: archive and delete, then recount the packet log's
        files for the metrics (which read only the counts)."""
        self.retention.run()
        self.writer.usage.rescan()

    # -- the relay core's calls -------------------------------------------------------

    def add_session(self, mac: bytes, session_id: str, client_ip: str, client_port: int) -> None:
        self.capture.add_session(mac, session_id, client_ip, client_port)

    def remove_session(self, mac: bytes) -> None:
        self.capture.remove_session(mac)

    def refuse_reason(self) -> str | None:
        """Why new sessions must be refused (the relay never runs unlogged), or None."""
        if self.retention.disk_too_full():
            return self.retention.why_refused()
        return None

    def reload(self, cfg: Config) -> None:
        self.cfg = cfg
        self.retention = self._retention(cfg)

    def metrics(self) -> list[Metric]:
        st = self.capture.stats()
        # Counts kept by the writer and the retention pass: a scrape lists no directory.
        seg_bytes, files = self.writer.usage.totals()
        if self.writer.current_path is not None:
            seg_bytes += self.writer.current_size
            files += 1
        drops = Metric("relay_capture_drops_total", "counter",
                       "Capture records lost because the ring buffer was full, by CPU.")
        for cpu, n in enumerate(st["drops_per_cpu"]):
            drops.add(n, cpu=str(cpu))
        return [
            Metric("relay_capture_records_total", "counter",
                   "Packet records made by the eBPF capture.").add(st["records"]),
            drops,
            Metric("relay_capture_drained_records_total", "counter",
                   "Packet records moved from the ring buffer to the packet log.")
            .add(st["drained"]),
            Metric("relay_capture_ring_fill_ratio", "gauge",
                   "Fraction of the ring buffer holding undrained records.")
            .add(st["ring_used"] / st["ring_bytes"]),
            Metric("relay_capture_flush_errors_total", "counter",
                   "Drains or flushes into the packet log that failed (retried).")
            .add(st["flush_errors"]),
            Metric("relay_capture_attached", "gauge",
                   "1 when both tc filters are on the TAP device.")
            .add(1.0 if self.watcher is not None and self.watcher.state else 0.0),
            Metric("relay_packetlog_bytes", "gauge",
                   "Bytes of packet-log segments and archives on disk.").add(seg_bytes),
            Metric("relay_packetlog_segments", "gauge",
                   "Packet-log segment and archive files on disk.").add(files),
        ]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        loop = asyncio.get_running_loop()
        if self.watcher is not None:
            await loop.run_in_executor(None, self.watcher.stop)
            self.watcher = None
        self.capture.stop_drain()  # on the loop's thread, which owns the reader
        # Drain and flush what is left, detach and unpin, then close the segment.
        await loop.run_in_executor(None, self.capture.close)
        self.writer.close()
