"""Prometheus text-format metrics (exposition format 0.0.4) on a small HTTP
endpoint, loopback by default.

Names follow the Prometheus conventions: ``relay_`` prefix, ``_total`` for
counters, base units in the name (``_bytes``, ``_seconds``, ``_ratio``).
Components that are not part of the core (capture, shipping) register a
:data:`Collector` that returns their samples at scrape time, so nothing is
computed between scrapes; figures kept elsewhere (``relay serve``'s workers) are
fetched by the server's ``refresh`` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger("relay")

# A scrape request is one short GET; anything longer is not a Prometheus server.
MAX_REQUEST_BYTES = 8 * 1024
# Prometheus' default scrape timeout is 10 s; a client slower than that is gone.
REQUEST_TIMEOUT_S = 10.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = dict[str, str]


@dataclass
class Metric:
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Metric:
        self.samples.append((labels, value))
        return self


Collector = Callable[[], Iterable[Metric]]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(metrics: Iterable[Metric]) -> str:
    lines: list[str] = []
    for m in metrics:
        lines.append(f"# HELP {m.name} {m.help}")
        lines.append(f"# TYPE {m.name} {m.kind}")
        for labels, value in m.samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            suffix = f"{{{label_text}}}" if label_text else ""
            lines.append(f"{m.name}{suffix} {float(value)!r}")
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on ``host:port``; every collector is asked at each scrape,
    after ``refresh`` (when given) has been awaited."""

    def __init__(self, collectors: list[Collector],
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.collectors = collectors
        self.refresh = refresh
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._client, host, port,
                                                 limit=MAX_REQUEST_BYTES)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def scrape(self) -> str:
        metrics: list[Metric] = []
        for collect in self.collectors:
            metrics.extend(collect())
        return render(metrics)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            request_line = head.split(b"\r\n", 1)[0].split()
            if len(request_line) == 3 and request_line[0] == b"GET" \
                    and request_line[1].split(b"?")[0] == b"/metrics":
                if self.refresh is not None:
                    await self.refresh()
                body = self.scrape().encode()
                status = "200 OK"
            else:
                body, status = b"try /metrics\n", "404 Not Found"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            with contextlib.suppress(ConnectionError):
                writer.close()
