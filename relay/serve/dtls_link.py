"""The DTLS data channel of CSTP sessions in ``relay serve``: the UDP endpoint on
the TLS listener's port number, and one :class:`DtlsSession` per CSTP session that
negotiated DTLS (``PSK-NEGOTIATE``, :class:`relay.protocols.cstp.DtlsOffer`).

The handshake and the records are OpenSSL's (``cext/dtls.c``, memory BIOs, the
datagrams sent from C); the protocol is :mod:`relay.protocols.dtls`. The PSK is
the TLS session's RFC 5705 exporter (:func:`tls_psk`), read from the TLS
connection asyncio already runs: see there.

Datagrams are read in batches (recvmmsg) and matched to a channel by their
source address. From an unknown address only a ClientHello is looked at: its
session_id must be the App-ID of a session that negotiated DTLS, or it is
dropped without an answer; then OpenSSL's stateless cookie exchange
(DTLSv1_listen) answers it with a HelloVerifyRequest and keeps nothing. Only a
ClientHello that echoes a good cookie (the peer receives at its address) gets a
channel, and with it the abuse admission of a handshake (bans, rates, handshakes
in progress: :meth:`LinkHost.admit_handshake`, which also steers the peer's
datagrams to this worker: the App-ID's first byte brought its ClientHellos here,
relay.serve.steer) and the handshake deadline. A
channel carries the session's traffic only once its PSK handshake completed, and
then replaces the session's previous channel: a datagram that cannot prove the
PSK never ends a session, moves it to another address or takes its traffic.

The DATA records of one receive from one channel go to the datapath together
(:meth:`Datapath.to_kernel_batch`, the CSTP frames' entry: source check, hot path,
TAP). Kernel -> client, the session's link sends over DTLS while the channel is
up (:meth:`DtlsSession.send`) and over TLS otherwise; the channel goes down when
it is silent for three DPD intervals or when the client sends data over TLS after
the channel has been silent for a while (ocserv's rules), and comes back with the
next record it authenticates or the client's next handshake; a channel the client
closed is gone.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from array import array
from collections import Counter
from typing import Any, Protocol

from relay.cext import ffi, lib
from relay.config import Config
from relay.metrics import Metric
from relay.protocols import cstp, dtls
from relay.serve import steer
from relay.serve.datapath import Datapath
from relay.serve.link import LinkHost, LinkSettings
from relay.serve.sessions import Session

log = logging.getLogger("relay")

# Datagrams per recvmmsg call (RECV_BATCH_MAX in cext/dtls.c), and calls per
# wake-up before yielding to the other sockets: 256 datagrams, as the TAP's
# TAP_READ_BATCH frames.
RECV_BATCH = 64
RECV_CALLS_PER_WAKEUP = 4
# Receive slot: a tunnel packet of the tap MTU with its DTLS overhead, and at least
# 2 KiB for a ClientHello with extensions (GnuTLS's without them, openconnect's,
# is ~120 bytes). A longer datagram is cut by the kernel and dropped.
MIN_SLOT = 2048
# DATA records handed over per receive run: openconnect sends one per datagram;
# a datagram may hold more, up to this many per datagram of the batch.
MAX_DATA_RECORDS = 8 * RECV_BATCH
# The cookie's time slot: a ClientHello must echo a cookie of this or the previous
# slot. The OpenVPN UDP cookie's 30 s (relay.protocols.openvpn.cookie).
COOKIE_SLOT_S = 30
# The MTU handshake flights are cut to (the PSK handshake's are under 200 bytes):
# RFC 9000 14.1's 1200 bytes, which every path carries.
HANDSHAKE_MTU = 1200
# Handshakes in progress per session: one honest attempt at a time (openconnect
# retries every 60 s, dtls_attempt_period), plus one, so that someone who saw the
# App-ID on the wire cannot block the client's own attempt by starting his.
MAX_HANDSHAKES_PER_SESSION = 2
# Drops of datagrams from unknown peers are summarised in one log line per interval.
DROP_LOG_INTERVAL_S = 10.0
# PySSLSocket (CPython Modules/_ssl.c): after PyObject_HEAD (2 words) come
# Socket, ssl (the SSL *) and ctx (the PySSLContext, i.e. ssl_object.context).
_PYSSL_SSL_WORD, _PYSSL_CTX_WORD = 3, 4


def tls_psk(ssl_object: Any) -> bytes | None:
    """The DTLS PSK of a CSTP connection: ``dtls.PSK_LEN`` bytes of its TLS
    session's RFC 5705 exporter with label ``dtls.PSK_LABEL`` and no context,
    which openconnect derives the same way (gnutls_prf, SSL_export_keying_material).
    None when it cannot be read.

    The ssl module has no exporter, so OpenSSL's SSL_export_keying_material() is
    called on the connection's own SSL object (cext/dtls.c), found in the
    ssl.SSLObject of asyncio's TLS transport at its place in CPython's PySSLSocket:
    the CSTP link keeps uvloop's TLS transport (and its throughput) and needs no
    second TLS library. The place is checked twice before use: the word after it
    must be the object's own SSLContext, and the SSL object's Finished message must
    be the connection's tls-unique as the ssl module reports it."""
    sslobj = getattr(ssl_object, "_sslobj", None)
    if sslobj is None or type(sslobj).__module__ != "_ssl" \
            or type(sslobj).__name__ != "_SSLSocket":
        return None
    words = ffi.cast("uintptr_t *", id(sslobj))
    if words[_PYSSL_CTX_WORD] != id(sslobj.context):
        return None
    tls_unique = ssl_object.get_channel_binding("tls-unique")
    if not tls_unique:
        return None
    out = ffi.new("uint8_t[]", dtls.PSK_LEN)
    if lib.relay_tls_export(words[_PYSSL_SSL_WORD], tls_unique, len(tls_unique),
                            dtls.PSK_LABEL, len(dtls.PSK_LABEL), out, dtls.PSK_LEN) != 0:
        return None
    return bytes(ffi.buffer(out))


def sockaddr_peer(addr: bytes) -> tuple[str, int]:
    """(ip, port) of a struct sockaddr_in or sockaddr_in6 as recvmmsg fills it."""
    port = int.from_bytes(addr[2:4], "big")
    if int.from_bytes(addr[0:2], "little") == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, addr[8:24]), port
    return socket.inet_ntop(socket.AF_INET, addr[4:8]), port


class Owner(Protocol):
    """The CSTP link a DTLS session belongs to."""

    session: Session | None

    def dtls_received(self, now: float) -> None:
        """The client was heard from over DTLS: the session is alive."""

    def dtls_disconnected(self, reason: str) -> None:
        """The client said goodbye over DTLS: end the session."""


class Channel:
    """One peer's DTLS connection: its SSL object (cext/dtls.c) and address."""

    __slots__ = ("addr", "c", "deadline", "host", "ip", "port", "timer", "up")

    def __init__(self, c: Any, addr: bytes) -> None:
        self.c = c
        self.addr = addr
        self.ip, self.port = sockaddr_peer(addr)
        self.up = False
        self.timer: asyncio.TimerHandle | None = None  # retransmission
        self.deadline: asyncio.TimerHandle | None = None
        # Once admitted: the host that steers the peer's datagrams here.
        self.host: LinkHost | None = None

    def free(self) -> None:
        for timer in (self.timer, self.deadline):
            if timer is not None:
                timer.cancel()
        if self.c is not None:
            lib.relay_dtls_chan_free(self.c)
            self.c = None
        if self.host is not None:
            self.host.release_peer((self.ip, self.port))
            self.host = None


class DtlsEndpoint:
    """The UDP socket, the cookie exchange and the address and App-ID tables."""

    def __init__(self, host: LinkHost, datapath: Datapath, cfg: Config, worker: int) -> None:
        self.host = host
        self.datapath = datapath
        self.worker = worker  # the index App-IDs carry (relay.serve.steer.app_id)
        self.loop = asyncio.get_running_loop()
        server = lib.relay_dtls_server_new(secrets.token_bytes(32), 32, COOKIE_SLOT_S,
                                           HANDSHAKE_MTU)
        if server == ffi.NULL:
            raise RuntimeError("OpenSSL refused the DTLS server settings")
        self.server = ffi.gc(server, lib.relay_dtls_server_free)
        self.sock: socket.socket | None = None
        self.fd = -1
        self.port = 0
        self.app_ids: dict[bytes, DtlsSession] = {}
        self.by_addr: dict[bytes, tuple[DtlsSession, Channel]] = {}
        # Peers whose handshake awaits the abuse defences' admission.
        self.admitting: set[bytes] = set()
        self.channels_up = 0
        self.counts: Counter[str] = Counter()
        self.slot = max(MIN_SLOT, cfg.tap.mtu + cstp.DTLS_PACKET_OVERHEAD)
        self.buf = ffi.new("uint8_t[]", RECV_BATCH * self.slot)
        self.lens = ffi.new("uint32_t[]", RECV_BATCH)
        self.addrs = ffi.new("uint8_t[]", RECV_BATCH * lib.RELAY_DTLS_ADDR_MAX)
        self.addrs_view = memoryview(ffi.buffer(self.addrs))
        self.addr_lens = ffi.new("uint32_t[]", RECV_BATCH)
        self.plain = bytearray(RECV_BATCH * self.slot)
        self.plain_c = ffi.from_buffer("uint8_t[]", self.plain)
        self.data_spans = ffi.new("uint32_t[]", 2 * MAX_DATA_RECORDS)
        self.ctl_spans = ffi.new("uint32_t[]", 2 * dtls.MAX_CONTROL_RECORDS)
        self.counters = ffi.new("uint32_t[2]")
        self.chan_out = ffi.new("struct relay_dtls_chan **")
        self._dropped = 0
        self._last_drop_log = 0.0

    def open(self, sock: socket.socket) -> None:
        """Receive on ``sock``, this worker's UDP socket on the TLS listener's
        address and port (relay.serve.steer.udp_group makes them)."""
        sock.setblocking(False)
        self.sock, self.fd, self.port = sock, sock.fileno(), sock.getsockname()[1]
        self.loop.add_reader(self.fd, self.on_readable)

    def close(self) -> None:
        for session in list(self.app_ids.values()):
            session.close()
        if self.sock is not None:
            self.loop.remove_reader(self.fd)
            self.sock.close()
            self.sock, self.fd = None, -1

    def register(self, owner: Owner, psk: bytes, settings: LinkSettings) -> DtlsSession:
        """A session that negotiated DTLS: its App-ID is now known."""
        app_id = steer.app_id(self.worker)
        session = DtlsSession(self, owner, psk, app_id, settings)
        self.app_ids[app_id] = session
        return session

    # -- receive ----------------------------------------------------------------------

    def on_readable(self) -> None:
        for _ in range(RECV_CALLS_PER_WAKEUP):
            n = lib.relay_dtls_recv_batch(self.fd, self.buf, self.slot, self.lens, self.addrs,
                                          self.addr_lens, RECV_BATCH)
            if n < 0:
                log.debug("DTLS: recvmmsg: %s", n)
                return
            if n:
                self._dispatch(n)
            if n < RECV_BATCH:
                return

    def _dispatch(self, n: int) -> None:
        """Route the batch's datagrams: runs from one address to its channel at once."""
        now = self.loop.time()
        view, width, alens, by_addr = self.addrs_view, lib.RELAY_DTLS_ADDR_MAX, self.addr_lens, \
            self.by_addr
        i = 0
        while i < n:
            alen = alens[i]
            start = i * width
            addr = bytes(view[start:start + alen])
            if self.lens[i] == 0:
                self._drop(addr, "dtls-oversize", "datagram longer than a receive slot")
                i += 1
                continue
            found = by_addr.get(addr)
            # A ClientHello from an up channel's address is a new handshake (the
            # client's new socket got the same port from its NAT).
            if found is None or not found[1].up or (
                    self.buf[i * self.slot] == dtls.CONTENT_HANDSHAKE and self._is_hello(i)):
                if found is not None and not found[1].up:
                    found[0].handshake_step(found[1], i)
                else:
                    self._unknown(i, addr, now)
                i += 1
                continue
            j = i + 1
            while j < n and alens[j] == alen and view[j * width:j * width + alen] == addr:
                j += 1
            found[0].receive(found[1], i, j - i, now)
            i = j

    def _is_hello(self, i: int) -> bool:
        return dtls.parse_client_hello(self._datagram(i)) is not None

    def _datagram(self, i: int) -> bytes:
        return bytes(ffi.buffer(self.buf + i * self.slot, self.lens[i]))

    def _unknown(self, i: int, addr: bytes, now: float) -> None:
        """A datagram from an address with no handshake or channel: a ClientHello
        for a known App-ID gets the cookie exchange; anything else is dropped."""
        if addr in self.admitting:  # a ClientHello sent again while we ask
            return
        hello = dtls.parse_client_hello(self._datagram(i))
        if hello is None:
            self._drop(addr, "dtls-unknown-peer", "not a ClientHello")
            return
        session = self.app_ids.get(hello.session_id)
        if session is None:
            self._drop(addr, "dtls-unknown-app-id", "ClientHello for no session")
            return
        r = lib.relay_dtls_listen(self.server, self.fd, self.buf + i * self.slot, self.lens[i],
                                  self.addrs + i * lib.RELAY_DTLS_ADDR_MAX, len(addr),
                                  self.chan_out)
        if r == lib.RELAY_DTLS_VERIFY:
            self.counts["hello-verify"] += 1
            return
        if r != lib.RELAY_DTLS_ACCEPT:
            self._drop(addr, "dtls-bad-hello", "ClientHello refused by the cookie exchange")
            return
        channel = Channel(self.chan_out[0], addr)
        self.admitting.add(addr)
        self.host.spawn(self._admit(session, channel))

    async def _admit(self, session: DtlsSession, channel: Channel) -> None:
        """The channel's handshake goes ahead once the abuse defences admit it."""
        try:
            refused = await self.host.admit_handshake((channel.ip, channel.port))
        except BaseException:
            channel.free()
            raise
        finally:
            self.admitting.discard(channel.addr)
        if refused is not None:
            channel.free()
            self.counts["handshake-refused"] += 1
            log.debug("DTLS: refused a handshake from %s:%d: %s", channel.ip, channel.port,
                      refused)
            return
        channel.host = self.host
        if self.sock is None or self.app_ids.get(session.app_id) is not session:
            # The session (or the relay) ended meanwhile: nothing to shake hands for.
            channel.free()
            self.host.handshake_over(channel.ip, strike=False)
            return
        session.start_handshake(channel, self.loop.time())

    def _drop(self, addr: bytes, reason: str, why: str) -> None:
        self.datapath.traffic.dropped[reason] += 1
        self._dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            ip, port = sockaddr_peer(addr)
            log.warning("DTLS: dropped %d datagram(s) from unknown peers, the last from %s:%d: "
                        "%s", self._dropped, ip, port, why)
            self._dropped = 0
            self._last_drop_log = now

    def metrics(self) -> list[Metric]:
        c = self.counts
        handshakes = Metric("relay_dtls_handshakes_total", "counter",
                            "DTLS handshakes after a good cookie, by result.")
        for result in ("completed", "failed", "refused", "superseded"):
            handshakes.add(c[f"handshake-{result}"], result=result)
        return [
            Metric("relay_dtls_hello_verify_total", "counter",
                   "DTLS ClientHellos answered statelessly with a cookie (nothing kept).")
            .add(c["hello-verify"]),
            handshakes,
            Metric("relay_dtls_channels_up", "gauge",
                   "CSTP sessions whose traffic goes over DTLS now.").add(self.channels_up),
            Metric("relay_dtls_fallbacks_total", "counter",
                   "DTLS channels that went down (traffic back to TLS until the client "
                   "brings DTLS back).").add(c["down"]),
        ]


class DtlsSession:
    """The DTLS side of one CSTP session: its App-ID and PSK, handshakes in
    progress, and the channel that carries its traffic while up."""

    def __init__(self, endpoint: DtlsEndpoint, owner: Owner, psk: bytes, app_id: bytes,
                 settings: LinkSettings) -> None:
        self.endpoint = endpoint
        self.owner = owner
        self.psk = psk
        self.app_id = app_id
        self.dpd_s = settings.dpd_s
        self.handshake_timeout_s = settings.handshake_timeout_s
        self.offer = cstp.DtlsOffer(port=endpoint.port, app_id=app_id, dpd_s=settings.dpd_s,
                                    keepalive_s=settings.keepalive_s)
        # The channel of the last completed handshake, and while it carries the
        # session's traffic, its machine; a channel that went down (machine None)
        # still receives, and comes back up with the first record it authenticates,
        # as ocserv's does (worker-vpn.c, dtls_mainloop: UP_INACTIVE to UP_ACTIVE).
        self.channel: Channel | None = None
        self.machine: dtls.DtlsTunnel | None = None
        self.pending: list[Channel] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def __repr__(self) -> str:
        return repr(self.owner)

    # -- kernel -> client -------------------------------------------------------------

    def send(self, buf: bytearray, off: int, n: int) -> bool:
        """Send the IP packet ``buf[off:off + n]`` over DTLS if the channel is up
        (else False: the caller sends it over TLS)."""
        ch = self.channel
        if ch is None or self.machine is None:
            return False
        r = lib.relay_dtls_send(ch.c, self.endpoint.fd, cstp.PacketType.DATA,
                                ffi.from_buffer(buf), off, n)
        if r == -1:
            self._down("OpenSSL refused to seal a record", close=True)
            return False
        if r == -2:  # the socket's buffer is full: lost, as on a congested path
            self.endpoint.datapath.traffic.dropped["dtls-send-failed"] += 1
        return True

    def _send_records(self) -> None:
        ch, machine = self.channel, self.machine
        if ch is None or machine is None:
            return
        for record in machine.records_to_send():
            lib.relay_dtls_send(ch.c, self.endpoint.fd, record[0], record, 1, len(record) - 1)

    # -- handshakes -------------------------------------------------------------------

    def start_handshake(self, ch: Channel, now: float) -> None:
        lib.relay_dtls_set_psk(ch.c, self.psk)
        if len(self.pending) >= MAX_HANDSHAKES_PER_SESSION:
            self._handshake_over(self.pending[0], "superseded", "a newer handshake came")
        self.pending.append(ch)
        self.endpoint.by_addr[ch.addr] = (self, ch)
        ch.deadline = self.endpoint.loop.call_later(self.handshake_timeout_s, self._handshake_over,
                                                    ch, "failed", "handshake timed out")
        self._step(ch, ffi.NULL, 0)

    def handshake_step(self, ch: Channel, i: int) -> None:
        ep = self.endpoint
        self._step(ch, ep.buf + i * ep.slot, ep.lens[i])

    def _step(self, ch: Channel, dgram: Any, n: int) -> None:
        r = lib.relay_dtls_handshake(ch.c, self.endpoint.fd, dgram, n)
        if r == lib.RELAY_DTLS_DONE:
            self._up(ch)
        elif r == lib.RELAY_DTLS_MORE:
            self._arm_retransmit(ch)
        else:
            self._handshake_over(ch, "failed", "handshake failed")

    def _arm_retransmit(self, ch: Channel) -> None:
        if ch.timer is not None:
            ch.timer.cancel()
            ch.timer = None
        ms = lib.relay_dtls_timeout_ms(ch.c)
        if ms >= 0:
            ch.timer = self.endpoint.loop.call_later(ms / 1000, self._retransmit, ch)

    def _retransmit(self, ch: Channel) -> None:
        ch.timer = None
        if ch.c is None:
            return
        if lib.relay_dtls_retransmit(ch.c, self.endpoint.fd) < 0:
            self._handshake_over(ch, "failed", "no answer to retransmissions")
        else:
            self._arm_retransmit(ch)

    def _handshake_over(self, ch: Channel, result: str, why: str) -> None:
        """A handshake that will not complete: its slot is freed, and, unless the
        relay ended it, it is a strike against its source."""
        if ch not in self.pending:
            return
        self.pending.remove(ch)
        self._forget_addr(ch)
        ch.free()
        self.endpoint.counts[f"handshake-{result}"] += 1
        self.endpoint.host.handshake_over(ch.ip, strike=result == "failed")
        log.info("%s: DTLS handshake from %s:%d %s: %s", self, ch.ip, ch.port, result, why)

    def _up(self, ch: Channel) -> None:
        ep = self.endpoint
        self.pending.remove(ch)
        for timer in (ch.timer, ch.deadline):
            if timer is not None:
                timer.cancel()
        ch.timer = ch.deadline = None
        ep.counts["handshake-completed"] += 1
        ep.host.handshake_over(ch.ip, strike=False)
        old, self.channel = self.channel, ch
        ch.up = True
        ep.by_addr[ch.addr] = (self, ch)
        if old is not None:
            self._forget_addr(old)
            old.free()
        cipher = ffi.string(lib.relay_dtls_cipher(ch.c)).decode()
        self._activate(f"DTLS up from {ch.ip}:{ch.port} ({cipher})")

    def _activate(self, what: str) -> None:
        """The channel carries the session's traffic from now on."""
        if self.machine is None:
            self.endpoint.channels_up += 1
        self.machine = dtls.DtlsTunnel(self.dpd_s, self.endpoint.loop.time())
        log.info("%s: %s", self, what)
        self._arm()

    def _forget_addr(self, ch: Channel) -> None:
        found = self.endpoint.by_addr.get(ch.addr)
        if found is not None and found[1] is ch:
            del self.endpoint.by_addr[ch.addr]

    # -- client -> kernel -------------------------------------------------------------

    def receive(self, ch: Channel, first: int, count: int, now: float) -> None:
        """``count`` datagrams of the receive batch from ``ch``, from ``first`` on."""
        ep = self.endpoint
        r = lib.relay_dtls_recv(ch.c, ep.fd, ep.buf + first * ep.slot, ep.slot, ep.lens + first,
                                count, ep.plain_c, len(ep.plain), ep.data_spans, ep.counters,
                                MAX_DATA_RECORDS, ep.ctl_spans, ep.counters + 1,
                                dtls.MAX_CONTROL_RECORDS)
        n_data, n_ctl = ep.counters[0], ep.counters[1]
        if ch is not self.channel:
            return
        if (n_data or n_ctl) and self.machine is None:
            self._activate("DTLS back up: the client sends over it")
        machine = self.machine
        if machine is None:  # nothing authenticated came
            if r < 0:
                self._down("the client closed the DTLS channel", close=True)
            return
        if n_data or n_ctl:
            self.owner.dtls_received(now)
        if n_data:
            machine.received(now)
            s = self.owner.session
            if s is not None:
                spans = array("I")
                spans.frombytes(ffi.buffer(ep.data_spans, 8 * n_data))
                ep.datapath.to_kernel_batch(s, ep.plain, spans)
        if n_ctl:
            spans = array("I")
            spans.frombytes(ffi.buffer(ep.ctl_spans, 8 * n_ctl))
            events = machine.receive_control(ep.plain, spans, now)
            self._send_records()
            self._handle(events)
        if r < 0 and self.channel is ch:
            self._down("the client closed the DTLS channel", close=True)

    def client_sent_over_tls(self, now: float) -> None:
        """The client sent data over TLS (openconnect does while its DTLS is down)."""
        if self.machine is not None:
            self._handle(self.machine.client_sent_over_tls(now))

    def _handle(self, events: list[dtls.Event]) -> None:
        for ev in events:
            if isinstance(ev, dtls.ChannelDown):
                self._down(ev.reason)
            else:  # PeerDisconnected
                self.owner.dtls_disconnected(ev.reason)
                return

    # -- time -------------------------------------------------------------------------

    def _arm(self) -> None:
        """The machine's timer, as LinkBase arms the link's: a later deadline (more
        traffic) lets it fire early and re-arm."""
        when = self.machine.next_timeout() if self.machine is not None else None
        if when is None or when >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.endpoint.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if self.machine is not None:
            self._handle(self.machine.handle_timeout(self.endpoint.loop.time()))
            self._send_records()
            self._arm()

    # -- ending -----------------------------------------------------------------------

    def _down(self, reason: str, close: bool = False) -> None:
        """Traffic goes back to TLS until the channel authenticates a record again
        or the client's next handshake completes; with ``close`` the channel is
        gone for good (the client closed it)."""
        if self.machine is not None:
            self.machine = None
            self.endpoint.channels_up -= 1
            self.endpoint.counts["down"] += 1
            if self._timer is not None:
                self._timer.cancel()
                self._timer, self._timer_at = None, float("inf")
            log.info("%s: DTLS down (%s); traffic over TLS", self, reason)
        if close and self.channel is not None:
            ch, self.channel = self.channel, None
            self._forget_addr(ch)
            ch.free()

    def close(self) -> None:
        """The session ended: forget its App-ID, channel and handshakes."""
        self.endpoint.app_ids.pop(self.app_id, None)
        for ch in list(self.pending):
            self._handshake_over(ch, "superseded", "the session ended")
        if self.machine is not None:
            self.machine = None
            self.endpoint.channels_up -= 1
        ch, self.channel = self.channel, None
        if ch is not None:
            self._forget_addr(ch)
            ch.free()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
