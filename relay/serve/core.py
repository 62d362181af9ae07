"""``relay serve``: the control plane, and the datapath workers it runs.

One :class:`Relay`, the control plane, owns what one place must: the TAP device
and its queues, the steering (relay.serve.steer), the listening sockets, the
session table (addresses, MACs, connect and disconnect records, the journal),
the abuse defences and bans, the capture and packet log, NAT and the egress
policy, the forwarder, the directory registration, the control socket and the
metrics. It runs ``[server] workers`` datapath workers (relay.serve.worker),
lends each its TAP queue and sockets, and answers their messages
(relay.serve.wire): admissions, sessions opened and closed, their counters,
floats and login cookies; it pushes bans, reloads and operators' disconnects to
them. A worker that dies is restarted; its sessions get their disconnect
records (reason ``worker-lost``) from the counters of their last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from relay import control
from relay.clienttext import clean
from relay.config import Config, ConfigError, parse_hostport
from relay.connlog import daylog
from relay.connlog.shipping import Shipping
from relay.errors import RelayError
from relay.fdlimit import nofile_needed, raise_nofile
from relay.metrics import Collector, Metric, MetricsServer
from relay.netaddr import canonical_address, canonical_ip
from relay.packetlog.recording import Recording
from relay.protocols.openvpn.cookie import new_cookie_key
from relay.serve import steer, wire
from relay.serve.abuse import Abuse, parse_network
from relay.serve.egress import Policy
from relay.serve.nat import RelayTable
from relay.serve.registration import Registration
from relay.serve.rpc import Peer, PeerLost, RemoteError
from relay.serve.sessions import (
    AS_CONNECTED,
    AddressPool,
    Journal,
    Session,
    SessionTable,
    connect_record,
    disconnect_record,
    tags_in_log,
)
from relay.serve.steer import Steering
from relay.serve.tap import Tap
from relay.times import rfc3339_ms
from relay.tlsconf import server_context, tls_crypt_key

log = logging.getLogger("relay")

# --- Limits and timeouts -------------------------------------------------------------

# The disconnect record's reason for a session an operator ended (relay sessions
# disconnect), followed by their words when they gave any.
OPERATOR_DISCONNECT = "operator-disconnect"
# ... for the sessions of a worker that died (crashed, killed, out of memory).
WORKER_LOST = "worker-lost"
# A cookie from a successful login must be used for a tunnel within this time
# (ocserv's cookie-timeout default is 300 s).
LOGIN_TTL_S = 300.0
# How a worker starts: SIGINT ignored until its loop handles it (a Ctrl-C while it
# imports must not print a traceback), then its main.
WORKER_BOOT = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
               "signal.signal(signal.SIGHUP, signal.SIG_IGN); "
               "from relay.serve.worker import main; sys.exit(main(sys.argv[1:]))")
# A worker must serve this long after it was started (imports, TLS set-up); one
# that does not is killed and started again. A minute covers a loaded machine.
WORKER_START_TIMEOUT_S = 60.0
# A dead worker is started again after this (systemd's RestartSec default);
# one that dies within WORKER_STABLE_S of its start (systemd's
# StartLimitIntervalSec default) waits twice as long as the last time, up to
# WORKER_RESTART_DELAY_MAX_S, so a worker that cannot start does not spin.
WORKER_RESTART_DELAY_S = 0.1
WORKER_STABLE_S = 10.0
WORKER_RESTART_DELAY_MAX_S = 30.0
# At shutdown, the workers get this long to end their sessions and exit before
# they are killed (their sessions are then closed here): below the 10 s that
# systemd's and the tests' stop wait before SIGKILL.
WORKER_STOP_TIMEOUT_S = 5.0
# A dead worker's process is reaped within this, else killed.
WORKER_EXIT_TIMEOUT_S = 5.0
# What a scrape, relay status or relay sessions waits for a worker's answer
# before using its last figures; a loaded worker answers in milliseconds.
WORKER_ANSWER_TIMEOUT_S = 2.0
# The workers' figures are fetched this often besides every scrape, so that a
# worker's counts since are all a death loses and the directory's heartbeat
# reports traffic at most this old.
STATS_REFRESH_S = 10.0


class Stats:
    """Counters of the relay's sessions, exported as metrics (the workers'
    are theirs). Each is kept up to date where it changes, so a scrape costs
    the same with 1 or 4096 sessions."""

    def __init__(self) -> None:
        self.sessions_total: Counter[str] = Counter()  # by protocol
        self.sessions_active: Counter[str] = Counter()  # by protocol


@dataclass(eq=False)
class WorkerSlot:
    """Worker ``index``: its process and control socket (new ones after a
    restart), its sessions, and what the abuse defences and the steering count
    for it, so that its death undoes exactly that."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    peer: Peer | None = None
    ready: asyncio.Future[None] | None = None
    started: float = 0.0  # monotonic
    restarts: int = 0
    delay: float = WORKER_RESTART_DELAY_S
    # Open sessions by ID, each with its traffic as last reported.
    sessions: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # Connections admitted and not yet a session (or a second channel's
    # handshakes), and sessions the abuse defences count, by IP as the worker
    # names it.
    handshakes: Counter[str] = dataclasses.field(default_factory=Counter)
    held: Counter[str] = dataclasses.field(default_factory=Counter)
    connections: int = 0  # admitted and not yet ended: what balancing counts
    steers: set[tuple[str, tuple[str, int]]] = dataclasses.field(default_factory=set)
    stats: dict[str, Any] | None = None  # the last answer to "stats"
    reaping: asyncio.Future[None] | None = None

    @property
    def alive(self) -> bool:
        return self.peer is not None and self.peer.alive

    @property
    def serving(self) -> bool:
        """Its worker said it serves, and is still there."""
        return self.alive and self.ready is not None and self.ready.done() \
            and self.ready.exception() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


def _less(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _exit_text(returncode: int | None) -> str:
    if returncode is None:
        return "closed its control socket"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


MetricAcc = dict[str, tuple[str, str, dict[tuple[tuple[str, str], ...], float]]]


def _accumulate(acc: MetricAcc, metrics: list[list[Any]], kinds: tuple[str, ...]) -> None:
    """Add a worker's metrics (relay.serve.wire's form) of ``kinds`` into ``acc``."""
    for name, kind, help_text, samples in metrics:
        if kind not in kinds:
            continue
        sums = acc.setdefault(name, (kind, help_text, {}))[2]
        for labels, value in samples:
            key = tuple(sorted(labels.items()))
            sums[key] = sums.get(key, 0.0) + value


class Relay:
    """The control plane."""

    def __init__(self, cfg: Config, load_config: Callable[[], Config] | None = None) -> None:
        self.load_config = load_config
        self.data_dir = cfg.data_dir
        self.started = time.time()
        self.hostname = socket.gethostname()
        self._apply(cfg)
        self.stats = Stats()
        self.background: set[asyncio.Future[None]] = set()
        self.stopping = False
        self.tap: Tap | None = None
        self.steering: Steering | None = None
        self.nat: RelayTable | None = None
        self.sockets: dict[str, list[socket.socket]] = {}  # by service, in worker order
        self.slots: list[WorkerSlot] = []
        self.owner: dict[str, WorkerSlot] = {}  # by session ID
        self.steered: dict[tuple[str, tuple[str, int]], tuple[WorkerSlot, int]] = {}
        self.floated: dict[str, tuple[str, int]] = {}  # OpenVPN sessions' steered address
        self.least = steer.HASH  # the worker new TCP connections go to
        self.logins: dict[str, tuple[float, dict[str, Any]]] = {}  # cookie -> expiry, client
        # Counters of workers that died, so that the sums never go backwards.
        self.retired: MetricAcc = {}
        self.openvpn_cookie_key = new_cookie_key()
        self.connlog: daylog.ConnectionLog | None = None
        self.control: asyncio.AbstractServer | None = None
        self.metrics: MetricsServer | None = None
        self.recording: Recording | None = None
        self.shipping: Shipping | None = None
        self.registration: Registration | None = None
        # Extra metric collectors of optional components (capture, shipping).
        self.collectors: list[Collector] = []
        # Components that take new settings on reload (the packet-log retention).
        self.reload_hooks: list[Callable[[Config], None]] = []

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        daylog.ensure_dir(self.data_dir)
        self.connlog = daylog.ConnectionLog(self.data_dir)
        self.journal = Journal(self.data_dir)
        self.abuse = Abuse(self.cfg.abuse, self.data_dir, self.audit, time.time)
        self._close_leftover_sessions()
        pool = AddressPool(self.cfg.pool)
        self.sessions = SessionTable(pool, tags_in_log(self.data_dir))
        workers = self.cfg.worker_count
        try:
            self.tap = await Tap.create(self.cfg.tap.name, pool.gateway, self.cfg.tap.mtu,
                                        queues=workers)
            self.steering = Steering()
            self.steering.attach_tap(self.tap.queues[0])
            # The egress policy is in force whenever the relay serves, NAT or not.
            self.nat = RelayTable(Policy.from_config(self.cfg), self.cfg.server.uplink)
            self.nat.install()
            self.collectors.append(self.nat.metrics)
            self.shipping = Shipping(self.cfg, self.audit)
            self.shipping.start()
            self.collectors.append(self.shipping.metrics)
            self.recording = Recording(self.cfg, self.tap.name, self.audit)
            await self.recording.start()
            self.collectors.append(self.recording.metrics)
            self.reload_hooks.append(self.recording.reload)
            cert_path = self._listen(workers)
            self.slots = [WorkerSlot(i) for i in range(workers)]
            await asyncio.gather(*(self._start_worker(slot) for slot in self.slots))
            host, port = self.cfg.listen_addr
            log.info("listening on %s (OpenVPN, TCP and UDP)", self.cfg.openvpn.listen)
            log.info("listening on %s:%d (TLS, CSTP%s), TAP %s gateway %s, %d worker%s, data "
                     "in %s, certificate %s", host, port, "; UDP, DTLS" if "dtls" in self.sockets
                     else "", self.tap.name, pool.gateway, workers, "s" * (workers != 1),
                     self.data_dir, cert_path)
            self.control = await control.serve_control(self.data_dir, self._control)
            if self.cfg.directory.url:  # listed only once every listener is up
                self.registration = Registration(self.cfg, self._directory_state)
                self.collectors.append(self.registration.metrics)
                self.reload_hooks.append(self.registration.reload)
            self.metrics = MetricsServer([self._metrics, *self.collectors], self.refresh_stats)
            await self._start_metrics()
            tasks = [self.spawn(self._abuse_loop()), self.spawn(self._stats_loop()),
                     self.spawn(self.nat.refresh_loop())]
            if self.registration is not None:
                tasks.append(self.spawn(self.registration.run(stop)))
            await stop.wait()
            for task in tasks:
                task.cancel()
        finally:
            await self._shutdown()

    def _listen(self, workers: int) -> Path:
        """Every worker's sockets, made here so that a worker's stay in their
        SO_REUSEPORT group when it dies (relay.serve.steer), and the TLS material
        the workers read. The certificate's path."""
        _, cert_path = server_context(self.data_dir, self.cfg.server.cert, self.cfg.server.key)
        if self.cfg.openvpn.tls_crypt:
            tls_crypt_key(self.data_dir)
        assert self.steering is not None
        host, port = self.cfg.listen_addr
        self.sockets["cstp"] = steer.tcp_group(host, port, workers)
        self.steering.attach_tcp(self.sockets["cstp"][0])
        if self.cfg.server.dtls:  # DTLS on UDP, the TLS listener's port number
            self.sockets["dtls"] = steer.udp_group(
                host, self.sockets["cstp"][0].getsockname()[1], workers, "DTLS: ")
            self.steering.attach_udp(steer.DTLS, self.sockets["dtls"][0])
        ohost, oport = parse_hostport(self.cfg.openvpn.listen)
        self.sockets["openvpn_tcp"] = steer.tcp_group(ohost, oport, workers, "[openvpn] listen: ")
        self.steering.attach_tcp(self.sockets["openvpn_tcp"][0])
        self.sockets["openvpn_udp"] = steer.udp_group(ohost, oport, workers, "[openvpn] listen: ")
        self.steering.attach_udp(steer.OPENVPN, self.sockets["openvpn_udp"][0])
        return cert_path

    def spawn(self, coro: Awaitable[None]) -> asyncio.Future[None]:
        """Run a task that the relay keeps a reference to until it ends. An
        exception it ends with is logged (one line), so no loop dies unseen."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Future[None]) -> None:
        self.background.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        log.debug("task failed", exc_info=exc)
        log.error("internal error: %s: %s", type(exc).__name__, exc)

    async def _abuse_loop(self) -> None:
        interval = self.cfg.abuse.seconds("summary_interval")
        while True:
            await asyncio.sleep(interval)
            self.abuse.expire()
            summary = self.abuse.summarise()
            if summary is not None:
                self.audit(summary)
            now = time.monotonic()
            for cookie in [c for c, (until, _) in self.logins.items() if until < now]:
                del self.logins[cookie]

    def audit(self, record: dict[str, Any]) -> dict[str, Any]:
        """An audit record in the connection log (shipped like the others), as logged."""
        assert self.connlog is not None
        logged = self.connlog.append(
            {**record, "server": {"id": self.cfg.server.id, "hostname": self.hostname}})
        if record["action"] == "ban":
            log.warning("banned %s until %s: %s", record["network"],
                        rfc3339_ms(record["until"]), record["reason"])
            for slot in self.slots:  # each ends the connections the ban covers
                if slot.peer is not None:
                    slot.peer.send("ban", network=record["network"], reason=record["reason"])
        elif record["action"] == "unban":
            log.info("unbanned %s: %s", record["network"], record["reason"])
        return logged

    # -- the workers ----------------------------------------------------------------

    async def _start_worker(self, slot: WorkerSlot) -> None:
        """Start worker ``slot.index`` and wait until it serves; RelayError when it
        dies first (at the relay's start, that ends the start)."""
        assert self.tap is not None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        i = slot.index
        fds = {"tap": self.tap.queues[i],
               **{name: socks[i].fileno() for name, socks in self.sockets.items()}}
        fds.setdefault("dtls", None)
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", WORKER_BOOT, str(child.fileno()), str(i)],
                stdin=subprocess.DEVNULL,
                pass_fds=[child.fileno(), *(fd for fd in fds.values() if fd is not None)])
        except OSError as exc:
            parent.close()
            raise RelayError(f"cannot start worker {i}: {exc.strerror}") from None
        finally:
            child.close()
        slot.process, slot.started = process, time.monotonic()
        peer = await self.connect_worker(slot, parent)
        peer.send("hello", version=wire.VERSION, worker=i, workers=len(self.slots),
                  config=dataclasses.asdict(self.cfg), users=self.users,
                  tap={"name": self.tap.name, "mac": self.tap.mac}, fds=fds,
                  openvpn_cookie_key=self.openvpn_cookie_key)
        assert slot.ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(slot.ready), WORKER_START_TIMEOUT_S)
        except TimeoutError:
            process.kill()  # its end is reaped as any other
            raise RelayError(f"worker {i} (pid {process.pid}) did not start within "
                             f"{WORKER_START_TIMEOUT_S:g} s") from None

    async def connect_worker(self, slot: WorkerSlot, sock: socket.socket) -> Peer:
        """``slot``'s control socket is ``sock``: the worker's messages are handled
        from now on."""
        slot.ready = asyncio.get_running_loop().create_future()
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ready": lambda m: self._on_ready(slot, m),
            "admit": lambda m: self._on_admit(slot, m),
            "handshake-done": lambda m: self._on_handshake_done(slot, m),
            "handshake-over": lambda m: self._on_handshake_over(slot, m),
            "link-ended": lambda m: self._on_link_ended(slot, m),
            "release": lambda m: self._release(slot, m["service"], tuple(m["peer"])),
            "open": lambda m: self._on_open(slot, m),
            "close": lambda m: self._on_close(slot, m),
            "moved": lambda m: self._on_moved(slot, m),
            "checkpoint": lambda m: self._on_checkpoint(slot, m),
            "cookie-put": lambda m: self._on_cookie_put(m),
            "cookie-take": lambda m: self._on_cookie_take(m),
        }

        def lost(exc: Exception | None) -> None:
            if slot.peer is peer:
                slot.reaping = self.spawn(self._worker_lost(slot))

        peer = slot.peer = Peer(wire.CONTROL, handlers, lost)
        await peer.connect(sock)
        return peer

    def _on_ready(self, slot: WorkerSlot, msg: dict[str, Any]) -> None:
        if slot.ready is not None and not slot.ready.done():
            slot.ready.set_result(None)
        self._balance()
        if slot.restarts:
            log.info("worker %d serves again (pid %s)", slot.index, msg["pid"])

    async def _worker_lost(self, slot: WorkerSlot) -> None:
        """``slot``'s worker is gone (its control socket closed): its sessions are
        closed with its counters of their last checkpoint, what it held of the
        abuse defences and the steering is released, and it is started again."""
        process, slot.peer = slot.process, None
        returncode = None
        if process is not None:
            loop = asyncio.get_running_loop()
            try:
                returncode = await asyncio.wait_for(loop.run_in_executor(None, process.wait),
                                                    WORKER_EXIT_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                returncode = await loop.run_in_executor(None, process.wait)
        what = f"worker {slot.index} (pid {slot.pid}) {_exit_text(returncode)}"
        if slot.ready is not None and not slot.ready.done():
            slot.ready.set_exception(RelayError(f"{what} before it served"))
            slot.ready.exception()  # retrieved: the start that awaits it may be gone
        if self.stopping and returncode == 0 and not slot.sessions:
            return
        if slot.sessions or not self.stopping:
            log.error("%s; %d session(s) closed%s", what, len(slot.sessions),
                      "" if self.stopping else "; starting it again")
        reason, error = ("relay-shutdown", f"{what} before closing it") if self.stopping else \
            (WORKER_LOST, f"{what}; counters are from the session's last checkpoint")
        for sid in list(slot.sessions):
            self._end_session(self.sessions.by_id[sid], reason, error, None, AS_CONNECTED)
        for ip, n in slot.handshakes.items():
            self.abuse.forget(ip, handshakes=n, sessions=0)
        for ip, n in slot.held.items():
            self.abuse.forget(ip, handshakes=0, sessions=n)
        slot.handshakes.clear()
        slot.held.clear()
        slot.connections = 0
        self._balance()
        for service, peer in list(slot.steers):
            self._unsteer(service, peer)
        if slot.stats is not None:  # its counts stay in the sums
            _accumulate(self.retired, slot.stats["metrics"], ("counter",))
            slot.stats = None
        if self.stopping:
            return
        stable = time.monotonic() - slot.started >= WORKER_STABLE_S
        slot.delay = WORKER_RESTART_DELAY_S if stable else \
            min(2 * slot.delay, WORKER_RESTART_DELAY_MAX_S)
        await asyncio.sleep(slot.delay)
        if self.stopping:
            return
        slot.restarts += 1
        try:
            await self._start_worker(slot)
        except RelayError as exc:
            log.error("%s", exc)  # its end brings the next attempt

    async def refresh_stats(self) -> None:
        """Every live worker's figures (relay.serve.wire's stats), at once."""
        async def one(slot: WorkerSlot) -> None:
            assert slot.peer is not None
            with contextlib.suppress(PeerLost, RemoteError, TimeoutError):
                slot.stats = await slot.peer.request("stats", WORKER_ANSWER_TIMEOUT_S)

        await asyncio.gather(*(one(slot) for slot in self.slots if slot.alive))

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(STATS_REFRESH_S)
            await self.refresh_stats()

    # -- the workers' messages: admission and the abuse accounting ------------------

    def _on_admit(self, slot: WorkerSlot, msg: dict[str, Any]) -> dict[str, Any]:
        ip = msg["ip"]
        refused = self.abuse.admit(ip, new_session=msg["new_session"])
        if refused is None:
            slot.handshakes[ip] += 1
            if msg["new_session"]:
                slot.connections += 1
                self._balance()
            if msg["steer"] is not None:
                service, peer = msg["steer"]
                self._steer(slot, service, (peer[0], peer[1]))
        return {"refused": refused}

    def _balance(self) -> None:
        """New TCP connections go to the serving worker with the fewest (the
        first of equals): a map update only when that changes."""
        serving = [s for s in self.slots if s.serving]
        least = min(serving, key=lambda s: (s.connections, s.index)).index if serving \
            else steer.HASH
        if least != self.least and self.steering is not None:
            self.steering.set_least(least)
        self.least = least

    def _on_handshake_done(self, slot: WorkerSlot, msg: dict[str, Any]) -> None:
        self.abuse.handshake_done(msg["ip"])
        _less(slot.handshakes, msg["ip"])
        slot.held[msg["ip"]] += 1

    def _on_handshake_over(self, slot: WorkerSlot, msg: dict[str, Any]) -> None:
        self.abuse.handshake_over(msg["ip"], msg["strike"])
        _less(slot.handshakes, msg["ip"])

    def _on_link_ended(self, slot: WorkerSlot, msg: dict[str, Any]) -> None:
        self.abuse.connection_closed(msg["ip"], msg["lifetime_s"], msg["had_session"])
        _less(slot.held if msg["had_session"] else slot.handshakes, msg["ip"])
        slot.connections -= 1
        self._balance()

    def _steer(self, slot: WorkerSlot, service: str, peer: tuple[str, int]) -> None:
        """``peer``'s datagrams to ``service`` go to ``slot``'s worker (counted:
        as many releases undo it; a newer owner takes the address over)."""
        key = (service, peer)
        held = self.steered.get(key)
        if held is not None and held[0] is slot:
            self.steered[key] = (slot, held[1] + 1)
            return
        if held is not None:
            held[0].steers.discard(key)
        if self.steering is not None:
            self.steering.set_peer(service, peer, slot.index)
        self.steered[key] = (slot, 1)
        slot.steers.add(key)

    def _release(self, slot: WorkerSlot, service: str, peer: tuple[str, int]) -> None:
        held = self.steered.get((service, peer))
        if held is None or held[0] is not slot:
            return
        if held[1] > 1:
            self.steered[(service, peer)] = (slot, held[1] - 1)
        else:
            self._unsteer(service, peer)

    def _unsteer(self, service: str, peer: tuple[str, int]) -> None:
        held = self.steered.pop((service, peer), None)
        if held is not None:
            held[0].steers.discard((service, peer))
        if self.steering is not None:
            self.steering.drop_peer(service, peer)

    # -- the workers' messages: sessions ----------------------------------------------

    def refuse_reason(self, ip: str) -> str | None:
        """Why a new session from ``ip`` must be refused now (no disk left to log
        it, ``[server] max_sessions`` reached, no free address), for the client;
        None to go ahead. A refusal is counted (``relay_refusals_total``) and
        summarised into the audit log per source, as the abuse refusals are."""
        why = self.recording.refuse_reason() if self.recording is not None else None
        if why is not None:
            reason = "disk-full"
        elif len(self.sessions) >= self.cfg.server.max_sessions:
            reason, why = "max-sessions", "the relay is full; try again later or another relay"
        elif not self.sessions.pool.available():
            reason, why = "pool-exhausted", (f"no free address in {self.sessions.pool.network}; "
                                             "try again later or another relay")
        else:
            return None
        self.abuse.refuse(ip, reason)
        return why

    async def _on_open(self, slot: WorkerSlot, msg: dict[str, Any]) -> dict[str, Any]:
        """A new session for a worker's client: address, MAC, steering, neighbour
        entry, connect record. Refused (with the client's message) when
        :meth:`refuse_reason` says so; any other failure leaves nothing behind
        (no address, no attribution) and is the worker's error reply."""
        assert self.tap is not None and self.connlog is not None
        peer_ip, peer_port = msg["peer"]
        refusal = self.refuse_reason(peer_ip)
        if refusal is not None:
            return {"refused": refusal, "session": None, "lease": None}
        # Records name the client as searches and bans do: a dual-stack listener's
        # ::ffff:a.b.c.d is a.b.c.d (the worker keeps the raw form to send to).
        client_ip = canonical_ip(peer_ip)
        protocol = msg["protocol"]
        s = self.sessions.open(client_ip, peer_port, protocol, msg["mac"])
        try:
            # Before the client may send: its packets must be attributed, and
            # replies to it must find its MAC and its worker's queue.
            if self.steering is not None:
                self.steering.set_mac(s.mac, slot.index)
            if self.recording is not None:
                self.recording.add_session(s.mac, s.id, client_ip, peer_port)
            await self.tap.add_neighbour(s.virtual_ip, s.mac)
        except BaseException:
            self._forget_mac(s.mac)
            self.sessions.close(s)
            self.spawn(self._forget_address(s.virtual_ip))
            raise
        s.connect_record = self.connlog.append(connect_record(
            s, server_id=self.cfg.server.id, server_ip=canonical_ip(msg["local_ip"]),
            server_hostname=self.hostname, client_hostname=msg["hostname"],
            software=msg["software"], data_channel=msg["data_channel"]))
        self.journal.write(s)
        slot.sessions[s.id] = s.traffic()
        self.owner[s.id] = slot
        self.stats.sessions_total[protocol] += 1
        self.stats.sessions_active[protocol] += 1
        log.info("session %s open: %s:%d as %s (%s, worker %d)", s.id, client_ip, peer_port,
                 s.virtual_ip, s.connect_record["client_software"]["name"], slot.index)
        pool = self.sessions.pool
        return {"refused": None,
                "session": {"id": s.id, "mac": s.mac, "virtual_ip": s.virtual_ip,
                            "client_ip": s.client_ip, "client_port": s.client_port},
                "lease": {"netmask": str(pool.network.netmask), "gateway": str(pool.gateway.ip),
                          "mtu": self.cfg.tap.mtu, "dns": list(self.cfg.tap.dns)}}

    def _owned(self, slot: WorkerSlot, sid: str) -> Session | None:
        """Session ``sid`` if ``slot``'s worker holds it."""
        return self.sessions.by_id.get(sid) if self.owner.get(sid) is slot else None

    def _on_close(self, slot: WorkerSlot, msg: dict[str, Any]) -> None:
        s = self._owned(slot, msg["session_id"])
        if s is not None:
            # The reason may carry the client's own words (a CSTP disconnect reason).
            self._end_session(s, clean(msg["reason"]) or "unknown", msg["error"],
                              msg["counters"], msg["hostname"])

    def _end_session(self, s: Session, reason: str, error: str | None,
                     traffic: dict[str, Any] | None, hostname: Any) -> None:
        """The session's disconnect record, with ``traffic`` (else the last
        checkpoint's); its MAC, steering and address are freed."""
        assert self.connlog is not None
        slot = self.owner.pop(s.id)
        last = slot.sessions.pop(s.id)
        self._forget_mac(s.mac)
        floated = self.floated.pop(s.id, None)
        if floated is not None:
            self._release(slot, steer.OPENVPN, floated)
        self.connlog.append(disconnect_record(
            s.connect_record, s.counters(traffic if traffic is not None else last),
            end_time=time.time(), reason=reason, error=error, client_hostname=hostname))
        self.journal.remove(s)
        self.sessions.close(s)
        self.stats.sessions_active[s.protocol] -= 1
        log.info("session %s closed: %s%s", s.id, reason, f" ({error})" if error else "")
        self.spawn(self._forget_address(s.virtual_ip))

    def _forget_mac(self, mac: bytes) -> None:
        if self.steering is not None:
            self.steering.drop_mac(mac)
        if self.recording is not None:
            self.recording.remove_session(mac)

    async def _forget_address(self, ip: str) -> None:
        assert self.tap is not None
        if self.tap.queues:
            await self.tap.remove_neighbour(ip)
        self.sessions.pool.release(ip)

    def _on_moved(self, slot: WorkerSlot, msg: dict[str, Any]) -> None:
        """A session's client sends from a new address (an OpenVPN float): the
        session's address, the capture's attribution, the abuse accounting and
        the steering of its datagrams follow, and an audit record says so."""
        s = self._owned(slot, msg["session_id"])
        if s is None:
            return
        (ip, port), (old_ip, old_port) = msg["peer"], msg["old"]
        client_ip = canonical_ip(ip)
        self.abuse.moved(old_ip, ip)
        _less(slot.held, old_ip)
        slot.held[ip] += 1
        if self.recording is not None:  # the packets from now on carry the new address
            self.recording.add_session(s.mac, s.id, client_ip, port)
        previous = self.floated.get(s.id)
        self._steer(slot, steer.OPENVPN, (ip, port))
        self.floated[s.id] = (ip, port)
        if previous is not None:
            self._release(slot, steer.OPENVPN, previous)
        logged = self.audit({"action": "client-float", "session_id": s.id,
                             "from": {"ip": s.client_ip, "port": s.client_port},
                             "to": {"ip": client_ip, "port": port}})
        s.moved(client_ip, port, logged["time"])
        self.journal.write(s, slot.sessions[s.id])
        log.info("session %s: client moved from %s:%d to %s:%d", s.id, old_ip, old_port,
                 client_ip, port)
        banned = self.abuse.banned(ip)
        if banned is not None:  # as a ban ends the sessions it covers
            self.spawn(self._end_by_worker(s.id, "banned", f"source banned: {banned.reason}"))

    def _on_checkpoint(self, slot: WorkerSlot, msg: dict[str, Any]) -> None:
        for sid, traffic in msg["sessions"]:
            s = self._owned(slot, sid)
            if s is not None:
                slot.sessions[sid] = traffic
                self.journal.write(s, traffic)

    def _on_cookie_put(self, msg: dict[str, Any]) -> None:
        self.logins[msg["cookie"]] = (time.monotonic() + LOGIN_TTL_S, msg["client"])

    def _on_cookie_take(self, msg: dict[str, Any]) -> dict[str, Any]:
        until, client = self.logins.pop(msg["cookie"], (0.0, None))
        return {"client": client if until >= time.monotonic() else None}

    async def _end_by_worker(self, sid: str, reason: str, message: str) -> bool:
        """Have the worker holding session ``sid`` end it (it sends the close)."""
        slot = self.owner.get(sid)
        if slot is None or slot.peer is None:
            return False
        try:
            reply = await slot.peer.request("disconnect", WORKER_ANSWER_TIMEOUT_S,
                                            session_id=sid, reason=reason, message=message)
        except (PeerLost, TimeoutError):
            return False
        return bool(reply["ended"])

    # -- the control socket -----------------------------------------------------------

    async def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "reload":
            return {"ok": True, "message": await self.reload()}
        if cmd == "ban-list":
            self.abuse.expire()
            return {"ok": True, "bans": [vars(b) for b in self.abuse.bans.values()]}
        if cmd == "ban-show":
            bans = self.abuse.bans.all_covering(canonical_address(str(req.get("target"))),
                                                self.abuse.clock())
            return {"ok": True, "bans": [vars(b) for b in bans]}
        if cmd == "ban-add":
            network = parse_network(str(req.get("target")))
            before = self.abuse.bans.by_network.get(network)
            ban = self.abuse.add_ban(network, float(req.get("duration_s", 0)),
                                     str(req.get("reason") or "added by operator"),
                                     by="operator", force=bool(req.get("force")))
            return {"ok": True, "ban": vars(ban), "kept": ban is before}
        if cmd == "ban-remove":
            return {"ok": True, "removed": self.abuse.remove_ban(str(req.get("target")))}
        if cmd == "sessions":
            return {"ok": True, "sessions": await self._session_views()}
        if cmd == "session-disconnect":
            return {"ok": True, "disconnected": await self._disconnect(req)}
        if cmd == "status":
            await self.refresh_stats()
            return {"ok": True, "status": self._status()}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    async def _live_sessions(self) -> dict[str, tuple[Any, dict[str, Any]]]:
        """Each open session's reverse lookup and traffic now, from its worker
        (a worker that does not answer: none, and the last checkpoint's)."""
        async def pages(slot: WorkerSlot) -> None:
            assert slot.peer is not None
            after = None
            while True:
                reply = await slot.peer.request("sessions", WORKER_ANSWER_TIMEOUT_S, after=after)
                for sid, hostname, traffic in reply["sessions"]:
                    live[sid] = (hostname, traffic)
                    after = sid
                if not reply["more"]:
                    return

        live: dict[str, tuple[Any, dict[str, Any]]] = {}
        for result in await asyncio.gather(*(pages(s) for s in self.slots if s.alive),
                                           return_exceptions=True):
            if isinstance(result, BaseException) and \
                    not isinstance(result, (PeerLost, RemoteError, TimeoutError)):
                raise result
        return live

    async def _session_views(self) -> list[dict[str, Any]]:
        """The open sessions for ``relay sessions``: each one's connect record (the
        reverse lookup's answer so far in it), counters and worker."""
        live = await self._live_sessions()
        views = []
        for sid, s in self.sessions.by_id.items():
            slot = self.owner.get(sid)
            if slot is None:  # between its address and its connect record
                continue
            connect = dict(s.connect_record)
            hostname, traffic = live.get(sid, (None, slot.sessions[sid]))
            if sid in live and isinstance(connect.get("client"), dict):
                connect["client"] = {**connect["client"], "hostname": hostname}
            views.append({"connect": connect, "counters": s.counters(traffic),
                          "worker": slot.index})
        return views

    async def _disconnect(self, req: dict[str, Any]) -> list[str]:
        """End the sessions an operator named (a session ID, or every session of a
        client address); their disconnect records give ``operator-disconnect`` and
        the operator's words. The IDs of the sessions ended."""
        sid, client_ip = req.get("session"), req.get("client_ip")
        chosen = [s.id for s in self.sessions.by_id.values()
                  if (isinstance(sid, str) and s.id == sid)
                  or (isinstance(client_ip, str) and s.client_ip == client_ip)]
        words = clean(str(req.get("reason") or ""))
        reason = f"{OPERATOR_DISCONNECT}: {words}" if words else OPERATOR_DISCONNECT
        message = "disconnected by the relay's operator" + (f": {words}" if words else "")
        ended = await asyncio.gather(*(self._end_by_worker(s, reason, message)
                                       for s in chosen))
        return [s for s, done in zip(chosen, ended, strict=True) if done]

    def _status(self) -> dict[str, Any]:
        """``relay status``: read off the same samples a metrics scrape returns,
        so the two always agree."""
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for collect in (self._metrics, *self.collectors):
            for m in collect():
                for labels, value in m.samples:
                    samples.setdefault(m.name, {})[tuple(sorted(labels.items()))] = value

        def one(name: str) -> float | None:
            return samples.get(name, {}).get(())

        def per_worker(name: str, i: int) -> float | None:
            return samples.get(name, {}).get((("worker", str(i)),))

        active = {dict(k)["protocol"]: int(v)
                  for k, v in samples.get("relay_sessions_active", {}).items()}
        shipping = None
        if "relay_ship_backlog_records" in samples:
            last = one("relay_ship_last_success_timestamp_seconds")
            shipping = {"collector": self.cfg.forward.collector,
                        "backlog_records": int(one("relay_ship_backlog_records") or 0),
                        "backlog_bytes": int(one("relay_ship_backlog_bytes") or 0),
                        "last_success": rfc3339_ms(last) if last else None,
                        "consecutive_failures": int(one("relay_ship_consecutive_failures")
                                                    or 0)}
        capture = None
        if "relay_capture_attached" in samples:
            capture = {"attached": one("relay_capture_attached") == 1,
                       "ring_fill_ratio": one("relay_capture_ring_fill_ratio"),
                       "records": int(one("relay_capture_records_total") or 0),
                       "drops": int(sum(samples.get("relay_capture_drops_total", {}).values()))}
        workers = [{"worker": slot.index, "pid": slot.pid if slot.alive else None,
                    "up": per_worker("relay_worker_up", slot.index) == 1,
                    "sessions": int(per_worker("relay_worker_sessions", slot.index) or 0),
                    "restarts": int(per_worker("relay_worker_restarts_total", slot.index) or 0)}
                   for slot in self.slots]
        return {
            "running": True, "pid": os.getpid(), "server_id": self.cfg.server.id,
            "data_dir": str(self.data_dir), "started": rfc3339_ms(self.started),
            "uptime_s": round(time.time() - self.started, 3),
            "workers": workers,
            "sessions": {"active": sum(active.values()), "by_protocol": active,
                         "total": int(sum(samples.get("relay_sessions_total", {}).values()))},
            "capture": capture,
            "packet_log": {"bytes": int(one("relay_packetlog_bytes") or 0),
                           "files": int(one("relay_packetlog_segments") or 0)}
            if "relay_packetlog_bytes" in samples else None,
            "shipping": shipping,
            "bans": int(one("relay_bans_active") or 0),
            "free_disk_bytes": int(one("relay_data_dir_free_bytes") or 0),
        }

    # -- configuration --------------------------------------------------------------

    def _apply(self, cfg: Config) -> None:
        """Take the values that can change while running."""
        self.cfg = cfg
        self.users = _load_users(cfg.server.users)
        # The caps may have grown (a reload): so may the descriptors they need
        # (the workers inherit the limit at their next start).
        nofile_problem = raise_nofile(nofile_needed(cfg))
        if nofile_problem is not None:
            log.warning("%s", nofile_problem)

    async def reload(self) -> str:
        """Re-read the config; a bad one is refused and the old one stays in force.
        The workers take the new one too."""
        if self.load_config is None:
            raise RelayError("this relay was started without a config source to reload")
        try:
            new = self.load_config()
            _load_users(new.server.users)
        except RelayError as exc:
            log.error("reload refused, the running config stays in force: %s", exc)
            raise RelayError(f"reload refused, the running config stays in force: {exc}") \
                from None
        fixed = [key for key, old, now in (
            ("[server] listen", self.cfg.server.listen, new.server.listen),
            ("[server] dtls", self.cfg.server.dtls, new.server.dtls),
            ("[server] uplink", self.cfg.server.uplink, new.server.uplink),
            ("[server] cert/key", (self.cfg.server.cert, self.cfg.server.key),
             (new.server.cert, new.server.key)),
            ("[server] workers", self.cfg.server.workers, new.server.workers),
            ("[tap]", self.cfg.tap, new.tap),
            ("[logs] data_dir", self.cfg.logs.data_dir, new.logs.data_dir),
            ("[openvpn]", self.cfg.openvpn, new.openvpn),
            # Live connections are counted under their key: it must not change.
            ("[abuse] ipv6_prefix", self.cfg.abuse.ipv6_prefix, new.abuse.ipv6_prefix),
        ) if old != now]
        if fixed:
            # Keep the running values of keys that need a restart, take the rest.
            new = replace(new, server=replace(new.server, listen=self.cfg.server.listen,
                                              dtls=self.cfg.server.dtls,
                                              uplink=self.cfg.server.uplink,
                                              cert=self.cfg.server.cert, key=self.cfg.server.key,
                                              workers=self.cfg.server.workers),
                          tap=self.cfg.tap, logs=replace(new.logs, data_dir=self.cfg.logs.data_dir),
                          openvpn=self.cfg.openvpn,
                          abuse=replace(new.abuse, ipv6_prefix=self.cfg.abuse.ipv6_prefix))
        if self.nat is not None and new.egress != self.cfg.egress:
            try:  # first: if the kernel refuses the rules, nothing else changes
                await asyncio.get_running_loop().run_in_executor(
                    None, self.nat.replace, Policy.from_config(new))
            except RelayError as exc:
                log.error("reload refused, the running config stays in force: %s", exc)
                raise RelayError(f"reload refused, the running config stays in force: {exc}") \
                    from None
        old_metrics = self.cfg.metrics.listen
        self._apply(new)
        self.abuse.cfg = new.abuse
        for slot in self.slots:
            if slot.peer is not None:
                slot.peer.send("config", config=dataclasses.asdict(new), users=self.users)
        for hook in self.reload_hooks:
            hook(new)
        if self.shipping is not None:
            await self.shipping.reload(new)
        if new.metrics.listen != old_metrics and self.metrics is not None:
            self.metrics.close()
            await self._start_metrics()
        message = "config reloaded"
        if fixed:
            message += f"; {', '.join(fixed)} changed but need a restart (kept as running)"
        log.info("%s", message)
        self.audit({"action": "config-reload", "message": message})
        return message

    # -- metrics ----------------------------------------------------------------------

    def _directory_state(self) -> dict[str, int]:
        """What a heartbeat reports of the relay's life (relay.serve.registration)."""
        st = self.stats
        acc = self._worker_sums()
        traffic = sum(acc.get("relay_bytes_total", ("", "", {}))[2].values())
        return {"sessions_active": sum(st.sessions_active.values()),
                "sessions_total": sum(st.sessions_total.values()),
                "traffic_bytes": int(traffic)}

    async def _start_metrics(self) -> None:
        if not self.cfg.metrics.listen:
            return
        host, port = parse_hostport(self.cfg.metrics.listen)
        assert self.metrics is not None
        try:
            await self.metrics.start(host, port)
        except OSError as exc:
            raise RelayError(f"[metrics] listen: cannot listen on {host}:{port}: "
                             f"{exc.strerror}") from None

    def _worker_sums(self) -> MetricAcc:
        """The workers' metrics summed: the live ones' last figures and the
        counters of those that died."""
        acc: MetricAcc = {name: (kind, help_text, dict(sums))
                          for name, (kind, help_text, sums) in self.retired.items()}
        for slot in self.slots:
            if slot.stats is not None:
                _accumulate(acc, slot.stats["metrics"], ("counter", "gauge"))
        return acc

    def _metrics(self) -> list[Metric]:
        st = self.stats
        free = shutil.disk_usage(self.data_dir).free
        out = [
            Metric("relay_sessions_active", "gauge", "Open sessions, by protocol."),
            Metric("relay_sessions_total", "counter", "Sessions opened, by protocol."),
            Metric("relay_refusals_total", "counter",
                   "Connections or sessions refused (abuse defences, a full relay), by reason."),
            # O(1): a ban leaves the index at the next expiry pass, at most
            # [abuse] summary_interval after its end.
            Metric("relay_bans_active", "gauge", "Bans in force.").add(len(self.abuse.bans)),
            Metric("relay_data_dir_free_bytes", "gauge",
                   "Free space in the data directory's file system.").add(free),
            Metric("relay_handshakes_in_progress", "gauge",
                   "Connections admitted and not yet a session ([abuse] handshakes_total "
                   "counts these).").add(self.abuse.handshakes),
        ]
        for protocol in sorted(st.sessions_total):
            out[0].add(st.sessions_active[protocol], protocol=protocol)
            out[1].add(st.sessions_total[protocol], protocol=protocol)
        for reason, n in sorted(self.abuse.refused_total.items()):
            out[2].add(n, reason=reason)
        for name, (kind, help_text, sums) in self._worker_sums().items():
            m = Metric(name, kind, help_text)
            for labels, value in sorted(sums.items()):
                m.add(value, **dict(labels))
            out.append(m)
        up = Metric("relay_worker_up", "gauge", "1 while worker N serves, by worker.")
        sessions = Metric("relay_worker_sessions", "gauge", "Open sessions of worker N.")
        restarts = Metric("relay_worker_restarts_total", "counter",
                          "Times worker N was started again after it died.")
        cpu = Metric("relay_worker_cpu_seconds_total", "counter",
                     "CPU time of worker N's current process (user and system).")
        rss = Metric("relay_worker_resident_bytes", "gauge",
                     "Resident memory of worker N's current process.")
        for slot in self.slots:
            w = str(slot.index)
            up.add(1.0 if slot.serving else 0.0, worker=w)
            sessions.add(len(slot.sessions), worker=w)
            restarts.add(slot.restarts, worker=w)
            if slot.stats is not None:
                cpu.add(slot.stats["cpu_s"], worker=w)
                rss.add(slot.stats["rss_bytes"], worker=w)
        return [*out, up, sessions, restarts, cpu, rss]

    # -- ending -----------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self.stopping = True
        if self.metrics is not None:
            self.metrics.close()
        if self.control is not None:
            self.control.close()
            (self.data_dir / control.SOCKET_NAME).unlink(missing_ok=True)
        await self._stop_workers()
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        if self.recording is not None:
            await self.recording.close()
        if self.tap is not None:
            self.tap.close()
        if self.steering is not None:
            self.steering.close()
        if self.nat is not None:
            self.nat.remove()
        if self.shipping is not None:
            # Last: the disconnect records above are in the log, and the forwarder
            # sends what it can before it stops (the rest goes after the restart).
            await self.shipping.close()
        if self.connlog is not None:
            self.connlog.close()
        log.info("stopped")

    async def _stop_workers(self) -> None:
        """Every worker ends its connections (their disconnect records come here)
        and exits; one that does not within WORKER_STOP_TIMEOUT_S is killed."""
        for slot in self.slots:
            if slot.peer is not None:
                slot.peer.send("stop")
        waits = [asyncio.shield(slot.peer.lost) for slot in self.slots if slot.peer is not None]
        if waits:
            _, late = await asyncio.wait(waits, timeout=WORKER_STOP_TIMEOUT_S)
            if late:
                log.error("%d worker(s) did not stop within %g s: killed", len(late),
                          WORKER_STOP_TIMEOUT_S)
                for slot in self.slots:
                    if slot.alive and slot.process is not None:
                        slot.process.kill()
        reaps = [slot.reaping for slot in self.slots if slot.reaping is not None]
        if reaps:
            await asyncio.wait(reaps)
        for slot in self.slots:  # a worker that never had a control socket
            if slot.process is not None and slot.process.poll() is None:
                slot.process.kill()
                await asyncio.get_running_loop().run_in_executor(None, slot.process.wait)

    def _close_leftover_sessions(self) -> None:
        assert self.connlog is not None
        for path, entry in self.journal.leftovers():
            if entry is None or not isinstance(entry.get("connect"), dict):
                log.error("session journal %s is unreadable; its session may lack a "
                          "disconnect record", path)
                path.unlink(missing_ok=True)
                continue
            connect = entry["connect"]
            self.connlog.append(disconnect_record(
                connect, entry, end_time=time.time(), reason="relay-restart",
                error="the relay stopped without closing this session (killed or crashed); "
                      "counters are from its last checkpoint and the end time is the restart"))
            path.unlink(missing_ok=True)
            log.warning("closed session %s left open by a previous run", connect.get("session_id"))


def _load_users(path: str) -> dict[str, str] | None:
    if not path:
        return None
    users: dict[str, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"[server] users: cannot read {path}: {exc.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, password = line.partition(":")
        if not sep or not name:
            raise ConfigError(f"[server] users: {path}:{n}: expected name:password")
        users[name] = password
    return users


def serve(load_config: Callable[[], Config]) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the config through ``load_config``."""
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        relay = Relay(load_config(), load_config)

        async def reload() -> None:
            with contextlib.suppress(RelayError):  # reload logged why it refused
                await relay.reload()

        def on_hup() -> None:
            relay.spawn(reload())

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        await relay.run(stop)

    uvloop.run(main())
