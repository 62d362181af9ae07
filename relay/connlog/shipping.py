"""The connection log's way off the host, as ``relay serve`` runs it: the RFC 5425
forwarder (relay.connlog.forwarder) and the local retention of the log
(relay.connlog.retention), each an asyncio task with its own stop event so that a
reload can restart the forwarder towards a new collector without touching the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from relay.config import Config, parse_duration
from relay.connlog.forwarder import Forwarder, make_forwarder, run_forwarder
from relay.connlog.retention import run_connlog_retention
from relay.errors import RelayError
from relay.metrics import Metric

log = logging.getLogger("relay")

DAY_S = 86400


class Shipping:
    def __init__(self, cfg: Config, audit: Callable[[dict[str, Any]], None]) -> None:
        self.cfg = cfg
        self.audit = audit
        self._forwarder: tuple[asyncio.Task[None], asyncio.Event] | None = None
        self.forwarder: Forwarder | None = None
        self._retention: tuple[asyncio.Task[None], asyncio.Event] | None = None

    def start(self) -> None:
        self._start_forwarder()
        self._start_retention()

    def _start_retention(self) -> None:
        self._retention = self._task(lambda stop: run_connlog_retention(
            self.cfg.data_dir, parse_duration(self.cfg.logs.connlog_keep) // DAY_S, stop,
            self.audit,
            compress_after_days=parse_duration(self.cfg.logs.connlog_compress_after) // DAY_S))

    def _start_forwarder(self) -> None:
        self.forwarder = None
        if not self.cfg.forward.collector:
            return
        try:
            fwd = make_forwarder(
                self.cfg.forward, self.cfg.data_dir, self.cfg.server.id, self.audit,
                facility=self.cfg.forward.facility,
                backoff_max=float(parse_duration(self.cfg.forward.retry_max)))
        except RelayError as exc:
            log.error("shipping task failed: %s", exc)
            return
        self.forwarder = fwd
        self._forwarder = self._task(lambda stop: run_forwarder(fwd, stop))

    def _task(self, make: Callable[[asyncio.Event], Any]) -> tuple[asyncio.Task[None],
                                                                    asyncio.Event]:
        stop = asyncio.Event()
        task = asyncio.create_task(make(stop))
        task.add_done_callback(self._ended)
        return task, stop

    @staticmethod
    def _ended(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("shipping task failed: %s", task.exception())

    async def reload(self, cfg: Config) -> None:
        """Restart the forwarder when [forward] changed; retention takes new ages."""
        old, self.cfg = self.cfg, cfg
        if old.forward != cfg.forward:
            await self._stop(self._forwarder)
            self._forwarder = None
            self._start_forwarder()
            log.info("forwarding target now %s", cfg.forward.collector or "(none, local only)")
        if old.logs != cfg.logs:
            await self._stop(self._retention)
            self._start_retention()

    @staticmethod
    async def _stop(entry: tuple[asyncio.Task[None], asyncio.Event] | None) -> None:
        if entry is None:
            return
        task, stop = entry
        stop.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(task, 10)

    def metrics(self) -> list[Metric]:
        """Backlog, last success and set-aside records of the forwarder, from its
        counters in memory: a scrape reads no file."""
        if self.forwarder is None:
            return []
        st = self.forwarder.status
        return [
            Metric("relay_ship_backlog_records", "gauge",
                   "Connection-log records not yet confirmed by the collector.")
            .add(st["backlog_records"]),
            Metric("relay_ship_backlog_bytes", "gauge",
                   "Bytes of the connection log not yet confirmed by the collector.")
            .add(st["backlog_bytes"]),
            Metric("relay_ship_last_success_timestamp_seconds", "gauge",
                   "When the collector last confirmed a batch (0: never).")
            .add(st["last_success_ts"]),
            Metric("relay_ship_consecutive_failures", "gauge",
                   "Failed delivery attempts since the last success.")
            .add(st["consecutive_failures"]),
            Metric("relay_ship_set_aside_total", "counter",
                   "Connection-log lines set aside instead of shipped (see "
                   "DATA_DIR/ship/set-aside.jsonl).")
            .add(st["set_aside"]),
        ]

    async def close(self) -> None:
        await self._stop(self._forwarder)
        await self._stop(self._retention)
