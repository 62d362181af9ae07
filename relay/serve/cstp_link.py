"""The CSTP side of ``relay serve``: the TLS listener and one asyncio protocol per
client connection, feeding the sans-IO :class:`relay.protocols.cstp.CstpServer` and acting
on its events through the worker's :class:`relay.serve.link.LinkHost` interface.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import ssl
from array import array

from relay.config import Config
from relay.protocols import cstp
from relay.serve import batch
from relay.serve.datapath import Datapath
from relay.serve.dtls_link import DtlsEndpoint, DtlsSession, tls_psk
from relay.serve.link import CLIENT_WRITE_HIGH_WATER, LinkHost, StreamLink
from relay.tlsconf import server_context

log = logging.getLogger("relay")

# Bytes queued towards a client past which it is closed. Over the high-water mark
# (relay.serve.link) only control replies are still queued (DPD answers: data is
# dropped), and the state machine already closes a peer that makes it queue more
# than cstp.MAX_PENDING_OUTPUT of them (ocserv's bound: the kernel send buffer); so
# more than both is a client that does not read. Redis closes such a client at its
# client-output-buffer-limit the same way, rather than hold its replies forever.
CLIENT_WRITE_HARD_LIMIT = CLIENT_WRITE_HIGH_WATER + cstp.MAX_PENDING_OUTPUT


# libuv's clock, and so a uvloop timer, counts whole milliseconds.
LOOP_CLOCK_TICK_S = 0.001


def handshake_failure_reason(exc: BaseException) -> str:
    """A metric label for a failed TLS handshake."""
    if isinstance(exc, TimeoutError):
        return "tls-timeout"
    if isinstance(exc, ssl.SSLError):
        return "tls-error"
    return "connection-reset"


class CstpListener:
    """TLS and the login cookies of every CSTP connection (the cookies are kept by
    the control plane: a client may redeem its cookie on a new connection, which
    the kernel may hand to another worker)."""

    def __init__(self, host: LinkHost, datapath: Datapath, cfg: Config) -> None:
        self.host = host
        self.datapath = datapath
        self.ssl_ctx, self.cert_path = server_context(cfg.data_dir, cfg.server.cert,
                                                      cfg.server.key)
        # The UDP endpoint of DTLS channels ([server] dtls); the worker opens it.
        self.dtls: DtlsEndpoint | None = None

    def accept(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        link = CstpLink(self, peer, sock.getsockname()[0])
        self.host.spawn(link.start(sock, self.ssl_ctx), link)

    def issue_cookie(self, client: cstp.ClientInfo) -> str:
        cookie = secrets.token_urlsafe(32)
        self.host.keep_login(cookie, vars(client))
        return cookie

    async def redeem_cookie(self, cookie: str) -> cstp.ClientInfo | None:
        client = await self.host.redeem_login(cookie)
        return cstp.ClientInfo(**client) if client is not None else None


class CstpLink(StreamLink[cstp.Event]):
    """One client TCP connection, from accept to close."""

    opens = "tunnel"

    def __init__(self, listener: CstpListener, peer: tuple[str, int], local_ip: str) -> None:
        super().__init__(listener.host, peer, local_ip)
        self.listener = listener
        self.datapath = listener.datapath
        self.traffic = listener.datapath.traffic
        self.proto = cstp.CstpServer()
        self.client = self.proto.client
        self.dtls: DtlsSession | None = None  # with PSK-NEGOTIATE, once the tunnel opened

    def __repr__(self) -> str:
        return f"{self.peer_ip}:{self.peer_port}"

    def _start_failed(self, exc: OSError, elapsed_s: float) -> None:
        # Past the deadline uvloop aborts with ConnectionAbortedError (asyncio raises
        # TimeoutError): either way it is the deadline, said as such. The loop's
        # clock, as its timer's: that fires by it, never early.
        deadline = self.host.settings.handshake_timeout_s
        if elapsed_s >= deadline - LOOP_CLOCK_TICK_S:
            self.host.count_handshake_failure("tls-timeout")
            log.warning("refused %s: no TLS handshake within %g s", self, deadline)
            return
        self.host.count_handshake_failure(handshake_failure_reason(exc))
        log.warning("refused %s: TLS handshake failed: %s", self, str(exc) or type(exc).__name__)

    # -- input ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._handle(self.proto.receive_data(data, self.loop.time()))

    def _handle(self, events: list[cstp.Event]) -> None:
        host = self.host
        while events:
            ev = events.pop(0)
            if isinstance(ev, cstp.Packets):
                if self.session is not None:
                    self.datapath.to_kernel_batch(self.session, ev.data, ev.spans)
                    if self.dtls is not None:
                        self.dtls.client_sent_over_tls(self.loop.time())
            elif isinstance(ev, cstp.Credentials):
                if host.check_login(self, ev.username, ev.password):
                    events.extend(self.proto.accept_login(self.listener.issue_cookie(self.client)))
                else:
                    events.extend(self.proto.reject_login("unknown user or wrong password"))
            elif isinstance(ev, cstp.TunnelRequest):
                host.spawn(self._tunnel(ev), self)
            elif isinstance(ev, cstp.PeerDisconnected):
                self._flush()
                self._end("client-disconnect", None, detail=ev.reason)
            elif isinstance(ev, cstp.PeerDead):
                self._peer_dead(ev.reason)
            elif isinstance(ev, cstp.ProtocolError):
                if ev.limit:
                    host.count_peer_closed(ev.limit)
                else:
                    host.count_handshake_failure("protocol-error")
                log.warning("dropped %s: %s", self, ev.message)
                self._flush()
                self._end(ev.limit or "protocol-error", ev.message)
        self._flush()

    async def _tunnel(self, ev: cstp.TunnelRequest) -> None:
        """Open the session, then answer the CONNECT; the state machine buffers
        (a bounded amount of) whatever the client sends meanwhile. Run by
        ``host.spawn``: an exception ends the connection with a log line."""
        client = await self.listener.redeem_cookie(ev.cookie)
        if self._gone():  # the client went while the cookie was looked up
            return
        if client is None:
            log.warning("refused %s: CONNECT with an unknown or expired cookie", self)
            self._handle(self.proto.refuse_tunnel("401 Unauthorized", "unknown or expired cookie"))
            return
        # The tunnel request may come on a new connection: keep what the client
        # said during login and add what it says now.
        for key, value in vars(self.client).items():
            if value is not None:
                setattr(client, key, value)
        self.client = client
        endpoint = self.listener.dtls
        psk = None
        if ev.dtls and endpoint is not None and self.transport is not None:
            psk = tls_psk(self.transport.get_extra_info("ssl_object"))
            if psk is None:
                log.warning("%s: no DTLS: the TLS session's exporter cannot be read", self)
        lease = await self._open("SSL-VPN", client.software(),
                                 data_channel="DTLS" if psk is not None else "TLS")
        if lease is None:
            return
        settings = self.host.settings
        if psk is not None and endpoint is not None:
            self.dtls = endpoint.register(self, psk, settings)
        self._handle(self.proto.open_tunnel(cstp.TunnelParams(
            address=lease.address, netmask=lease.netmask, mtu=lease.mtu, dpd_s=settings.dpd_s,
            keepalive_s=settings.keepalive_s, dns=lease.dns,
            dtls=self.dtls.offer if self.dtls is not None else None)))
        # The machine's only deadline starts now; input only moves it later, so
        # the receive path (the datapath's) arms nothing.
        self._arm()

    def _refusal(self, message: str) -> list[cstp.Event]:
        # 503 + X-Reason: openconnect prints "VPN service unavailable; reason: ..."
        return self.proto.refuse_tunnel("503 Service Unavailable", message)

    def _gone(self) -> bool:
        # The client may also have broken a cap while the session was set up.
        return self.closed or self.proto.state is cstp.State.CLOSED

    # -- output ---------------------------------------------------------------------

    def from_kernel_batch(self, buf: bytearray, spans: array[int]) -> None:
        s = self.session
        t = self.transport
        if s is None or t is None:
            return
        payloads = batch.ip_payloads(buf, spans, allow_ipv6=True)
        count = len(payloads) // 2
        if not count:
            return
        view = memoryview(buf)
        dtls = self.dtls
        sent = total = 0
        for i in range(0, len(payloads), 2):
            off, n = payloads[i], payloads[i + 1]
            # Over DTLS while its channel is up, else over the TLS connection.
            if dtls is None or not dtls.send(buf, off, n):
                if self.paused:
                    self.traffic.dropped["client-queue-full"] += 1
                    continue
                t.write(cstp.data_header(n) + view[off:off + n])
            sent += 1
            total += n
        s.packets_out += sent
        s.bytes_out += total
        traffic = self.traffic
        traffic.packets_out += sent
        traffic.bytes_out += total

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
        self.host.count_peer_closed("client-not-reading")
        log.warning("dropped %s: %s", self, message)
        self._end("client-not-reading", message)
        t.abort()
        self._forget()

    # -- teardown -------------------------------------------------------------------

    def dtls_received(self, now: float) -> None:
        self.proto.peer_active(now)

    def dtls_disconnected(self, reason: str) -> None:
        """The client ended the session with a DISCONNECT over DTLS."""
        self._end("client-disconnect", None, detail=reason)
        self._close()

    def _end(self, reason: str, error: str | None, detail: str | None = None) -> None:
        if self.dtls is not None:  # the DTLS channel ends with the session
            self.dtls.close()
            self.dtls = None
        super()._end(reason, error, detail)

    def terminate(self, reason: str, message: str) -> None:
        """End from the relay's side (shutdown, ban): tell the client, then close."""
        self.proto.disconnect(message)
        self._flush()
        self._end(reason, None)
        self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.proto.incomplete_request:
            log.warning("dropped %s: connection closed mid-request (%d bytes of an "
                        "incomplete request)", self, self.proto.incomplete_request)
        super().connection_lost(exc)
