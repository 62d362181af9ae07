"""Registration with the relay directory (``[directory] url``).

A task of ``relay serve`` sends a heartbeat every ``[directory] heartbeat`` (with
+-:data:`JITTER` so that relays started together do not beat in step): one HTTPS
``POST`` of the relay's state as JSON (relay.central.directory.parse_registration
reads it) over mutual TLS, the client certificate being ``[directory] cert``,
whose subject CN the directory takes as the relay id. Every heartbeat carries
the whole state (id, advertised address, ports per protocol, uptime, sessions,
traffic, peak measured throughput, operator, message, country, logging policy and
the ready ``.ovpn``), so a directory that restarted lists the relay again at the
next beat.

A failed heartbeat is retried with exponential back-off and jitter (from
:data:`BACKOFF_INITIAL_S`, doubling, at most the heartbeat interval), every step
bounded by a timeout: the task never stalls the event loop, and network trouble
never ends it. Its state (``relay_directory_*`` metrics, and
``DATA_DIR/directory-status.json`` for ``relay doctor``) says whether the relay
is listed and why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from relay.central.directory import REGISTER_PATH
from relay.clientconfig import openvpn_config
from relay.clienttext import clean
from relay.config import Config, parse_directory_url, parse_duration, parse_hostport
from relay.connlog.daylog import rfc3339_ms
from relay.errors import RelayError
from relay.fsutil import write_atomic
from relay.metrics import Metric

log = logging.getLogger("relay")

STATUS_FILE = "directory-status.json"
# Each heartbeat waits +-10% around the interval: enough to spread a fleet that
# restarted together within a few beats (the forwarder's reconnections use
# "equal jitter" for the same reason).
JITTER = 0.1
# TCP connect, TLS handshake, request and answer: the directory answers at
# once; beyond 10 s the path or the directory is broken (the forwarder's
# CONNECT_TIMEOUT_S).
REQUEST_TIMEOUT_S = 10.0
BACKOFF_INITIAL_S = 1.0
# The directory's answer is a short JSON object; more is not a directory.
MAX_RESPONSE_BYTES = 16 * 1024

# Stats the relay passes at each beat: sessions_active, sessions_total, traffic_bytes.
StateSource = Callable[[], dict[str, int]]


def client_context(cfg: Config) -> ssl.SSLContext:
    d = cfg.directory
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if d.ca:
            ctx.load_verify_locations(d.ca)
        else:
            ctx.load_default_certs()
        ctx.load_cert_chain(d.cert, d.key)
    except (OSError, ssl.SSLError) as exc:
        raise RelayError(f"[directory] ca/cert/key: cannot load: {exc}") from None
    return ctx


def advertised_address(cfg: Config) -> str:
    """``[directory] address``, else the CSTP listen address, else the host name
    (a blocking look-up: call it off the event loop)."""
    if cfg.directory.address:
        return cfg.directory.address
    host, _ = parse_hostport(cfg.server.listen)
    return socket.getfqdn() if host in ("0.0.0.0", "::") else host


def static_part(cfg: Config) -> dict[str, Any]:
    """What does not change between beats (reads the certificate: off the loop)."""
    d = cfg.directory
    address = advertised_address(cfg)
    openvpn_port = parse_hostport(cfg.openvpn.listen)[1]
    return {
        "id": cfg.server.id,
        "address": address,
        "ports": {"cstp": parse_hostport(cfg.server.listen)[1],
                  "openvpn-udp": openvpn_port, "openvpn-tcp": openvpn_port},
        "operator": d.operator, "message": d.message,
        "country": d.country, "country_name": d.country_name,
        "log_policy": {"packet_log_searchable": cfg.logs.compress_after,
                       "packet_log_delete_after": cfg.logs.delete_after or "never",
                       "connlog_keep": cfg.logs.connlog_keep},
        "ovpn": openvpn_config(cfg, cfg.data_dir, "udp", "tun", address),
    }


class Registration:
    def __init__(self, cfg: Config, state: StateSource,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.state = state
        self.clock = clock
        self.started = clock()
        self.host, self.port = parse_directory_url(cfg.directory.url)
        self.results: Counter[str] = Counter()  # ok, refused, error
        self.listed = False
        self.last_success = 0.0
        self.last_error: str | None = None
        self.failures = 0
        self.peak_bps: int | None = None
        self._last_traffic: tuple[float, int] | None = None
        self._static: dict[str, Any] | None = None
        self._ctx: ssl.SSLContext | None = None

    def reload(self, cfg: Config) -> None:
        """New settings take effect at the next beat; an emptied url pauses the
        heartbeats (the directory drops the relay after its window)."""
        if cfg.directory != self.cfg.directory or cfg.server.id != self.cfg.server.id:
            if cfg.directory.url:
                self.host, self.port = parse_directory_url(cfg.directory.url)
            self._static = self._ctx = None
        self.cfg = cfg

    def body(self) -> bytes:
        assert self._static is not None
        now = self.clock()
        st = self.state()
        traffic = st["traffic_bytes"]
        if self._last_traffic is not None and now > self._last_traffic[0]:
            bps = int((traffic - self._last_traffic[1]) * 8 / (now - self._last_traffic[0]))
            if bps > 0:
                self.peak_bps = max(self.peak_bps or 0, bps)
        self._last_traffic = (now, traffic)
        return json.dumps({**self._static, "uptime_s": int(now - self.started),
                           "sessions_active": st["sessions_active"],
                           "sessions_total": st["sessions_total"], "traffic_bytes": traffic,
                           "throughput_bps": self.peak_bps}).encode()

    async def beat(self) -> None:
        """One heartbeat; raises on failure (OSError, ssl.SSLError, TimeoutError,
        RelayError for a refusal)."""
        if self._static is None:
            self._static = await asyncio.to_thread(static_part, self.cfg)
        if self._ctx is None:
            self._ctx = await asyncio.to_thread(client_context, self.cfg)
        body = self.body()
        request = (f"POST {REGISTER_PATH} HTTP/1.1\r\nHost: {self.host}\r\n"
                   "Content-Type: application/json\r\nUser-Agent: relay\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        answer = await asyncio.wait_for(self._exchange(request), REQUEST_TIMEOUT_S)
        status_line, _, rest = answer.partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise RelayError(f"not an HTTP answer: {status_line[:80]!r}")
        if parts[1] != b"200":
            detail: object = rest.partition(b"\r\n\r\n")[2].decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                detail = json.loads(cast(str, detail)).get("error", detail)
            # The directory's words, cleaned like any text from the network.
            raise Refused(f"{clean(parts[1].decode(errors='replace'))}: {clean(detail)}")

    async def _exchange(self, request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._ctx,
                                                       server_hostname=self.host)
        try:
            writer.write(request)
            await writer.drain()
            answer = await reader.read(MAX_RESPONSE_BYTES)
            while len(answer) < MAX_RESPONSE_BYTES and (more := await reader.read(
                    MAX_RESPONSE_BYTES - len(answer))):
                answer += more
            return answer
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def run(self, stop: asyncio.Event) -> None:
        log.info("registering with the directory %s as %s", self.cfg.directory.url,
                 self.cfg.server.id)
        while not stop.is_set():
            interval = float(parse_duration(self.cfg.directory.heartbeat))
            if not self.cfg.directory.url:
                self.listed = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
                continue
            try:
                await self.beat()
            except Refused as exc:
                delay = self._failed("refused", f"the directory refused this relay: {exc}",
                                     interval)
            except (OSError, ssl.SSLError, TimeoutError, RelayError) as exc:
                delay = self._failed("error", _describe(exc), interval)
            else:
                if not self.listed or self.failures:
                    log.info("listed by the directory %s", self.cfg.directory.url)
                self.results["ok"] += 1
                self.listed, self.failures, self.last_success = True, 0, self.clock()
                delay = interval * random.uniform(1 - JITTER, 1 + JITTER)
            try:
                await asyncio.to_thread(self._write_status)
            except OSError as exc:  # a full disk must not end the registration
                log.warning("cannot write %s: %s", STATUS_FILE, exc.strerror)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    def _failed(self, result: str, text: str, interval: float) -> float:
        self.results[result] += 1
        self.failures += 1
        self.listed = False
        if text != self.last_error or self.failures == 1:
            log.warning("directory heartbeat failed: %s", text)
        self.last_error = text
        # Equal jitter: [d/2, d], d doubling up to the heartbeat interval.
        d = min(interval, BACKOFF_INITIAL_S * 2 ** (self.failures - 1))
        return random.uniform(d / 2, d)

    def status(self) -> dict[str, Any]:
        return {"url": self.cfg.directory.url, "id": self.cfg.server.id, "pid": os.getpid(),
                "listed": self.listed,
                "last_success": rfc3339_ms(self.last_success) if self.last_success else None,
                "last_error": self.last_error, "consecutive_failures": self.failures,
                "heartbeats": dict(self.results)}

    def _write_status(self) -> None:
        write_atomic(Path(self.cfg.data_dir) / STATUS_FILE,
                     (json.dumps(self.status()) + "\n").encode())

    def metrics(self) -> list[Metric]:
        beats = Metric("relay_directory_heartbeats_total", "counter",
                       "Heartbeats sent to the directory, by result (ok, refused, error).")
        for result in ("ok", "refused", "error"):
            beats.add(self.results[result], result=result)
        return [
            beats,
            Metric("relay_directory_listed", "gauge",
                   "1 when the last heartbeat was accepted.").add(int(self.listed)),
            Metric("relay_directory_last_success_timestamp_seconds", "gauge",
                   "When the directory last accepted a heartbeat (0: never).")
            .add(self.last_success),
        ]


class Refused(RelayError):
    """The directory answered, and not with 200."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the directory's certificate does not verify: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {REQUEST_TIMEOUT_S:.0f}s"
    return f"{type(exc).__name__}: {exc}"


def read_status(data_dir: Path) -> dict[str, Any] | None:
    """The last heartbeat's outcome, for relay doctor (None: never ran here)."""
    try:
        data = json.loads((Path(data_dir) / STATUS_FILE).read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None
