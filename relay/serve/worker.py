"""A datapath worker of ``relay serve``: one process per core.

The control plane (relay.serve.core) starts each as ``python -m
relay.serve.worker FD INDEX``: FD is its end of the control socket
(relay.serve.wire), and the control plane's ``hello`` names the other
descriptors it inherited: its queue of the TAP device and its sockets of the
CSTP, DTLS and OpenVPN listeners (relay.serve.steer). A worker accepts, runs TLS,
the protocol machines and the hot path of its own sessions, and asks the control
plane for what only one place may decide (:class:`WorkerHost`): admission,
sessions, login cookies. It writes nothing to the data directory.

SIGTERM, SIGINT or the control plane's ``stop`` end every connection (each
session's disconnect record goes to the control plane) and the worker exits. A
SIGHUP is the control plane's to act on: the worker ignores one sent to it and
takes the new config the control plane sends. When the control plane is gone,
the worker ends its connections and exits (the control plane's journal closes
their sessions at the next start).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import resource
import secrets
import signal
import socket
import struct
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from relay import config as configmod
from relay.clienttext import clean
from relay.metrics import Metric
from relay.netaddr import canonical_address
from relay.serve import wire
from relay.serve.cstp_link import CstpListener
from relay.serve.datapath import Datapath
from relay.serve.dtls_link import DtlsEndpoint
from relay.serve.link import Lease, Link, LinkSettings
from relay.serve.openvpn_link import OpenVPNListener
from relay.serve.rdns import ReverseLookups
from relay.serve.rpc import Peer
from relay.serve.sessions import CHECKPOINT_INTERVAL_S, Session, SessionRefused
from relay.serve.tap import Queue

log = logging.getLogger("relay")

# After accept() fails (out of descriptors), wait this long before trying again
# instead of spinning.
ACCEPT_ERROR_BACKOFF_S = 0.1
# SO_LINGER on, zero timeout: close() sends RST and frees the socket at once.
LINGER_RESET = struct.pack("ii", 1, 0)
# At shutdown, the clients' goodbyes (CSTP's DISCONNECT, OpenVPN's restart or exit
# message, TLS close_notify) get this long to leave before the worker exits: a
# local write, which takes microseconds unless a client's buffers are full.
GOODBYE_GRACE_S = 0.5
# ... and the control plane this long to take the worker's last messages (the
# sessions' ends), which it reads as they come.
LAST_MESSAGES_TIMEOUT_S = 5.0


class Stats:
    """The worker's counts of connections that failed, exported as metrics
    (the datapath's are in its Traffic)."""

    def __init__(self) -> None:
        self.handshake_failures: Counter[str] = Counter()  # by reason
        self.peer_closed: Counter[str] = Counter()  # peers over a cap, by the cap


def settings_of(cfg: configmod.Config) -> LinkSettings:
    return LinkSettings(
        login_timeout_s=configmod.parse_duration(cfg.server.login_timeout),
        handshake_timeout_s=configmod.parse_duration(cfg.server.handshake_timeout),
        dpd_s=configmod.parse_duration(cfg.server.dpd),
        keepalive_s=configmod.parse_duration(cfg.server.keepalive))


class WorkerHost:
    """What the worker offers its links (relay.serve.link.LinkHost): the links,
    tasks, reverse lookups and logins are here; admission, sessions and login
    cookies are the control plane's, asked over ``peer``."""

    def __init__(self, peer: Peer, datapath: Datapath, cfg: configmod.Config,
                 users: dict[str, str] | None) -> None:
        self.peer = peer
        self.datapath = datapath
        self.stats = Stats()
        self.all_links: set[Link] = set()
        self.lookups = ReverseLookups()
        self.background: set[asyncio.Future[None]] = set()
        self.sessions: dict[str, Session] = {}  # open, by ID
        self._checkpointed: dict[str, tuple[int, int]] = {}  # packets in and out, by ID
        self.apply(cfg, users)

    def apply(self, cfg: configmod.Config, users: dict[str, str] | None) -> None:
        """Take the values that can change while running (a reload)."""
        self.settings = settings_of(cfg)
        self.users = users

    # -- tasks --------------------------------------------------------------------

    def spawn(self, coro: Awaitable[None], link: Link | None = None) -> asyncio.Future[None]:
        """Run a task that the worker keeps a reference to until it ends. An
        exception it ends with is logged (one line) and ends ``link``, so no
        connection waits on a task that died and no loop dies unseen."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(lambda t: self._reap(t, link))
        return task

    def _reap(self, task: asyncio.Future[None], link: Link | None) -> None:
        self.background.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        text = f"{type(exc).__name__}: {exc}"
        log.debug("task failed", exc_info=exc)
        if link is None:
            log.error("internal error: %s", text)
            return
        log.error("dropped %s: internal error: %s", link, text)
        link.terminate("relay-error", "internal error in the relay")

    # -- admission and the abuse accounting (the control plane's) -----------------

    async def admit(self, ip: str) -> str | None:
        reply = await self.peer.request("admit", ip=ip, new_session=True, steer=None)
        return reply["refused"]

    def link_began(self, link: Link) -> asyncio.Future[Any] | None:
        self.all_links.add(link)
        return self.look_up(link)

    def look_up(self, link: Link) -> asyncio.Future[Any] | None:
        return self.lookups.start(link.peer_ip, link.peer_port)

    def link_ended(self, link: Link, lifetime_s: float, had_session: bool) -> None:
        self.all_links.discard(link)
        self.peer.send("link-ended", ip=link.peer_ip, lifetime_s=lifetime_s,
                       had_session=had_session)

    def handshake_done(self, link: Link) -> None:
        self.peer.send("handshake-done", ip=link.peer_ip)

    async def admit_handshake(self, peer: tuple[str, int]) -> str | None:
        reply = await self.peer.request("admit", ip=peer[0], new_session=False,
                                        steer=["dtls", list(peer)])
        return reply["refused"]

    def handshake_over(self, ip: str, strike: bool) -> None:
        self.peer.send("handshake-over", ip=ip, strike=strike)

    def release_peer(self, peer: tuple[str, int]) -> None:
        self.peer.send("release", service="dtls", peer=list(peer))

    def count_handshake_failure(self, reason: str) -> None:
        self.stats.handshake_failures[reason] += 1

    def count_peer_closed(self, cap: str) -> None:
        self.stats.peer_closed[cap] += 1

    # -- logins -------------------------------------------------------------------

    def check_login(self, link: Link, username: str, password: str) -> bool:
        """Anonymous (anything goes) unless [server] users names a user list.
        The passwords are compared as UTF-8 bytes, in constant time (any text)."""
        if self.users is None:
            return True
        expected = self.users.get(username)
        if expected is not None and secrets.compare_digest(
                expected.encode("utf-8", "surrogatepass"),
                password.encode("utf-8", "surrogatepass")):
            return True
        log.warning("login refused for %r from %s", clean(username), link)
        return False

    def keep_login(self, cookie: str, client: dict[str, Any]) -> None:
        self.peer.send("cookie-put", cookie=cookie, client=client)

    async def redeem_login(self, cookie: str) -> dict[str, Any] | None:
        reply = await self.peer.request("cookie-take", cookie=cookie)
        return reply["client"]

    # -- sessions -----------------------------------------------------------------

    async def open_session(self, link: Link, protocol: str, software: dict[str, Any],
                           mac: bytes | None = None, data_channel: str | None = None) -> Lease:
        reply = await self.peer.request(
            "open", protocol=protocol, peer=[link.peer_ip, link.peer_port],
            local_ip=link.local_ip, hostname=link.client_hostname(), software=software,
            mac=mac, data_channel=data_channel)
        if reply["refused"] is not None:
            raise SessionRefused(reply["refused"])
        given, lease = reply["session"], reply["lease"]
        s = Session(given["id"], given["mac"], given["virtual_ip"], given["client_ip"],
                    given["client_port"], protocol)
        self.sessions[s.id] = s
        self._checkpointed[s.id] = (0, 0)
        self.datapath.links[s.mac] = link
        return Lease(s, s.virtual_ip, lease["netmask"], lease["gateway"], lease["mtu"],
                     tuple(lease["dns"]))

    def close_session(self, link: Link, s: Session, reason: str, error: str | None) -> None:
        self.datapath.links.pop(s.mac, None)
        self.sessions.pop(s.id, None)
        self._checkpointed.pop(s.id, None)
        self.peer.send("close", session_id=s.id, reason=reason, error=error,
                       hostname=link.client_hostname(), counters=s.traffic())

    async def client_moved(self, link: Link, old: tuple[str, int]) -> None:
        s = link.session
        assert s is not None
        await self.peer.request("moved", session_id=s.id, peer=[link.peer_ip, link.peer_port],
                                old=list(old))

    def checkpoint(self) -> None:
        """The counters of the sessions whose traffic changed since the last
        checkpoint, for the control plane's journal (an idle session costs
        nothing here)."""
        changed = []
        for sid, s in self.sessions.items():
            now = (s.packets_in, s.packets_out)
            if self._checkpointed.get(sid) != now:
                self._checkpointed[sid] = now
                changed.append([sid, s.traffic()])
        for i in range(0, len(changed), wire.CHECKPOINT_BATCH):
            self.peer.send("checkpoint", sessions=changed[i:i + wire.CHECKPOINT_BATCH])

    # -- what the control plane asks of the worker ---------------------------------

    def end_covered(self, network: str, reason: str) -> None:
        """A ban came into force: end every connection from inside it."""
        net = ipaddress.ip_network(network)
        for link in list(self.all_links):
            if canonical_address(link.peer_ip) in net:
                link.terminate("banned", f"source banned: {reason}")

    def disconnect(self, session_id: str, reason: str, message: str) -> bool:
        s = self.sessions.get(session_id)
        link = self.datapath.links.get(s.mac) if s is not None else None
        if link is None:
            return False
        link.terminate(reason, message)
        return True

    def sessions_page(self, after: str | None) -> dict[str, Any]:
        ids = sorted(sid for sid in self.sessions if after is None or sid > after)
        page = ids[:wire.CHECKPOINT_BATCH]
        out = []
        for sid in page:
            s = self.sessions[sid]
            link = self.datapath.links.get(s.mac)
            out.append([sid, link.client_hostname() if link is not None else None,
                        s.traffic()])
        return {"sessions": out, "more": len(ids) > len(page)}

    def metrics(self) -> list[Metric]:
        """The worker's share of the relay's metrics; the control plane sums them."""
        st = self.stats
        traffic = self.datapath.traffic
        dropped = Metric("relay_dropped_packets_total", "counter", "Packets dropped, by reason.")
        for reason, n in sorted(traffic.dropped.items()):
            dropped.add(n, reason=reason)
        failures = Metric("relay_handshake_failures_total", "counter",
                          "Connections that failed before a session, by reason.")
        for reason, n in sorted(st.handshake_failures.items()):
            failures.add(n, reason=reason)
        closed = Metric("relay_peer_closed_total", "counter",
                        "Connections closed because the peer exceeded a cap, by the cap.")
        for reason, n in sorted(st.peer_closed.items()):
            closed.add(n, reason=reason)
        return [
            Metric("relay_packets_total", "counter",
                   "Packets forwarded; direction in = from clients.")
            .add(traffic.packets_in, direction="in").add(traffic.packets_out, direction="out"),
            Metric("relay_bytes_total", "counter", "IP bytes forwarded; in = from clients.")
            .add(traffic.bytes_in, direction="in").add(traffic.bytes_out, direction="out"),
            dropped,
            Metric("relay_ua_stamps_total", "counter", "User-Agent values stamped.")
            .add(traffic.ua_stamped),
            Metric("relay_ua_stamps_missed_total", "counter",
                   "HTTP requests whose User-Agent may have crossed unstamped (split "
                   "across segments).").add(traffic.ua_missed),
            failures,
            closed,
        ]


def metrics_wire(metrics: list[Metric]) -> list[list[Any]]:
    """Metrics as the stats reply carries them (relay.serve.wire)."""
    return [[m.name, m.kind, m.help, [[labels, value] for labels, value in m.samples]]
            for m in metrics]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGESIZE")


class Worker:
    """The worker process: its control socket, listeners and datapath."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.stopping = asyncio.Event()
        self.peer: Peer | None = None
        self.host: WorkerHost | None = None
        self.datapath: Datapath | None = None
        self.openvpn: OpenVPNListener | None = None
        self.dtls: DtlsEndpoint | None = None
        self.cstp_sock: socket.socket | None = None
        self.loops: list[asyncio.Future[None]] = []
        self.control_plane_gone = False
        # What the control plane's messages do (relay.serve.wire).
        self.handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "hello": self._hello, "config": self._config, "ban": self._ban,
            "disconnect": self._disconnect, "stop": lambda msg: self.stopping.set(),
            "stats": self._stats, "sessions": self._sessions}

    async def run(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.peer = Peer(wire.WORKER, self.handlers, self._lost)
        await self.peer.connect(socket.socket(fileno=fd))
        await self.stopping.wait()
        await self._shutdown()

    def _lost(self, exc: Exception | None) -> None:
        if not self.stopping.is_set():
            log.error("the control plane is gone%s; stopping", f" ({exc})" if exc else "")
        self.control_plane_gone = True
        self.stopping.set()

    # -- the control plane's messages ---------------------------------------------

    def _hello(self, msg: dict[str, Any]) -> None:
        if msg["version"] != wire.VERSION:
            log.error("the control plane speaks version %s, this worker %d: stopping",
                      msg["version"], wire.VERSION)
            self.stopping.set()
            return
        assert self.peer is not None
        cfg = configmod.from_dict(msg["config"])
        fds, tap = msg["fds"], msg["tap"]
        self.datapath = Datapath(Queue(tap["name"], fds["tap"], tap["mac"]))
        host = self.host = WorkerHost(self.peer, self.datapath, cfg, msg["users"])
        asyncio.get_running_loop().add_reader(fds["tap"], self.datapath.on_tap_readable)
        self.openvpn = OpenVPNListener(host, self.datapath, cfg, self.index,
                                       msg["openvpn_cookie_key"])
        self.openvpn.start(socket.socket(fileno=fds["openvpn_tcp"]),
                           socket.socket(fileno=fds["openvpn_udp"]))
        cstp = CstpListener(host, self.datapath, cfg)
        if fds["dtls"] is not None:
            self.dtls = cstp.dtls = DtlsEndpoint(host, self.datapath, cfg, self.index)
            self.dtls.open(socket.socket(fileno=fds["dtls"]))
        self.cstp_sock = socket.socket(fileno=fds["cstp"])
        assert self.openvpn.tcp is not None
        self.loops = [host.spawn(self._accept_loop(self.cstp_sock, cstp.accept)),
                      host.spawn(self._accept_loop(self.openvpn.tcp, self.openvpn.accept)),
                      host.spawn(self._checkpoint_loop())]
        self.peer.send("ready", pid=os.getpid())

    def _config(self, msg: dict[str, Any]) -> None:
        if self.host is not None:
            self.host.apply(configmod.from_dict(msg["config"]), msg["users"])

    def _ban(self, msg: dict[str, Any]) -> None:
        if self.host is not None:
            self.host.end_covered(msg["network"], msg["reason"])

    def _disconnect(self, msg: dict[str, Any]) -> dict[str, Any]:
        ended = self.host is not None and self.host.disconnect(
            msg["session_id"], msg["reason"], msg["message"])
        return {"ended": ended}

    def _stats(self, msg: dict[str, Any]) -> dict[str, Any]:
        metrics: list[Metric] = []
        if self.host is not None:
            metrics = self.host.metrics()
            for part in (self.openvpn, self.dtls):
                if part is not None:
                    metrics += part.metrics()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"metrics": metrics_wire(metrics), "cpu_s": usage.ru_utime + usage.ru_stime,
                "rss_bytes": _resident_bytes()}

    def _sessions(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.host is None:
            return {"sessions": [], "more": False}
        return self.host.sessions_page(msg["after"])

    # -- serving ------------------------------------------------------------------

    async def _accept_loop(self, lsock: socket.socket,
                           on_accept: Callable[[socket.socket, tuple[str, int]], None]) -> None:
        """Accept TCP connections; each is admitted by the abuse defences before
        ``on_accept`` (and so before any TLS work) or reset at once."""
        assert self.host is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(lsock)
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                log.error("accept: %s", exc.strerror)
                await asyncio.sleep(ACCEPT_ERROR_BACKOFF_S)
                continue
            try:
                refused = await self.host.admit(peer[0])
            except BaseException:
                sock.close()
                raise
            if refused is not None:
                # Before any TLS work: an RST costs the relay nothing more.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                sock.close()
                continue
            on_accept(sock, peer)

    async def _checkpoint_loop(self) -> None:
        assert self.host is not None
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            self.host.checkpoint()

    async def _shutdown(self) -> None:
        for task in self.loops:
            task.cancel()
        if self.openvpn is not None:
            self.openvpn.close()
        if self.cstp_sock is not None:
            self.cstp_sock.close()
        ended = False
        if self.host is not None:
            for link in list(self.host.all_links):
                link.terminate("relay-shutdown", "the relay was stopped")
                ended = True
        if self.dtls is not None:
            self.dtls.close()
        if self.datapath is not None:
            asyncio.get_running_loop().remove_reader(self.datapath.tap.fd)
        if ended and not self.control_plane_gone:
            await asyncio.sleep(GOODBYE_GRACE_S)
        if self.peer is not None:
            self.peer.close()
            try:
                await asyncio.wait_for(asyncio.shield(self.peer.lost), LAST_MESSAGES_TIMEOUT_S)
            except TimeoutError:
                log.error("the control plane did not take the last messages within %g s",
                          LAST_MESSAGES_TIMEOUT_S)


def main(argv: list[str]) -> int:
    import uvloop

    fd, index = int(argv[0]), int(argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"relay: worker {index}: %(levelname)s: %(message)s")
    # The control plane acts on SIGHUP and sends the new config; one sent to the
    # whole process group must not kill a worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        uvloop.run(Worker(index).run(fd))
    except KeyboardInterrupt:  # before the loop's handler was in place
        return 0
    except Exception as exc:  # a bug: one line; the control plane restarts the worker
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        log.debug("internal error", exc_info=exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
