"""Packet capture on the TAP device: the eBPF programs, the session map, the drain.

``Capture`` compiles ebpf/capture.c with bcc, attaches it at tc clsact ingress and
egress of the device (relay/packetlog/tcfilter.py), pins programs and maps under
``/sys/fs/bpf/relay/<dev>/`` for ``relay logging on|off|status`` (mounting a bpffs
there first when there is none, as under ``ip netns exec``), keeps the
kernel's session map in step with the relay's sessions, and drains the ring
buffer in C (cext/drain.c) into a :class:`relay.packetlog.segments.PacketLogWriter`.

Threads: every method runs on the caller's thread; :meth:`start_drain` hooks the
drain into an asyncio loop (``add_reader`` on the ring buffer's fd, woken by the
kernel only when the ring is filling, plus a timer every ``DRAIN_INTERVAL``), so
then drain and packet-log writes run on the loop's thread, a batch per call with
no Python per record. :class:`FilterWatcher` runs its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import select
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay import sessionid
from relay.cext import ffi, lib
from relay.errors import RelayError
from relay.packetlog import tcfilter
from relay.packetlog.segments import BLOCK_RECORDS, PacketLogWriter

log = logging.getLogger("relay.packetlog.capture")

EBPF_DIR = Path(__file__).resolve().parents[2] / "ebpf"
CAPTURE_SOURCE = EBPF_DIR / "capture.c"

# 16 MiB of ring = 149k records of 112 bytes (104 + the ring's 8-byte header):
# at 1 M packets/s that is 150 ms, beyond the 100 ms drain timer below.
RING_BYTES = 16 << 20
# Wake the drain early once a quarter of the ring is used: leaves 3/4 of the ring
# (120 ms at 1 M packets/s) for the loop to get round to it.
WAKE_FRACTION = 4
# The timer drain: records wait at most this long in the ring when traffic is
# too light to fill a quarter of it.
DRAIN_INTERVAL = 0.1
# Records per drain call: one block, so a call never stalls the loop for long
# (8192 records take ~1 ms to drain and encode).
DRAIN_BATCH = BLOCK_RECORDS
# Sessions the kernel map holds; a relay with more concurrent sessions than this
# is far beyond one volunteer host.
MAX_SESSIONS = 65536
MAC_LEN = 6
# A drain or flush that fails (disk full, I/O error) is retried at the next timer
# tick and counted in relay_capture_flush_errors_total; it is logged at most once
# per this many seconds, with the count since the last line, so a failing disk
# (every DRAIN_INTERVAL) does not flood the journal. A minute is nginx's and
# rsyslog's order of magnitude for repeated-error suppression.
ERROR_LOG_INTERVAL = 60.0


def mac_key(mac: bytes) -> int:
    """The session map key: the MAC's 6 bytes at the start of a little-endian u64,
    as ebpf/capture.c copies them."""
    if len(mac) != MAC_LEN:
        raise ValueError(f"a MAC is 6 bytes, not {len(mac)}")
    return int.from_bytes(mac + b"\0\0", "little")


def _session_value(session_id: str, client_ip: str, client_port: int) -> Any:
    ip = ipaddress.ip_address(client_ip)
    v = ffi.new("struct relay_session *")
    v.session_id = sessionid.to_raw(session_id)
    packed = ip.packed
    ffi.memmove(v.client_ip, packed, len(packed))
    v.client_port = client_port
    v.client_family = ip.version
    return v


class Capture:
    """The capture on one device. ``writer`` receives every drained record."""

    def __init__(self, dev: str, writer: PacketLogWriter, *, netns: str | None = None,
                 ring_bytes: int = RING_BYTES, pin_root: Path = tcfilter.PIN_ROOT,
                 max_sessions: int = MAX_SESSIONS) -> None:
        if ring_bytes & (ring_bytes - 1) or ring_bytes < os.sysconf("SC_PAGESIZE"):
            raise ValueError("ring_bytes must be a power of two of at least a page")
        self.dev = dev
        self.writer = writer
        self.netns = netns
        self.ring_bytes = ring_bytes
        # pin_root is <bpffs>/relay ([capture] bpffs).
        self.bpffs = pin_root.parent
        self.pins = tcfilter.pin_dir(dev, pin_root)
        self.max_sessions = max_sessions
        self._bpf: Any = None
        self._ring_fd = -1
        self._fds: dict[str, int] = {}
        self._drain: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.flush_errors = 0
        self._errors_unlogged = 0
        self._error_logged_at = -ERROR_LOG_INTERVAL

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Compile, load, pin and attach. Raises RelayError when bcc cannot."""
        try:
            from bcc import BPF
        except ImportError as exc:
            raise RelayError("bcc is missing: apt-get install python3-bpfcc") from exc
        self._ring_fd = lib.relay_bpf_ringbuf_create(self.ring_bytes)
        if self._ring_fd < 0:
            raise RelayError(f"cannot create the BPF ring buffer: {os.strerror(ffi.errno)}")
        cflags = [f"-I{EBPF_DIR}", f"-DRELAY_RING_FD={self._ring_fd}",
                  f"-DRELAY_WAKE_BYTES={self.ring_bytes // WAKE_FRACTION}",
                  f"-DRELAY_MAX_SESSIONS={self.max_sessions}"]
        try:
            self._bpf = BPF(src_file=str(CAPTURE_SOURCE).encode(), cflags=cflags)
            fn_in = self._bpf.load_func(b"relay_capture_in", BPF.SCHED_CLS)
            fn_out = self._bpf.load_func(b"relay_capture_out", BPF.SCHED_CLS)
        except Exception as exc:
            self.close()
            raise RelayError(f"cannot load the capture program: {exc}") from exc
        self._fds = {
            tcfilter.PROG_IN: fn_in.fd, tcfilter.PROG_OUT: fn_out.fd,
            tcfilter.MAP_EVENTS: self._ring_fd,
            tcfilter.MAP_SESSIONS: self._bpf[b"relay_sessions"].map_fd,
            tcfilter.MAP_COUNTERS: self._bpf[b"relay_counters"].map_fd,
        }
        self._drain = lib.relay_drain_open(self._ring_fd, self.ring_bytes, BLOCK_RECORDS)
        if self._drain == ffi.NULL:
            self.close()
            raise RelayError(f"cannot map the ring buffer: {os.strerror(ffi.errno)}")
        try:
            if tcfilter.ensure_bpffs(self.bpffs):
                log.info("mounted a bpffs of this relay's own at %s (it had none, as under "
                         "`ip netns exec`); `relay logging` finds it through /proc", self.bpffs)
            self.pins.mkdir(parents=True, exist_ok=True)
            for name, fd in self._fds.items():
                tcfilter.obj_pin(fd, self.pins / name)
        except OSError as exc:
            self.close()
            raise RelayError(f"cannot pin the capture in {self.pins}: {exc.strerror}") from None
        except RelayError:
            self.close()
            raise
        self.attach()

    def close(self) -> None:
        """Detach, unpin, stop draining and free everything; safe to call twice."""
        self.stop_drain()
        if self._drain is not None:
            self.flush()
            lib.relay_drain_close(self._drain)
            self._drain = None
        if self._fds:
            with contextlib.suppress(RelayError, OSError):
                self.detach()
            shutil.rmtree(self.pins, ignore_errors=True)
            self._fds = {}
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        if self._ring_fd >= 0:
            os.close(self._ring_fd)
            self._ring_fd = -1

    # -- tc -----------------------------------------------------------------------

    def attach(self) -> None:
        with tcfilter.iproute(self.netns) as ipr:
            tcfilter.attach(ipr, self.dev, self._fds[tcfilter.PROG_IN],
                            self._fds[tcfilter.PROG_OUT])

    def detach(self) -> None:
        with tcfilter.iproute(self.netns) as ipr:
            tcfilter.detach(ipr, self.dev)

    def attached(self) -> bool:
        with tcfilter.iproute(self.netns) as ipr:
            return all(tcfilter.attached_state(ipr, self.dev))

    # -- sessions -----------------------------------------------------------------

    def add_session(self, mac: bytes, session_id: str, client_ip: str, client_port: int) -> None:
        key = ffi.new("uint64_t *", mac_key(mac))
        value = _session_value(session_id, client_ip, client_port)
        if lib.relay_bpf_map_update(self._fds[tcfilter.MAP_SESSIONS], key, value) < 0:
            raise RelayError(f"cannot add the session to the capture map: "
                             f"{os.strerror(ffi.errno)}")

    def remove_session(self, mac: bytes) -> None:
        key = ffi.new("uint64_t *", mac_key(mac))
        lib.relay_bpf_map_delete(self._fds[tcfilter.MAP_SESSIONS], key)

    # -- draining -----------------------------------------------------------------

    @property
    def ring_fd(self) -> int:
        """Readable (epoll) when the kernel has woken the consumer."""
        return self._ring_fd

    def drain(self, max_records: int = 1 << 62) -> int:
        """Move up to max_records from the ring into the packet log; returns how
        many. Full blocks are written at once, a partial one by :meth:`flush`."""
        total = 0
        while total < max_records:
            got = lib.relay_drain_run(self._drain, min(DRAIN_BATCH, max_records - total))
            total += got
            if lib.relay_drain_buffered(self._drain) >= BLOCK_RECORDS:
                self._write_block()
            elif got == 0:
                break
        return total

    def flush(self) -> None:
        """Drain what is there, write the partial block and let the writer sync."""
        self.drain()
        self._write_block()
        self.writer.tick()

    def _write_block(self) -> None:
        n = lib.relay_drain_buffered(self._drain)
        if n:
            self.writer.write(lib.relay_drain_records(self._drain), n)
            lib.relay_drain_reset(self._drain)

    def start_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._ring_fd, self._on_readable)
        self._timer = loop.call_later(DRAIN_INTERVAL, self._on_timer)

    def stop_drain(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._ring_fd)
            if self._timer:
                self._timer.cancel()
            self._loop = None
            self._timer = None

    def _on_readable(self) -> None:
        try:
            self.drain(DRAIN_BATCH * 4)
        except Exception as exc:
            self._failed("drain", exc)

    def _on_timer(self) -> None:
        assert self._loop is not None
        try:
            # The timer also flushes: the writer syncs at most every FLUSH_INTERVAL.
            self.flush()
        except Exception as exc:
            self._failed("flush", exc)
        finally:
            # Whatever failed, the next tick comes: one error must not end the
            # flushing (and the capture's durability) for good.
            if self._loop is not None:
                self._timer = self._loop.call_later(DRAIN_INTERVAL, self._on_timer)

    def _failed(self, what: str, exc: Exception) -> None:
        """Count a failed drain or flush; log it, at most every ERROR_LOG_INTERVAL."""
        self.flush_errors += 1
        self._errors_unlogged += 1
        now = time.monotonic()
        if now - self._error_logged_at < ERROR_LOG_INTERVAL:
            return
        log.error("packet log %s failed on %s (%d failure(s) since the last such line; "
                  "retrying every %.1f s): %s: %s", what, self.dev, self._errors_unlogged,
                  DRAIN_INTERVAL, type(exc).__name__, exc)
        self._error_logged_at = now
        self._errors_unlogged = 0

    # -- stats --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        c = tcfilter.read_counters(self._fds[tcfilter.MAP_COUNTERS])
        return {"records": sum(c.records), "drops": sum(c.drops), "drops_per_cpu": c.drops,
                "drained": lib.relay_drain_total(self._drain) if self._drain else 0,
                "ring_used": lib.relay_drain_ring_used(self._drain) if self._drain else 0,
                "ring_bytes": self.ring_bytes, "flush_errors": self.flush_errors}


class FilterWatcher:
    """Calls ``on_change(attached)`` whenever both capture filters become present
    or one of them goes away, by whatever means (``relay logging``, ``tc filter
    del``, the qdisc being deleted). Runs a thread; with ``loop`` given, the
    callback runs on that loop's thread instead."""

    # How often the thread checks whether it was asked to stop.
    POLL_SECONDS = 0.2

    def __init__(self, dev: str, on_change: Callable[[bool], None], *,
                 netns: str | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.dev = dev
        self.on_change = on_change
        self.netns = netns
        self.loop = loop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.state: bool | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"tc-watch-{self.dev}",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RelayError("the netlink watcher did not start")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        with tcfilter.iproute(self.netns) as mon, tcfilter.iproute(self.netns) as q:
            mon.bind()
            self.state = all(tcfilter.attached_state(q, self.dev))
            self._ready.set()
            while not self._stop.is_set():
                ready, _, _ = select.select([mon.fileno()], [], [], self.POLL_SECONDS)
                if not ready:
                    continue
                # Any traffic on the socket is a reason to look again: pyroute2 does
                # not parse every tc notification (chain events, for one), and a
                # look costs one dump of two filter lists.
                with contextlib.suppress(Exception):
                    for _ in mon.get():
                        pass
                try:
                    state = all(tcfilter.attached_state(q, self.dev))
                except RelayError:  # the device is gone
                    state = False
                if state != self.state:
                    self.state = state
                    self._emit(state)

    def _emit(self, state: bool) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.on_change, state)
        else:
            self.on_change(state)


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """Poll predicate until true or timeout (for callers and tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
