"""The OpenVPN side of ``relay serve``: a TCP listener and a UDP endpoint on the
``[openvpn] listen`` address, one :class:`OpenVPNLink` per client feeding the
sans-IO :class:`relay.protocols.openvpn.server.OpenVPNServer` and acting on its events through
the worker's :class:`relay.serve.link.LinkHost` interface.

``dev tun`` clients exchange IP packets, wrapped in Ethernet with the session MAC
like CSTP's; ``dev tap`` clients exchange whole frames, and the relay pushes
``lladdr`` so that the client's tap device takes the session MAC.

Over UDP nothing is kept for a peer until it proves it receives at its address:
its reset gets the stateless cookie answer of :func:`relay.protocols.openvpn.reset_reply`, and
only a packet that echoes the cookie (:func:`relay.protocols.openvpn.check_proof`) makes a
link, and with it the abuse admission, the reverse lookup, the login deadline and a
handshake slot. A reset with a new session id from the address of a session heard
from within the last minute gets no answer (the stock client would take the answer
for a new session); a proven handshake from the address of a session runs beside it
and takes the address over only when its TLS handshake and login complete.

The data channel runs in batches, with no Python per packet: the UDP endpoint
takes up to :data:`UDP_BATCH` datagrams per ``recvmmsg`` and hands each run of
data packets from one address to its session in one call (decrypt, replay
window, source check, stamp, TAP writes); frames from the TAP reach a session a
batch at a time and leave encrypted in one call, with one ``sendmmsg`` (UDP) or
one write (TCP).

A client whose address changes (a NAT rebinding) keeps its session once a data
packet from the new address authenticates under the session's keys (found by the
peer id in its header), as OpenVPN's float does: the session moves, with a
``client-float`` audit record; a packet that does not authenticate moves nothing.
What the client sends meanwhile waits in the link until the control plane has moved
the capture's attribution, so the packet log names the new address from the first
packet that came from there.
The peer id's top byte is the worker's index, so the data packets of a client
that floated still reach this worker, and the rest of its datagrams follow once
it moved (relay.serve.steer).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from array import array
from collections import Counter
from collections.abc import Callable
from typing import Any

from relay.config import Config
from relay.errors import RelayError
from relay.metrics import Metric
from relay.protocols.openvpn.cookie import Peer, Proof, check_proof, reset_reply
from relay.protocols.openvpn.datachannel import V2_OVERHEAD, Sealed
from relay.protocols.openvpn.events import (
    ClientAuth,
    Closed,
    Event,
    Floated,
    Packets,
    PeerDead,
    PeerExit,
    ProtocolError,
    PushRequest,
)
from relay.protocols.openvpn.server import PING_RESTART_S, OpenVPNServer, PushParams
from relay.protocols.openvpn.tlscrypt import TlsCrypt, parse_static_key
from relay.protocols.openvpn.wire import (
    MAX_PACKET_BYTES,
    OPCODE_SHIFT,
    Opcode,
    control_session_id,
)
from relay.serve import batch, steer
from relay.serve.abuse import TokenBucket
from relay.serve.batch import ADDR_SIZE, decode_address, encode_address
from relay.serve.datachannel import CDataChannel, udp_runs
from relay.serve.datapath import Datapath
from relay.serve.link import LinkBase, LinkHost, StreamLink
from relay.serve.tap import mac_str
from relay.tlsconf import server_context, tls_crypt_key

log = logging.getLogger("relay")

PROTOCOL = "OpenVPN"
# Datagrams from unknown addresses that are not a client's first packet are
# dropped; one log line per interval says how many, so a flood cannot fill the log.
DROP_LOG_INTERVAL_S = 10.0
# A reset with another session id from the address of a link that heard from its
# client this recently gets no answer: the stock client takes a server reset with an
# unknown session id for a new session (ssl.c tls_pre_decrypt, unless
# --single-session) and moves its tunnel onto it, so a forged reset "from" a live
# client must not reach it. A client silent for the pushed ping-restart (60 s) has
# restarted itself, and its address is free again.
LIVE_ADDRESS_QUIET_S = PING_RESTART_S
# After a UDP session ends, the client's last datagrams (explicit-exit-notify
# repeats its exit message once a second) are ignored quietly for this long.
UDP_LINGER_S = 5.0
# Datagrams taken per recvmmsg: wireguard-go's batch (conn.IdealBatchSize, 128).
UDP_BATCH = 128
# recvmmsg calls per wake-up before the other sockets get their turn (as the
# datapath reads at most TAP_READ_BATCH frames per wake-up).
UDP_BATCHES_PER_WAKEUP = 4
# A datagram's room in the receive buffer: one byte more than the largest packet
# accepted, so that a longer one shows as too long instead of arriving cut.
UDP_SLOT = MAX_PACKET_BYTES + 1
# The packets a client that floated sends while the control plane moves its
# session's capture attribution (one round trip over the control socket: under a
# millisecond idle, tens on a loaded host) are held, so that the packet log names the
# new address from the first packet that came from it. A millisecond of a 1 Gbit/s
# client is about 90 full-size packets; the hold keeps ten times that, the rest is
# dropped as a full queue would drop it (TCP sends it again).
FLOAT_HOLD_PACKETS = 1024


# Control datagrams from addresses without a session that the listener looks at
# (checks a proof, answers a reset: an HMAC each, and a send), per second and in a
# burst, for each worker's listener: what it protects is that worker's core, so
# the relay's whole budget grows with the cores it uses. A forger can make every
# datagram a reset from a new address: past this budget a datagram gets no look
# (its client sends it again after TLS_TIMEOUT_S, as after any loss) and the forger
# gets no more of the relay's CPU than the receive. OpenVPN 2.6 bounds the same
# answers (--connect-freq-initial, 100 per 10 s); 5x the [abuse] rate_total of new
# connections leaves room for the retransmitting clients of a restart.
STATELESS_PER_S = 1000.0
STATELESS_BURST = 2000


def client_software(peer_info: dict[str, str]) -> dict[str, Any]:
    return {"name": "OpenVPN", "version": peer_info.get("IV_VER"),
            "id": peer_info.get("IV_HWADDR"), "platform": peer_info.get("IV_PLAT"),
            "gui": peer_info.get("IV_GUI_VER")}


class OpenVPNListener:
    """TLS settings, peer ids, the UDP cookie key and address tables shared by every link."""

    def __init__(self, host: LinkHost, datapath: Datapath, cfg: Config, worker: int,
                 cookie_key: bytes) -> None:
        self.host = host
        self.datapath = datapath
        self.worker = worker  # the index peer ids carry (relay.serve.steer.peer_id)
        self.ssl_ctx, self.cert_path = server_context(cfg.data_dir, cfg.server.cert,
                                                      cfg.server.key)
        # Every worker's: a client's reset may be answered by one and its proof
        # reach another, after a restart in between.
        self.cookie_key = cookie_key
        self.tls_crypt = (TlsCrypt(parse_static_key(tls_crypt_key(
            cfg.data_dir))) if cfg.openvpn.tls_crypt else None)
        self.udp_links: dict[Peer, OpenVPNLink] = {}  # the address's session
        # A proven handshake from the address of a live session, until it completes.
        self.udp_pending: dict[Peer, OpenVPNLink] = {}
        self.udp_by_peer_id: dict[int, OpenVPNLink] = {}  # where a float looks
        self.lingering: dict[Peer, float] = {}  # ended UDP peers -> until
        self.admitting: set[Peer] = set()  # proven peers the abuse defences are asked about
        self.counts: Counter[str] = Counter()  # resets answered, proofs
        self.peer_ids: set[int] = set()
        self._next_peer = 0  # of this worker's peer ids
        self.udp: socket.socket | None = None
        self.tcp: socket.socket | None = None
        self._receive = bytearray(UDP_BATCH * UDP_SLOT)
        self._dropped = 0
        self._last_drop_log = 0.0
        self._stateless = TokenBucket(STATELESS_PER_S, STATELESS_BURST, time.monotonic())

    def start(self, tcp: socket.socket, udp: socket.socket) -> None:
        """Serve on this worker's sockets of the ``[openvpn] listen`` address
        (relay.serve.steer makes them): TCP connections come through the worker's
        accept loop, which admits each, as the UDP endpoint does a proven peer."""
        self.tcp, self.udp = tcp, udp
        udp.setblocking(False)
        asyncio.get_running_loop().add_reader(udp.fileno(), self._on_udp_readable)

    def close(self) -> None:
        if self.tcp is not None:
            self.tcp.close()
        if self.udp is not None:
            asyncio.get_running_loop().remove_reader(self.udp.fileno())
            self.udp.close()
            self.udp = None

    def allocate_peer_id(self) -> int:
        """A peer id of this worker's no link holds."""
        for _ in range(steer.PEER_ID_PER_WORKER):
            pid = steer.peer_id(self.worker, self._next_peer)
            # The next one starts after it: a freed id is not reused at once, so a
            # late packet of an ended session meets no new one under its peer id.
            self._next_peer = (self._next_peer + 1) % steer.PEER_ID_PER_WORKER
            if pid not in self.peer_ids:
                self.peer_ids.add(pid)
                return pid
        raise RelayError(f"all {steer.PEER_ID_PER_WORKER} OpenVPN peer ids of worker "
                         f"{self.worker} are in use")

    def accept(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        link = OpenVPNTcpLink(self, peer, sock.getsockname()[0])
        self.host.spawn(link.start(sock))

    # -- UDP input ----------------------------------------------------------------

    def _on_udp_readable(self) -> None:
        """Datagrams in batches: each run of data packets from one address goes to
        its session in one call, anything else a datagram at a time."""
        assert self.udp is not None
        buf = self._receive
        for _ in range(UDP_BATCHES_PER_WAKEUP):
            try:
                spans, addrs = batch.udp_recv(self.udp, buf, UDP_SLOT, UDP_BATCH)
            except OSError as exc:
                log.debug("OpenVPN/UDP: %s", exc.strerror)
                return
            runs = udp_runs(buf, spans, addrs, ADDR_SIZE, MAX_PACKET_BYTES)
            for r in range(0, len(runs), 3):
                first, count, data = runs[r], runs[r + 1], runs[r + 2]
                addr = decode_address(addrs[first * ADDR_SIZE:(first + 1) * ADDR_SIZE])
                if data:
                    self._data_run(buf, spans[2 * first:2 * (first + count)], addr)
                    continue
                for i in range(first, first + count):
                    off, n = spans[2 * i], spans[2 * i + 1]
                    self.datagram(bytes(buf[off:off + n]), addr)
            if len(spans) < 2 * UDP_BATCH:
                return

    def _data_run(self, buf: bytearray, spans: array[int], addr: Peer) -> None:
        """Data packets from one address (of one peer id): to the address's session,
        or to the session of their peer id, which moves here if one authenticates."""
        link = self.udp_links.get(addr)
        if link is not None:
            link.datagrams(buf, spans)
            return
        first = spans[0]
        moving = None
        if buf[first] >> OPCODE_SHIFT == Opcode.DATA_V2:
            moving = self.udp_by_peer_id.get(int.from_bytes(buf[first + 1:first + 4], "big"))
        if moving is not None and moving.may_float():
            if not moving.float_datagrams(buf, spans, addr):
                self._drop(addr, "data packet(s) that do not authenticate for their peer id",
                           len(spans) // 2)
        elif self.lingering.get(addr, 0.0) < time.monotonic():
            self._drop(addr, "data packet(s) of no session", len(spans) // 2)

    def datagram(self, data: bytes, addr: Peer) -> None:
        link = self.udp_links.get(addr)
        if link is not None:
            sid = control_session_id(data)
            if sid is None or sid == link.proto.remote_session_id:  # data, or its own
                link.datagram(data)
                return
            pending = self.udp_pending.get(addr)
            if pending is not None and sid == pending.proto.remote_session_id:
                pending.datagram(data)
                return
        # Another session id from a link's address is a stranger too: a restarted
        # client, or anyone forging that address.
        if not self._stateless.take(time.monotonic()):
            self.counts["unanswered"] += 1
            return
        now = time.time()
        proof = check_proof(self.cookie_key, addr, data, now, self.tls_crypt)
        if proof is not None:
            self.counts["proofs"] += 1
            self._start(addr, proof, data)
            return
        if link is not None and link.quiet_s() < LIVE_ADDRESS_QUIET_S:
            self._drop(addr, f"{len(data)}-byte datagram of another session id from a live "
                       "session's address")
            return
        reply = reset_reply(self.cookie_key, addr, data, now, self.tls_crypt)
        if reply is not None:
            self.counts["resets-answered"] += 1
            self.sendto(reply, addr)
        elif self.lingering.get(addr, 0.0) < time.monotonic():
            self._drop(addr, f"{len(data)}-byte datagram that is neither a reset nor the "
                       "answer to the relay's")

    def _start(self, addr: Peer, proof: Proof, data: bytes) -> None:
        """The peer proved its address: its link starts once the abuse defences
        admit it (a proof sent again meanwhile is ignored)."""
        if addr in self.admitting:
            return
        self.admitting.add(addr)
        self.host.spawn(self._admit(addr, proof, data))

    async def _admit(self, addr: Peer, proof: Proof, data: bytes) -> None:
        try:
            refused = await self.host.admit(addr[0])
        finally:
            self.admitting.discard(addr)
        if refused is not None:
            return
        link = OpenVPNLink(self, addr, _local_ip_towards(addr), tcp=False, proof=proof)
        link.transport_send = link.send_datagram
        self.udp_by_peer_id[link.proto.peer_id] = link
        if addr not in self.udp_links:
            self.udp_links[addr] = link
        else:
            superseded = self.udp_pending.get(addr)
            self.udp_pending[addr] = link
            if superseded is not None:  # the client restarted again meanwhile
                superseded.end_quietly("client-restart")
        link.begin()
        link.datagram(data)

    def handshake_complete(self, link: OpenVPNLink) -> None:
        """A link's login succeeded: if it ran beside a live session of its address,
        it takes the address over and that session ends."""
        addr = (link.peer_ip, link.peer_port)
        if self.udp_pending.get(addr) is not link:
            return
        del self.udp_pending[addr]
        old = self.udp_links[addr]
        self.udp_links[addr] = link
        log.info("%s: a new session from the same address replaces the old one", link)
        old.end_quietly("client-restart")

    def moved(self, link: OpenVPNLink, addr: Peer) -> None:
        """A session's client now sends from ``addr`` (no session has it): the
        session takes it, and a handshake beside it takes its old address."""
        old = (link.peer_ip, link.peer_port)
        pending = self.udp_pending.pop(old, None)
        if pending is not None:
            self.udp_links[old] = pending
        else:
            del self.udp_links[old]
        self.udp_links[addr] = link
        self.lingering.pop(addr, None)
        link.moved(addr)

    def ended(self, addr: Peer) -> None:
        """A UDP link ended: a handshake beside it takes its place; else forget the
        address, and ignore its stragglers for a while."""
        now = time.monotonic()
        pending = self.udp_pending.pop(addr, None)
        if pending is not None:
            self.udp_links[addr] = pending
            return
        self.udp_links.pop(addr, None)
        for old in [a for a, until in self.lingering.items() if until < now]:
            del self.lingering[old]
        self.lingering[addr] = now + UDP_LINGER_S

    def metrics(self) -> list[Metric]:
        return [
            Metric("relay_openvpn_resets_answered_total", "counter",
                   "OpenVPN UDP resets answered statelessly (a cookie, no state kept).")
            .add(self.counts["resets-answered"]),
            Metric("relay_openvpn_unanswered_total", "counter",
                   "UDP control datagrams from addresses without a session left unlooked "
                   f"at past each worker's listener's budget of {STATELESS_PER_S:g}/s (a flood; "
                   "clients send theirs again).")
            .add(self.counts["unanswered"]),
            Metric("relay_openvpn_proofs_total", "counter",
                   "OpenVPN UDP peers that echoed a cookie (proved their address); the "
                   "abuse defences admit them or not.")
            .add(self.counts["proofs"]),
            Metric("relay_openvpn_floats_total", "counter",
                   "OpenVPN UDP sessions that followed their client to a new address.")
            .add(self.counts["floats"]),
            Metric("relay_openvpn_udp_peers", "gauge",
                   "OpenVPN UDP peers with state: sessions and handshakes.")
            .add(len(self.udp_links) + len(self.udp_pending)),
        ]

    # -- UDP output ---------------------------------------------------------------

    def sendto(self, pkt: bytes, addr: Peer) -> None:
        """One control packet. When the socket's buffer is full it is dropped: the
        control channel's reliability layer sends it again."""
        if self.udp is None:
            return
        try:
            self.udp.sendto(pkt, addr)
        except OSError as exc:
            log.debug("OpenVPN/UDP: sending to %s:%d: %s", addr[0], addr[1], exc.strerror)

    def send_batch(self, sealed: Sealed, sockaddr: bytes) -> int:
        """Data packets to one address in one sendmmsg; how many the kernel took."""
        if self.udp is None:
            return 0
        try:
            return batch.udp_send(self.udp, sealed.data, sealed.spans, sockaddr)
        except OSError as exc:
            log.debug("OpenVPN/UDP: sending data: %s", exc.strerror)
            return 0

    def _drop(self, addr: Peer, why: str, count: int = 1) -> None:
        self.datapath.traffic.dropped["openvpn-unproven"] += count
        self._dropped += count
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            log.warning("OpenVPN/UDP: dropped %d datagram(s) from unknown peers, the last "
                        "from %s:%d: %s", self._dropped, addr[0], addr[1], why)
            self._dropped = 0
            self._last_drop_log = now


def _local_ip_towards(addr: Peer) -> str:
    """The relay address a UDP client talks to when the endpoint listens on a
    wildcard: the source address the kernel picks for replies to it."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(addr)  # no packet is sent: this only routes
        return str(probe.getsockname()[0])


class OpenVPNLink(LinkBase[Event]):
    """One client, over UDP (driven by the listener's endpoint) or TCP (see
    :class:`OpenVPNTcpLink`), from its first packet to its end."""

    def __init__(self, listener: OpenVPNListener, peer: Peer, local_ip: str, *,
                 tcp: bool, proof: Proof | None = None) -> None:
        super().__init__(listener.host, peer, local_ip)
        self.listener = listener
        self.datapath = listener.datapath
        self.traffic = listener.datapath.traffic
        self.tcp = tcp
        # Where packets go: set once the transport exists (a shutdown may reach a
        # TCP link before that, and then there is no one to tell).
        self.transport_send: Callable[[bytes], None] = lambda pkt: None
        self.proto = OpenVPNServer(listener.ssl_ctx, tcp=tcp,
                                   peer_id=listener.allocate_peer_id(), now=self.loop.time(),
                                   proof=proof, tls_crypt=listener.tls_crypt,
                                   wall=int(time.time()), data_channel=CDataChannel())
        self.software: dict[str, Any] | None = None
        self.opening = False
        self.sockaddr = encode_address(peer)  # UDP: where data packets go, for sendmmsg
        # The client's packets while a float of it is being recorded (see moved).
        self._moves_pending = 0
        self._held: list[Event] = []
        self._held_count = 0

    def __repr__(self) -> str:
        return f"{'TCP' if self.tcp else 'UDP'} {self.peer_ip}:{self.peer_port}"

    def quiet_s(self) -> float:
        """Seconds since the client's last packet that reached this link's session."""
        return self.loop.time() - self.proto.last_rx

    # -- input ----------------------------------------------------------------------

    def datagram(self, data: bytes) -> None:
        self._handle(self.proto.receive_datagram(data, self.loop.time()))

    def datagrams(self, buf: bytearray, spans: array[int]) -> None:
        """Data packets from the client's address, all those of one receive."""
        self._handle(self.proto.receive_datagrams(buf, spans, self.loop.time()))

    def may_float(self) -> bool:
        """Whether data packets from another address may move this link there: a
        UDP session that holds its address (not a handshake beside another)."""
        return (self.session is not None and not self.closed
                and self.listener.udp_links.get((self.peer_ip, self.peer_port)) is self)

    def float_datagrams(self, buf: bytearray, spans: array[int], addr: Peer) -> bool:
        """Data packets of this session's peer id from ``addr``, where no session
        is: if one authenticates, the client has moved there (OpenVPN's float).
        Whether it moved."""
        events = self.proto.receive_datagrams(buf, spans, self.loop.time(), moved=True)
        if not events:
            return False
        assert isinstance(events[0], Floated)
        self.listener.moved(self, addr)
        self._handle(events[1:])
        return True

    def moved(self, addr: Peer) -> None:
        """The client sends from ``addr`` now (the listener's tables say so already):
        replies go there at once; what it sends waits until the move is recorded."""
        old = (self.peer_ip, self.peer_port)
        self.peer_ip, self.peer_port = addr
        self.sockaddr = encode_address(addr)
        self.listener.counts["floats"] += 1
        self._lookup = self.host.look_up(self)
        self._moves_pending += 1
        self.host.spawn(self._record_move(old), self)

    async def _record_move(self, old: Peer) -> None:
        try:
            await self.host.client_moved(self, old)
        finally:
            self._moves_pending -= 1
            if not self._moves_pending:
                held, self._held, self._held_count = self._held, [], 0
                if not self.closed:
                    self._handle(held)

    def _hold(self, packets: Packets) -> None:
        """Keep a copy of ``packets`` (their buffer is the next receive's) until
        the move in progress is recorded."""
        spans = packets.spans
        count = len(spans) // 2
        if self._held_count + count > FLOAT_HOLD_PACKETS:
            self.traffic.dropped["float-hold-full"] += count
            return
        data, kept = bytearray(), array("I")
        for i in range(0, len(spans), 2):
            kept.extend((len(data), spans[i + 1]))
            data += packets.data[spans[i]:spans[i] + spans[i + 1]]
        self._held.append(Packets(data, kept))
        self._held_count += count

    def _handle(self, events: list[Event]) -> None:
        host = self.host
        for ev in events:
            if isinstance(ev, Packets):
                s = self.session
                if s is not None:
                    if self._moves_pending:
                        self._hold(ev)
                    elif self.proto.dev_type == "tap":
                        self.datapath.to_kernel_frames(s, ev.data, ev.spans)
                    else:
                        self.datapath.to_kernel_batch(s, ev.data, ev.spans)
            elif isinstance(ev, ClientAuth):
                if host.check_login(self, ev.username, ev.password):
                    self.software = client_software(ev.peer_info)
                    if not self.tcp:
                        self.listener.handshake_complete(self)
                else:
                    self._handle(self.proto.auth_failed("unknown user or wrong password",
                                                        self.loop.time()))
                    return
            elif isinstance(ev, PushRequest):
                if self.session is None and not self.opening and self.software is not None:
                    self.opening = True
                    host.spawn(self._open_session(), self)
            elif isinstance(ev, PeerExit):
                self._flush()
                self._end("client-disconnect", None, detail=ev.reason)
                self._close()
                return
            elif isinstance(ev, PeerDead):
                self._peer_dead(ev.reason)
                return
            elif isinstance(ev, ProtocolError):
                host.count_handshake_failure(ev.reason)
                log.warning("dropped %s: %s", self, ev.message)
                self._flush()
                self._end("protocol-error", ev.message)
                self._close()
                return
            elif isinstance(ev, Closed):
                self._flush()
                self._close()
                return
        self._flush()

    async def _open_session(self) -> None:
        assert self.software is not None
        # Refused (AUTH_FAILED,TEMP with the reason) when the relay is full.
        lease = await self._open(PROTOCOL, self.software)
        if lease is None:
            return
        params = PushParams(
            address=lease.address, netmask=lease.netmask, gateway=lease.gateway, mtu=lease.mtu,
            dns=lease.dns,
            lladdr=mac_str(lease.session.mac) if self.proto.dev_type == "tap" else None)
        self._handle(self.proto.push_reply(params, self.loop.time()))

    def _refusal(self, message: str) -> list[Event]:
        return self.proto.auth_failed(message, self.loop.time(), temporary=True)

    # -- output ---------------------------------------------------------------------

    def from_kernel_batch(self, buf: bytearray, spans: array[int]) -> None:
        s = self.session
        if s is None or self.closed:
            return
        # A tap client's device takes whole frames; a tun client's, IPv4 packets.
        payloads = spans if self.proto.dev_type == "tap" else \
            batch.ip_payloads(buf, spans, allow_ipv6=False)
        count = len(payloads) // 2
        if not count:
            return
        traffic = self.traffic
        if self.paused:
            traffic.dropped["client-queue-full"] += count
            return
        sealed = self.proto.seal(buf, payloads)
        if sealed is None or not sealed.count:
            return
        if self.tcp:
            self.transport_send(bytes(sealed.data))  # the channel reuses its buffer
            sent, sent_bytes = sealed.count, sealed.payload_bytes
        else:
            sent = self.listener.send_batch(sealed, self.sockaddr)
            sent_bytes = sealed.payload_bytes if sent == sealed.count else \
                sum(sealed.spans[2 * i + 1] - V2_OVERHEAD for i in range(sent))
            if sent < sealed.count:  # the socket's buffer is full
                traffic.dropped["client-queue-full"] += sealed.count - sent
        s.packets_out += sent
        s.bytes_out += sent_bytes
        traffic.packets_out += sent
        traffic.bytes_out += sent_bytes
        self.proto.note_sent(self.loop.time())

    def send_datagram(self, pkt: bytes) -> None:
        """A control packet (or keepalive ping) to the client's address (UDP)."""
        self.listener.sendto(pkt, (self.peer_ip, self.peer_port))

    def _flush(self) -> None:
        for pkt in self.proto.packets_to_send():
            self.transport_send(pkt)
        self._arm()

    # -- teardown -------------------------------------------------------------------

    def terminate(self, reason: str, message: str) -> None:
        """End from the relay's side (shutdown, ban): tell the client, then close."""
        self.proto.disconnect(message, restart=reason != "banned", now=self.loop.time())
        self._flush()
        self._end(reason, None)
        self._close()

    def end_quietly(self, reason: str) -> None:
        """End without a word to the address: a newer session of the client's own
        holds it now, and would take a packet of this one for an error."""
        self._end(reason, None)
        self._close()

    def _forget(self) -> None:
        if self.closed:
            return
        super()._forget()
        if self.proto.drops:
            summary = ", ".join(f"{n} x {why}" for why, n in self.proto.drops.most_common())
            log.warning("%s: dropped packets: %s", self, summary)
        self.listener.peer_ids.discard(self.proto.peer_id)
        addr = (self.peer_ip, self.peer_port)
        if not self.tcp:
            if self.listener.udp_by_peer_id.get(self.proto.peer_id) is self:
                del self.listener.udp_by_peer_id[self.proto.peer_id]
            if self.listener.udp_links.get(addr) is self:
                self.listener.ended(addr)
            elif self.listener.udp_pending.get(addr) is self:
                del self.listener.udp_pending[addr]


class OpenVPNTcpLink(OpenVPNLink, StreamLink[Event]):
    """One client TCP connection: 16-bit length framing over the stream."""

    def __init__(self, listener: OpenVPNListener, peer: Peer, local_ip: str) -> None:
        super().__init__(listener, peer, local_ip, tcp=True)

    def _start_failed(self, exc: OSError, elapsed_s: float) -> None:
        log.warning("refused %s: %s", self, exc.strerror)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.transport is not None:
            self.transport_send = self.transport.write

    def data_received(self, data: bytes) -> None:
        self._handle(self.proto.receive_data(data, self.loop.time()))
