"""The CSTP side of ``relay serve``: the TLS listener and one asyncio protocol per
client connection, feeding the sans-IO :class:`relay.protocols.cstp.CstpServer` and acting
on its events through the protocol-agnostic :class:`relay.serve.core.Relay`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from relay.protocols import cstp
from relay.serve import rdns
from relay.serve.sessions import Session, SessionRefused
from relay.serve.tap import ETH_HLEN
from relay.tlsconf import server_context

if TYPE_CHECKING:
    from relay.serve.core import Relay

log = logging.getLogger("relay")

IP_ETHERTYPES = (b"\x08\x00", b"\x86\xdd")

# A cookie from a successful login must be used for a tunnel within this time
# (ocserv's cookie-timeout default is 300 s).
COOKIE_TTL_S = 300.0
# A tunnel with nothing received for this many DPD intervals is dead: openconnect
# sends a DPD request after one idle interval, so three missed ones mean the
# path or the client is gone (ocserv uses the same factor).
DEAD_PEER_INTERVALS = 3
# Bytes queued towards a slow client before further packets to it are dropped,
# as a router's queue would: 1 MiB is ~700 full-size packets, several hundred ms
# at typical client rates, more than TCP's congestion control needs.
CLIENT_WRITE_HIGH_WATER = 1024 * 1024
# Bytes queued towards a client past which it is closed. Over the high-water mark
# only control replies are still queued (DPD answers: data is dropped), and the
# state machine already closes a peer that makes it queue more than
# cstp.MAX_PENDING_OUTPUT of them (ocserv's bound: the kernel send buffer); so
# more than both is a client that does not read. Redis closes such a client at its
# client-output-buffer-limit the same way, rather than hold its replies forever.
CLIENT_WRITE_HARD_LIMIT = CLIENT_WRITE_HIGH_WATER + cstp.MAX_PENDING_OUTPUT


# libuv's clock, and so a uvloop timer, counts whole milliseconds.
LOOP_CLOCK_TICK_S = 0.001


def handshake_failure_reason(exc: BaseException) -> str:
    """A metric label for a TLS handshake that failed before its deadline."""
    if isinstance(exc, ssl.SSLError):
        return "tls-error"
    return "connection-reset"


@dataclass
class PendingLogin:
    expires: float
    client: cstp.ClientInfo


class CstpListener:
    """TLS and the login cookies shared by every CSTP connection."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.ssl_ctx, self.cert_path = server_context(
            relay.data_dir, relay.cfg.server.cert, relay.cfg.server.key)
        self.cookies: dict[str, PendingLogin] = {}

    def accept(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        link = CstpLink(self.relay, self, peer, sock.getsockname()[0])
        self.relay.spawn(link.start(sock), link)

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


class CstpLink(asyncio.Protocol):
    """One client TCP connection, from accept to close."""

    def __init__(self, relay: Relay, listener: CstpListener, peer: tuple[str, int],
                 local_ip: str) -> None:
        self.relay = relay
        self.listener = listener
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

    def __repr__(self) -> str:
        return f"{self.peer_ip}:{self.peer_port}"

    # -- connection setup -------------------------------------------------------------

    async def start(self, sock: socket.socket) -> None:
        """TLS handshake on an accepted socket, then the protocol takes over."""
        self.relay.all_links.add(self)
        loop = asyncio.get_running_loop()
        self._lookup = self.relay.lookups.start(self.peer_ip, self.peer_port)
        self._timer = loop.call_later(self.relay.login_timeout_s, self._login_deadline)
        started = loop.time()
        try:
            await loop.connect_accepted_socket(
                lambda: self, sock, ssl=self.listener.ssl_ctx,
                ssl_handshake_timeout=self.relay.handshake_timeout_s)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            # Past the deadline uvloop aborts with ConnectionAbortedError (asyncio
            # raises TimeoutError): either way it is the deadline, said as such. The
            # loop's clock, as its timer's: that fires by it, never early.
            if loop.time() - started >= self.relay.handshake_timeout_s - LOOP_CLOCK_TICK_S:
                self.relay.stats.handshake_failures["tls-timeout"] += 1
                log.warning("refused %s: no TLS handshake within %g s", self,
                            self.relay.handshake_timeout_s)
            else:
                self.relay.stats.handshake_failures[handshake_failure_reason(exc)] += 1
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

    def client_hostname(self) -> str | None:
        return rdns.name(self._lookup)

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
            if isinstance(ev, cstp.Packets):
                if self.session is not None:
                    relay.to_kernel_batch(self.session, ev.data, ev.spans)
            elif isinstance(ev, cstp.Credentials):
                if relay.check_login(self, ev.username, ev.password):
                    events.extend(self.proto.accept_login(self.listener.issue_cookie(self.client)))
                else:
                    events.extend(self.proto.reject_login("unknown user or wrong password"))
            elif isinstance(ev, cstp.TunnelRequest):
                relay.spawn(self._tunnel(ev), self)
            elif isinstance(ev, cstp.PeerDisconnected):
                self._flush()
                self._end("client-disconnect", None, detail=ev.reason)
            elif isinstance(ev, cstp.ProtocolError):
                if ev.limit:
                    relay.stats.peer_closed[ev.limit] += 1
                else:
                    relay.stats.handshake_failures["protocol-error"] += 1
                log.warning("dropped %s: %s", self, ev.message)
                self._flush()
                self._end(ev.limit or "protocol-error", ev.message)
        self._flush()

    async def _tunnel(self, ev: cstp.TunnelRequest) -> None:
        """Open the session, then answer the CONNECT; the state machine buffers
        (a bounded amount of) whatever the client sends meanwhile. Run by
        ``relay.spawn``: an exception ends the connection with a log line."""
        relay = self.relay
        pending = self.listener.redeem_cookie(ev.cookie)
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
        try:
            s = await relay.open_session(self, "SSL-VPN", client.software())
        except SessionRefused as exc:
            # 503 + X-Reason: openconnect prints "VPN service unavailable; reason: ..."
            log.error("refused a session from %s: %s", self, exc)
            self._handle(self.proto.refuse_tunnel("503 Service Unavailable", str(exc)))
            return
        if self.closed or self.proto.state is cstp.State.CLOSED:
            # The client went away (or broke a cap) while the session was set up.
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

    # -- output ---------------------------------------------------------------------

    def from_kernel(self, frame: bytes) -> None:
        s = self.session
        t = self.transport
        if s is None or t is None or frame[12:14] not in IP_ETHERTYPES:
            return
        if self.paused:
            self.relay.stats.dropped["client-queue-full"] += 1
            return
        n = len(frame) - ETH_HLEN
        s.packets_out += 1
        s.bytes_out += n
        stats = self.relay.stats
        stats.packets_out += 1
        stats.bytes_out += n
        t.write(cstp.data_header(n) + frame[ETH_HLEN:])

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def _flush(self) -> None:
        out = self.proto.data_to_send()
        t = self.transport
        if t is None:
            return
        if out and not t.is_closing():
            t.write(out)
            # Data to the client is written only under the high-water mark
            # (from_kernel); what the state machine makes on its own is written
            # here, so here is where a client that does not read is caught.
            queued = t.get_write_buffer_size()
            if queued > CLIENT_WRITE_HARD_LIMIT:
                self._drop_non_reader(t, queued)
                return
        if self.proto.state is cstp.State.CLOSED:
            t.close()

    def _drop_non_reader(self, t: asyncio.Transport, queued: int) -> None:
        """Close at once, dropping what is queued (close() would wait for it)."""
        message = f"client does not read: {queued} bytes queued for it (at most " \
                  f"{CLIENT_WRITE_HARD_LIMIT})"
        self.relay.stats.peer_closed["client-not-reading"] += 1
        log.warning("dropped %s: %s", self, message)
        self._end("client-not-reading", message)
        t.abort()
        self._forget()

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
