"""The OpenVPN side of ``relay serve``: a TCP listener and a UDP endpoint on the
``[openvpn] listen`` address, one :class:`OpenVPNLink` per client feeding the
sans-IO :class:`relay.protocols.openvpn.server.OpenVPNServer` and acting on its events through
the core's :class:`relay.serve.link.LinkHost` interface.

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
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from relay.config import Config, parse_hostport
from relay.fsutil import listen_tcp
from relay.metrics import Metric
from relay.protocols.openvpn.cookie import Peer, Proof, check_proof, new_cookie_key, reset_reply
from relay.protocols.openvpn.events import (
    ClientAuth,
    Closed,
    Event,
    Packet,
    PeerDead,
    PeerExit,
    ProtocolError,
    PushRequest,
)
from relay.protocols.openvpn.server import PING_RESTART_S, OpenVPNServer, PushParams
from relay.protocols.openvpn.tlscrypt import TlsCrypt, parse_static_key
from relay.protocols.openvpn.wire import PEER_ID_MAX, control_session_id
from relay.serve.datapath import ETHERTYPE_IPV4, Datapath
from relay.serve.link import LinkBase, LinkHost, StreamLink
from relay.serve.tap import ETH_HLEN, mac_str
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


def client_software(peer_info: dict[str, str]) -> dict[str, Any]:
    return {"name": "OpenVPN", "version": peer_info.get("IV_VER"),
            "id": peer_info.get("IV_HWADDR"), "platform": peer_info.get("IV_PLAT"),
            "gui": peer_info.get("IV_GUI_VER")}


class OpenVPNListener:
    """TLS settings, peer ids, the UDP cookie key and address tables shared by every link."""

    def __init__(self, host: LinkHost, datapath: Datapath, cfg: Config) -> None:
        self.host = host
        self.datapath = datapath
        self.listen = parse_hostport(cfg.openvpn.listen)
        self.ssl_ctx, self.cert_path = server_context(cfg.data_dir, cfg.server.cert,
                                                      cfg.server.key)
        self.cookie_key = new_cookie_key()
        self.tls_crypt = (TlsCrypt(parse_static_key(tls_crypt_key(
            cfg.data_dir))) if cfg.openvpn.tls_crypt else None)
        self.udp_links: dict[Peer, OpenVPNLink] = {}  # the address's session
        # A proven handshake from the address of a live session, until it completes.
        self.udp_pending: dict[Peer, OpenVPNLink] = {}
        self.lingering: dict[Peer, float] = {}  # ended UDP peers -> until
        self.counts: Counter[str] = Counter()  # resets answered, proofs
        self.peer_ids: set[int] = set()
        self._next_peer_id = 0
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: socket.socket | None = None
        self._dropped = 0
        self._last_drop_log = 0.0

    async def start(self) -> socket.socket:
        """Listen on TCP and UDP; the TCP socket, for the core to accept on (its
        accept loop admits each connection, as the UDP endpoint does a proven peer)."""
        host, port = self.listen
        self.tcp = listen_tcp(host, port)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpEndpoint(self), local_addr=(host, port))
        self.udp = cast(asyncio.DatagramTransport, transport)
        log.info("listening on %s:%d (OpenVPN, TCP and UDP)", host, port)
        return self.tcp

    def close(self) -> None:
        if self.tcp is not None:
            self.tcp.close()
        if self.udp is not None:
            self.udp.close()

    def allocate_peer_id(self) -> int:
        while self._next_peer_id in self.peer_ids:
            self._next_peer_id = (self._next_peer_id + 1) % (PEER_ID_MAX + 1)
        pid = self._next_peer_id
        self.peer_ids.add(pid)
        return pid

    def accept(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        link = OpenVPNTcpLink(self, peer, sock.getsockname()[0])
        self.host.spawn(link.start(sock))

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
            self._sendto(reply, addr)
        elif self.lingering.get(addr, 0.0) < time.monotonic():
            self._drop(addr, f"{len(data)}-byte datagram that is neither a reset nor the "
                       "answer to the relay's")

    def _start(self, addr: Peer, proof: Proof, data: bytes) -> None:
        """The peer proved its address: its link starts."""
        if self.host.admit(addr[0]) is not None:
            return
        link = OpenVPNLink(self, addr, _local_ip_towards(addr), tcp=False, proof=proof)
        link.transport_send = lambda pkt: self._sendto(pkt, addr)
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
            Metric("relay_openvpn_proofs_total", "counter",
                   "OpenVPN UDP peers that echoed a cookie (proved their address); the "
                   "abuse defences admit them or not.")
            .add(self.counts["proofs"]),
            Metric("relay_openvpn_udp_peers", "gauge",
                   "OpenVPN UDP peers with state: sessions and handshakes.")
            .add(len(self.udp_links) + len(self.udp_pending)),
        ]

    def _sendto(self, pkt: bytes, addr: Peer) -> None:
        if self.udp is not None:
            self.udp.sendto(pkt, addr)

    def _drop(self, addr: Peer, why: str) -> None:
        self.datapath.traffic.dropped["openvpn-unproven"] += 1
        self._dropped += 1
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


class _UdpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, listener: OpenVPNListener) -> None:
        self.listener = listener

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.listener.datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("OpenVPN/UDP: %s", exc)


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
                                           peer_id=listener.allocate_peer_id(),
                                           now=self.loop.time(), proof=proof,
                                           tls_crypt=listener.tls_crypt, wall=int(time.time()))
        self.software: dict[str, Any] | None = None
        self.opening = False

    def __repr__(self) -> str:
        return f"{'TCP' if self.tcp else 'UDP'} {self.peer_ip}:{self.peer_port}"

    def quiet_s(self) -> float:
        """Seconds since the client's last packet that reached this link's session."""
        return self.loop.time() - self.proto.last_rx

    # -- input ----------------------------------------------------------------------

    def datagram(self, data: bytes) -> None:
        self._handle(self.proto.receive_datagram(data, self.loop.time()))

    def _handle(self, events: list[Event]) -> None:
        host = self.host
        for ev in events:
            if isinstance(ev, Packet):
                s = self.session
                if s is not None:
                    if self.proto.dev_type == "tap":
                        self.datapath.to_kernel_frame(s, ev.data)
                    else:
                        self.datapath.to_kernel(s, ev.data)
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
                    refusal = host.refuse_reason(self)
                    if refusal is not None:
                        self._refuse(refusal)
                        return
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
        # Refused here when the relay filled up since the push request was checked.
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

    def from_kernel(self, frame: bytes) -> None:
        s = self.session
        if s is None or self.closed:
            return
        if self.proto.dev_type == "tap":
            payload = frame
        elif frame[12:14] == ETHERTYPE_IPV4:
            payload = frame[ETH_HLEN:]
        else:
            return
        if self.paused:
            self.traffic.dropped["client-queue-full"] += 1
            return
        pkt = self.proto.encrypt(payload)
        if pkt is None:
            return
        s.packets_out += 1
        s.bytes_out += len(payload)
        traffic = self.traffic
        traffic.packets_out += 1
        traffic.bytes_out += len(payload)
        self.transport_send(pkt)
        self.proto.note_sent(self.loop.time())

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
