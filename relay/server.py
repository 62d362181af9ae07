"""``relay serve``: the control plane on uvloop and the CSTP datapath.

One :class:`Relay` owns the TAP device, the session table, the connection log and
the listener. Each TCP connection gets a :class:`CstpLink` (an asyncio protocol)
that feeds the sans-IO :class:`relay.cstp.CstpServer` and acts on its events.
Frames the kernel sends into the TAP are routed to a link by destination MAC.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from relay import connlog, control, cstp
from relay.abuse import Abuse
from relay.config import Config, ConfigError, parse_duration
from relay.errors import RelayError
from relay.nat import Masquerade
from relay.sessions import (
    CHECKPOINT_INTERVAL_S,
    AddressPool,
    Journal,
    Session,
    SessionTable,
    tags_in_log,
)
from relay.tap import ETH_HLEN, ETH_P_IP, ETH_P_IPV6, Tap
from relay.tlsconf import server_context

log = logging.getLogger("relay")

# --- Limits and timeouts -------------------------------------------------------------

# A cookie from a successful login must be used for a tunnel within this time
# (ocserv's cookie-timeout default is 300 s).
COOKIE_TTL_S = 300.0
# A tunnel with nothing received for this many DPD intervals is dead: openconnect
# sends a DPD request after one idle interval, so three missed ones mean the
# path or the client is gone (ocserv uses the same factor).
DEAD_PEER_INTERVALS = 3
# Pending connections the kernel queues for us: the kernel's somaxconn default
# (4096 since Linux 5.4); floods are refused by the relay, not by a full queue.
LISTEN_BACKLOG = 4096
# After accept() fails (out of descriptors), wait this long before trying again
# instead of spinning.
ACCEPT_ERROR_BACKOFF_S = 0.1
# SO_LINGER on, zero timeout: close() sends RST and frees the socket at once.
LINGER_RESET = struct.pack("ii", 1, 0)
# Frames read from the TAP per wake-up before yielding to the other sockets.
TAP_READ_BATCH = 256
# Largest frame the TAP can hand us (64 KiB IP packet + Ethernet header).
TAP_READ_SIZE = 65536 + ETH_HLEN
# Bytes queued towards a slow client before further packets to it are dropped,
# as a router's queue would: 1 MiB is ~700 full-size packets, several hundred ms
# at typical client rates, more than TCP's congestion control needs.
CLIENT_WRITE_HIGH_WATER = 1024 * 1024
# Concurrent reverse lookups of client addresses; past this, new sessions are
# logged with hostname null rather than queueing lookups behind a flood.
MAX_PENDING_LOOKUPS = 64


@dataclass
class PendingLogin:
    expires: float
    client: cstp.ClientInfo


class Stats:
    def __init__(self) -> None:
        self.sessions_total = 0
        self.handshake_failures = 0
        self.protocol_errors = 0
        self.dropped_spoofed = 0
        self.dropped_no_session = 0
        self.dropped_client_queue = 0


class Relay:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.data_dir = cfg.data_dir
        self.hostname = socket.gethostname()
        self.dpd_s = parse_duration(cfg.server.dpd)
        self.keepalive_s = parse_duration(cfg.server.keepalive)
        self.handshake_timeout_s = parse_duration(cfg.server.handshake_timeout)
        self.login_timeout_s = parse_duration(cfg.server.login_timeout)
        self.stats = Stats()
        self.links: dict[bytes, CstpLink] = {}
        self.all_links: set[CstpLink] = set()
        self.cookies: dict[str, PendingLogin] = {}
        self.pending_lookups = 0
        self.background: set[asyncio.Future[None]] = set()
        self.users = _load_users(cfg.server.users)
        self.tap: Tap | None = None
        self.nat: Masquerade | None = None
        self.listener: socket.socket | None = None
        self.connlog: connlog.ConnectionLog | None = None
        self.control: asyncio.AbstractServer | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        connlog.ensure_dir(self.data_dir)
        self.connlog = connlog.ConnectionLog(self.data_dir)
        self.journal = Journal(self.data_dir)
        self.abuse = Abuse(self.cfg.abuse, self.data_dir, self.audit, time.time)
        self._close_leftover_sessions()
        self.ssl_ctx, cert_path = server_context(self.data_dir, self.cfg.server.cert,
                                                 self.cfg.server.key)
        pool = AddressPool(self.cfg.pool)
        self.sessions = SessionTable(pool, tags_in_log(self.data_dir))
        host, port = self.cfg.listen_addr
        try:
            self.tap = await Tap.create(self.cfg.tap.name, pool.gateway, self.cfg.tap.mtu)
            if self.cfg.server.uplink:
                self.nat = Masquerade(str(self.cfg.pool), self.cfg.server.uplink)
                self.nat.install()
            loop.add_reader(self.tap.fd, self._on_tap_readable)
            self.listener = _listen(host, port)
            accepting = asyncio.create_task(self._accept_loop(self.listener))
            log.info("listening on %s:%d (TLS, CSTP), TAP %s gateway %s, data in %s, "
                     "certificate %s", host, port, self.tap.name, pool.gateway, self.data_dir,
                     cert_path)
            self.control = await control.serve_control(self.data_dir, self._control)
            tasks = [accepting, asyncio.create_task(self._checkpoint_loop()),
                     asyncio.create_task(self._abuse_loop())]
            await stop.wait()
            for task in tasks:
                task.cancel()
        finally:
            await self._shutdown()

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(lsock)
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                log.error("accept: %s", exc.strerror)
                await asyncio.sleep(ACCEPT_ERROR_BACKOFF_S)
                continue
            refused = self.abuse.admit(peer[0])
            if refused is not None:
                # Before any TLS work: an RST costs the relay nothing more.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                sock.close()
                continue
            link = CstpLink(self, peer, sock.getsockname()[0])
            task = asyncio.ensure_future(link.start(sock))
            self.background.add(task)
            task.add_done_callback(self.background.discard)

    async def _abuse_loop(self) -> None:
        interval = self.cfg.abuse.seconds("summary_interval")
        while True:
            await asyncio.sleep(interval)
            self.abuse.expire()
            summary = self.abuse.summarise()
            if summary is not None:
                self.audit(summary)

    def audit(self, record: dict[str, Any]) -> None:
        """An audit record in the connection log (shipped like the others)."""
        assert self.connlog is not None
        self.connlog.append(
            {**record, "server": {"id": self.cfg.server.id, "hostname": self.hostname}})
        if record["action"] == "ban":
            log.warning("banned %s until %s: %s", record["network"],
                        connlog.rfc3339_ms(record["until"]), record["reason"])
            network = ipaddress.ip_network(record["network"])
            for link in list(self.all_links):
                if ipaddress.ip_address(link.peer_ip) in network:
                    link.terminate("banned", f"source banned: {record['reason']}")
        elif record["action"] == "unban":
            log.info("unbanned %s: %s", record["network"], record["reason"])

    async def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "ban-list":
            self.abuse.expire()
            return {"ok": True, "bans": [vars(b) for b in self.abuse.bans.values()]}
        if cmd == "ban-add":
            ban = self.abuse.add_ban(str(req.get("target")), float(req.get("duration_s", 0)),
                                     str(req.get("reason") or "added by operator"),
                                     by="operator")
            return {"ok": True, "ban": vars(ban)}
        if cmd == "ban-remove":
            if not self.abuse.remove_ban(str(req.get("target"))):
                return {"ok": False, "error": f"no ban on {req.get('target')}"}
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    async def _shutdown(self) -> None:
        if self.control is not None:
            self.control.close()
            (self.data_dir / control.SOCKET_NAME).unlink(missing_ok=True)
        if self.listener is not None:
            self.listener.close()
        for link in list(self.all_links):
            link.terminate("relay-shutdown", "the relay was stopped")
        if self.tap is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.tap.fd)
            self.tap.close()
        if self.nat is not None:
            self.nat.remove()
        if self.connlog is not None:
            self.connlog.close()
        log.info("stopped")

    def _close_leftover_sessions(self) -> None:
        assert self.connlog is not None
        for path, entry in self.journal.leftovers():
            if entry is None or not isinstance(entry.get("connect"), dict):
                log.error("session journal %s is unreadable; its session may lack a "
                          "disconnect record", path)
                path.unlink(missing_ok=True)
                continue
            connect = entry["connect"]
            started = connlog.parse_rfc3339(connect.get("time", connlog.rfc3339_ms(time.time())))
            record = _disconnect_fields(connect)
            record.update(
                packets=entry.get("packets"), bytes=entry.get("bytes"),
                duration_s=round(time.time() - started, 3),
                reason="relay-restart",
                error="the relay stopped without closing this session (killed or crashed); "
                      "counters are from its last checkpoint and the end time is the restart",
            )
            self.connlog.append(record)
            path.unlink(missing_ok=True)
            log.warning("closed session %s left open by a previous run", connect.get("session_id"))

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            for link in list(self.links.values()):
                if link.session is not None:
                    self.journal.write(link.session)

    # -- datapath: kernel -> client -------------------------------------------------

    def _on_tap_readable(self) -> None:
        assert self.tap is not None
        fd = self.tap.fd
        links = self.links
        for _ in range(TAP_READ_BATCH):
            try:
                frame = os.read(fd, TAP_READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("reading %s: %s", self.tap.name, exc.strerror)
                return
            link = links.get(frame[:6])
            if link is None:
                self.stats.dropped_no_session += 1
                continue
            ethertype = (frame[12] << 8) | frame[13]
            if ethertype in (ETH_P_IP, ETH_P_IPV6):
                link.send_packet(frame[ETH_HLEN:])

    # -- sessions -------------------------------------------------------------------

    def issue_cookie(self, client: cstp.ClientInfo) -> str:
        now = time.monotonic()
        for key in [k for k, v in self.cookies.items() if v.expires < now]:
            del self.cookies[key]
        cookie = secrets.token_urlsafe(32)
        self.cookies[cookie] = PendingLogin(now + COOKIE_TTL_S, client)
        return cookie

    def redeem_cookie(self, cookie: str) -> PendingLogin | None:
        pending = self.cookies.pop(cookie, None)
        if pending is None or pending.expires < time.monotonic():
            return None
        return pending

    def check_login(self, creds: cstp.Credentials) -> bool:
        if self.users is None:
            return True
        expected = self.users.get(creds.username)
        return expected is not None and secrets.compare_digest(expected, creds.password)

    async def open_session(self, link: CstpLink, client: cstp.ClientInfo) -> Session:
        assert self.tap is not None and self.connlog is not None
        s = self.sessions.open(link.peer_ip, link.peer_port, "SSL-VPN")
        # Before the client may send: replies to it must find its MAC.
        await self.tap.add_neighbour(s.virtual_ip, s.mac)
        s.connect_record = self.connlog.append({
            "action": "connect",
            "session_id": s.id,
            "server": {"id": self.cfg.server.id, "ip": link.local_ip, "hostname": self.hostname},
            "client": {"ip": link.peer_ip, "port": link.peer_port,
                       "hostname": link.client_hostname()},
            "protocol": s.protocol,
            "client_software": client.software(),
            "virtual_ip": s.virtual_ip,
        })
        s.started = connlog.parse_rfc3339(s.connect_record["time"])
        self.journal.write(s)
        self.links[s.mac] = link
        self.stats.sessions_total += 1
        log.info("session %s open: %s:%d as %s (%s)", s.id, link.peer_ip, link.peer_port,
                 s.virtual_ip, s.connect_record["client_software"]["name"])
        return s

    def close_session(self, link: CstpLink, s: Session, reason: str, error: str | None) -> None:
        assert self.tap is not None and self.connlog is not None
        self.links.pop(s.mac, None)
        record = _disconnect_fields(s.connect_record)
        record["client"]["hostname"] = link.client_hostname()
        record.update(s.counters(), duration_s=round(time.time() - s.started, 3),
                      reason=reason, error=error)
        self.connlog.append(record)
        self.journal.remove(s)
        self.sessions.close(s)
        log.info("session %s closed: %s%s", s.id, reason, f" ({error})" if error else "")
        task = asyncio.ensure_future(self._forget_address(s.virtual_ip))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _forget_address(self, ip: str) -> None:
        assert self.tap is not None
        if self.tap.fd >= 0:
            await self.tap.remove_neighbour(ip)
        self.sessions.pool.release(ip)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RelayError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def _disconnect_fields(connect: dict[str, Any]) -> dict[str, Any]:
    keep = ("session_id", "server", "client", "protocol", "client_software", "virtual_ip")
    record: dict[str, Any] = {"action": "disconnect"}
    for key in keep:
        value = connect.get(key)
        record[key] = dict(value) if isinstance(value, dict) else value
    record["connect_time"] = connect.get("time")
    return record


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


class CstpLink(asyncio.Protocol):
    """One client TCP connection, from accept to close."""

    def __init__(self, relay: Relay, peer: tuple[str, int], local_ip: str) -> None:
        self.relay = relay
        self.proto = cstp.CstpServer()
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.client = self.proto.client
        self.peer_ip, self.peer_port = peer[0], peer[1]
        self.local_ip = local_ip
        self.accepted = self.last_rx = time.monotonic()
        self.had_session = False
        self.paused = False
        self.closed = False
        self._lookup: asyncio.Future[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tunnel_task: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"{self.peer_ip}:{self.peer_port}"

    # -- connection setup -------------------------------------------------------------

    async def start(self, sock: socket.socket) -> None:
        """TLS handshake on an accepted socket, then the protocol takes over."""
        self.relay.all_links.add(self)
        loop = asyncio.get_running_loop()
        self._start_lookup(loop)
        self._timer = loop.call_later(self.relay.login_timeout_s, self._login_deadline)
        try:
            await loop.connect_accepted_socket(
                lambda: self, sock, ssl=self.relay.ssl_ctx,
                ssl_handshake_timeout=self.relay.handshake_timeout_s)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            self.relay.stats.handshake_failures += 1
            log.warning("refused %s: TLS handshake failed: %s", self,
                        str(exc) or type(exc).__name__)
            sock.close()
            self._forget()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.closed:  # the login deadline passed during the handshake
            transport.close()
            return
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=CLIENT_WRITE_HIGH_WATER)

    def _start_lookup(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.relay.pending_lookups >= MAX_PENDING_LOOKUPS:
            return
        self.relay.pending_lookups += 1
        self._lookup = loop.run_in_executor(
            None, socket.getnameinfo, (self.peer_ip, self.peer_port), socket.NI_NAMEREQD)

        def done(f: asyncio.Future[Any]) -> None:
            self.relay.pending_lookups -= 1
            if not f.cancelled():
                f.exception()  # no name is the common case, not an error

        self._lookup.add_done_callback(done)

    def client_hostname(self) -> str | None:
        f = self._lookup
        if f is None or not f.done() or f.cancelled() or f.exception() is not None:
            return None
        return str(f.result()[0])

    def _login_deadline(self) -> None:
        if self.session is None and not self.closed:
            log.warning("refused %s: no tunnel within %d s of connecting", self,
                        self.relay.login_timeout_s)
            self._abort()

    # -- input ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        self._handle(self.proto.receive_data(data))

    def _handle(self, events: list[cstp.Event]) -> None:
        relay = self.relay
        while events:
            ev = events.pop(0)
            if isinstance(ev, cstp.Packet):
                self._from_client(ev.data)
            elif isinstance(ev, cstp.Credentials):
                if relay.check_login(ev):
                    events.extend(self.proto.accept_login(relay.issue_cookie(self.client)))
                else:
                    log.warning("login refused for %r from %s", ev.username, self)
                    events.extend(self.proto.reject_login("unknown user or wrong password"))
            elif isinstance(ev, cstp.TunnelRequest):
                self._tunnel_task = asyncio.ensure_future(self._tunnel(ev))
            elif isinstance(ev, cstp.PeerDisconnected):
                self._flush()
                self._end("client-disconnect", None, detail=ev.reason)
            elif isinstance(ev, cstp.ProtocolError):
                relay.stats.protocol_errors += 1
                log.warning("dropped %s: %s", self, ev.message)
                self._flush()
                self._end("protocol-error", ev.message)
        self._flush()

    async def _tunnel(self, ev: cstp.TunnelRequest) -> None:
        """Open the session, then answer the CONNECT; the state machine buffers
        whatever the client sends meanwhile."""
        relay = self.relay
        pending = relay.redeem_cookie(ev.cookie)
        if pending is None:
            log.warning("refused %s: CONNECT with an unknown or expired cookie", self)
            self._handle(self.proto.refuse_tunnel("401 Unauthorized", "unknown or expired cookie"))
            return
        client = pending.client
        # The tunnel request may come on a new connection: keep what the client
        # said during login and add what it says now.
        for key, value in vars(self.client).items():
            if value is not None:
                setattr(client, key, value)
        self.client = client
        s = await relay.open_session(self, client)
        if self.closed:  # the client went away while the session was being set up
            relay.close_session(self, s, "connection-closed", "closed during tunnel set-up")
            return
        self.session = s
        self.had_session = True
        relay.abuse.handshake_done(self.peer_ip)
        if self._timer is not None:
            self._timer.cancel()
        self._schedule_dpd()
        pool = relay.sessions.pool
        self._handle(self.proto.open_tunnel(cstp.TunnelParams(
            address=s.virtual_ip, netmask=str(pool.network.netmask), mtu=relay.cfg.tap.mtu,
            dpd_s=relay.dpd_s, keepalive_s=relay.keepalive_s, dns=tuple(relay.cfg.tap.dns))))

    def _from_client(self, packet: bytes) -> None:
        s = self.session
        relay = self.relay
        if s is None or not packet:
            return
        version = packet[0] >> 4
        # Only the session's own address may appear as source: attribution in the
        # logs relies on it.
        if version == 4:
            if len(packet) < 20 or packet[12:16] != s.vip_bytes:
                relay.stats.dropped_spoofed += 1
                return
            ethertype = b"\x08\x00"
        else:
            relay.stats.dropped_spoofed += 1
            return
        s.packets_in += 1
        s.bytes_in += len(packet)
        assert relay.tap is not None
        try:
            os.write(relay.tap.fd, relay.tap.mac + s.mac + ethertype + packet)
        except OSError as exc:
            log.debug("TAP write failed: %s", exc.strerror)

    # -- output ---------------------------------------------------------------------

    def send_packet(self, packet: bytes) -> None:
        s = self.session
        t = self.transport
        if s is None or t is None or self.paused:
            self.relay.stats.dropped_client_queue += 1
            return
        s.packets_out += 1
        s.bytes_out += len(packet)
        t.write(cstp.data_header(len(packet)) + packet)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def _flush(self) -> None:
        out = self.proto.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)
        if self.proto.state is cstp.State.CLOSED and self.transport is not None:
            self.transport.close()

    # -- liveness -------------------------------------------------------------------

    def _schedule_dpd(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.relay.dpd_s, self._check_dpd)

    def _check_dpd(self) -> None:
        if self.closed or self.session is None:
            return
        idle = time.monotonic() - self.last_rx
        if idle > DEAD_PEER_INTERVALS * self.relay.dpd_s:
            log.warning("session %s: nothing from %s for %.0f s", self.session.id, self, idle)
            self._end("dead-peer", f"no data or DPD from the client for {idle:.0f} s")
            self._abort()
            return
        self._schedule_dpd()

    # -- teardown -------------------------------------------------------------------

    def terminate(self, reason: str, message: str) -> None:
        """End from the relay's side (shutdown, ban): tell the client, then close."""
        self.proto.disconnect(message)
        self._flush()
        self._end(reason, None)
        self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.proto.incomplete_request:
            log.warning("dropped %s: connection closed mid-request (%d bytes of an "
                        "incomplete request)", self, self.proto.incomplete_request)
        if exc is None:
            self._end("connection-closed", None)
        else:
            self._end("connection-lost", str(exc) or type(exc).__name__)
        self._forget()

    def _end(self, reason: str, error: str | None, detail: str | None = None) -> None:
        s, self.session = self.session, None
        if s is not None:
            full_reason = f"{reason}: {detail}" if detail else reason
            self.relay.close_session(self, s, full_reason, error)

    def _abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._forget()

    def _forget(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.relay.all_links.discard(self)
        self.relay.abuse.connection_closed(self.peer_ip, time.monotonic() - self.accepted,
                                           self.had_session)


def serve(cfg: Config) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Relay(cfg).run(stop)

    uvloop.run(main())
