"""Steering: every packet of a session reaches the worker that owns it.

``relay serve`` runs one datapath worker per core (relay.serve.worker). Each owns
one queue of the multi-queue TAP device and one socket of each ``SO_REUSEPORT``
group (CSTP's TCP, OpenVPN's TCP and UDP, DTLS's UDP); the control plane makes
them all and holds them for the relay's life, so that queue ``i`` and the
``i``-th socket of every group are worker ``i``'s and never renumbered (the
kernel moves the last queue or socket into the place of one that closes, which
would shift a surviving worker's under its sessions), and a restarted worker gets
them back with whatever waited in them.

What decides, by direction (the programs are ``ebpf/steer.c``):

- **kernel -> client**: the TAP's eBPF steering program (``TUNSETSTEERINGEBPF``)
  looks the frame's destination MAC up in a map the control plane fills when it
  opens a session (every frame the kernel sends a session carries its MAC, which
  names its worker). Chosen over tun's own flow steering (automq), which learns a
  flow's queue from the packets the queue wrote, so it knows only flows the client
  began, forgets a flow after 3 s of silence and keeps 1024 buckets for all of
  them; and over a userspace hand-off, which would move every misdelivered frame
  between processes.
- **client -> kernel over TCP** (CSTP, OpenVPN over TCP): a new connection goes
  to the worker with the fewest connections (a ``SO_ATTACH_REUSEPORT_EBPF``
  program reads it from a map the control plane updates as connections come and
  go; the kernel's hash would put three of four clients on one of two workers as
  often as not); a connection stays where it landed.
- **client -> kernel over UDP**: the hash of the 4-tuple keeps an address on one
  worker; a ``SO_ATTACH_REUSEPORT_EBPF`` program overrides it where that is not
  the owner: OpenVPN's data packets by the peer id's top byte (the worker's index,
  :func:`peer_id`), so a client that floats to a new address still reaches its
  session; DTLS ClientHellos by their App-ID's first byte (:func:`app_id`), the
  DTLS channel belonging to a CSTP session whose TCP connection the hash put on
  some worker; and the other datagrams of a floated OpenVPN client or of a DTLS
  channel by their source address, in maps the control plane fills when the
  owner asks (:meth:`Steering.set_peer`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import struct
from pathlib import Path
from typing import Any

from relay.cext import ffi, lib
from relay.errors import RelayError
from relay.fsutil import listen_tcp
from relay.packetlog.capture import mac_key
from relay.protocols import cstp, dtls
from relay.protocols.openvpn.wire import OPCODE_SHIFT, PEER_ID_MAX, Opcode

log = logging.getLogger("relay")

STEER_SOURCE = Path(__file__).resolve().parents[2] / "ebpf" / "steer.c"
# A worker's index travels in one byte (the peer id's top one, the App-ID's
# first): relay.config.WORKERS_MAX. The peer id's other 16 bits number a
# worker's OpenVPN sessions.
PEER_ID_WORKER_SHIFT = 16
PEER_ID_PER_WORKER = (PEER_ID_MAX >> 8) + 1
# Capacity of each steering map: the capture's session map's (one entry per
# session MAC; peers are a session's channels and floats).
MAP_ENTRIES = 65536
# TUNSETSTEERINGEBPF = _IOR('T', 224, int) (linux/if_tun.h).
TUNSETSTEERINGEBPF = 0x800454E0
# SO_ATTACH_REUSEPORT_EBPF (asm-generic/socket.h; the socket module lacks it).
SO_ATTACH_REUSEPORT_EBPF = 52
# The UDP sockets' buffers: 4 MiB each way, the most Linux lets a TCP socket's
# buffers grow to by default (tcp_wmem max), so a worker's UDP socket can absorb
# the bursts one TCP connection may send through a tunnel.
UDP_BUFFER_BYTES = 4 * 1024 * 1024
# SO_SNDBUFFORCE and SO_RCVBUFFORCE (Linux asm-generic/socket.h; the socket module
# lacks them): past net.core.[rw]mem_max, with CAP_NET_ADMIN.
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
# relay_steer_least's value that leaves new TCP connections to the kernel's hash
# (no worker serves).
HASH = 0xFFFFFFFF
# The peer maps, by the UDP service whose datagrams they steer.
OPENVPN, DTLS = "openvpn", "dtls"
_PEER_MAPS = {OPENVPN: b"relay_steer_openvpn_peers", DTLS: b"relay_steer_dtls_peers"}
# struct relay_peer: 16 address bytes (IPv4 as ::ffff:a.b.c.d), the port in
# network order, 2 bytes of padding.
_PEER_KEY = struct.Struct("!16sH2x")


def peer_id(worker: int, n: int) -> int:
    """The ``n``-th OpenVPN peer id of ``worker`` (``n`` modulo PEER_ID_PER_WORKER)."""
    return worker << PEER_ID_WORKER_SHIFT | n % PEER_ID_PER_WORKER


def app_id(worker: int) -> bytes:
    """A new DTLS App-ID of ``worker``: its index, then random bytes (248 bits of them)."""
    return bytes([worker]) + secrets.token_bytes(cstp.DTLS_APP_ID_LEN - 1)


def peer_key(peer: tuple[str, int]) -> bytes:
    """A client address as the peer maps key it."""
    ip = ipaddress.ip_address(peer[0].partition("%")[0])
    if ip.version == 4:
        ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    return _PEER_KEY.pack(ip.packed, peer[1])


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _refuse_taken(host: str, port: int, kind: socket.SocketKind, what: str) -> None:
    """One error line when another program holds the port: bound without
    SO_REUSEPORT, this bind fails where the group's sockets would quietly join
    the group of another relay that set it too."""
    if port == 0:  # any free port: none is taken
        return
    with socket.socket(_family(host), kind) as probe:
        if kind == socket.SOCK_STREAM:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise RelayError(f"{what}cannot listen on {host}:{port}: {exc.strerror}") from None


def tcp_group(host: str, port: int, n: int, what: str = "") -> list[socket.socket]:
    """``n`` listening sockets on ``host:port``, one per worker, in worker order
    (``what`` begins an error line: the config key)."""
    _refuse_taken(host, port, socket.SOCK_STREAM, what)
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(listen_tcp(host, port, reuseport=True))
            port = socks[0].getsockname()[1]  # port 0: the one the first was given
    except RelayError as exc:
        for sock in socks:
            sock.close()
        raise RelayError(f"{what}{exc}") from None
    return socks


def udp_group(host: str, port: int, n: int, what: str = "") -> list[socket.socket]:
    """``n`` UDP sockets bound to ``host:port``, one per worker, in worker order:
    their index in the SO_REUSEPORT group is the worker's, which the steering
    programs return."""
    _refuse_taken(host, port, socket.SOCK_DGRAM, f"{what}UDP: ")
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(_family(host), socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF),
                                 (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, UDP_BUFFER_BYTES)
                except PermissionError:  # without CAP_NET_ADMIN: up to net.core.*mem_max
                    sock.setsockopt(socket.SOL_SOCKET, plain, UDP_BUFFER_BYTES)
            sock.bind((host, port))
            sock.setblocking(False)
            port = socks[0].getsockname()[1]  # port 0: the one the first was given
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise RelayError(f"{what}UDP: cannot listen on {host}:{port}: {exc.strerror}") \
            from None
    return socks


class Steering:
    """The programs and their maps, loaded by the control plane."""

    def __init__(self) -> None:
        try:
            from bcc import BPF
        except ImportError as exc:
            raise RelayError("bcc is missing: apt-get install python3-bpfcc") from exc
        cflags = [f"-DRELAY_STEER_SESSIONS={MAP_ENTRIES}",
                  f"-DRELAY_OPCODE_SHIFT={OPCODE_SHIFT}",
                  f"-DRELAY_P_DATA_V2={int(Opcode.DATA_V2)}",
                  f"-DRELAY_DTLS_RECORD_HEADER={dtls.RECORD_HEADER_LEN}",
                  f"-DRELAY_DTLS_HANDSHAKE_HEADER={dtls.HANDSHAKE_HEADER_LEN}",
                  f"-DRELAY_DTLS_RANDOM_END={dtls.HELLO_RANDOM_END}",
                  f"-DRELAY_DTLS_CONTENT_HANDSHAKE={dtls.CONTENT_HANDSHAKE}",
                  f"-DRELAY_DTLS_CLIENT_HELLO={dtls.HANDSHAKE_CLIENT_HELLO}",
                  f"-DRELAY_DTLS_APP_ID_LEN={cstp.DTLS_APP_ID_LEN}"]
        try:
            self._bpf: Any = BPF(src_file=str(STEER_SOURCE).encode(), cflags=cflags)
            self._progs = {name: self._bpf.load_func(name, BPF.SOCKET_FILTER).fd
                           for name in (b"relay_steer_tap", b"relay_steer_openvpn",
                                        b"relay_steer_dtls", b"relay_steer_tcp")}
        except Exception as exc:
            raise RelayError(f"cannot load the steering programs: {exc}") from exc
        self._macs = self._bpf[b"relay_steer_macs"].map_fd
        self._least = self._bpf[b"relay_steer_least"].map_fd
        self._peers = {kind: self._bpf[name].map_fd for kind, name in _PEER_MAPS.items()}

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    # -- attaching ----------------------------------------------------------------

    def attach_tap(self, queue_fd: int) -> None:
        """Steer the TAP device (any of its queues names it) by destination MAC."""
        import fcntl

        try:
            fcntl.ioctl(queue_fd, TUNSETSTEERINGEBPF,
                        struct.pack("i", self._progs[b"relay_steer_tap"]))
        except OSError as exc:
            raise RelayError(f"cannot steer the TAP device's queues: {exc.strerror}") from None

    def attach_udp(self, kind: str, sock: socket.socket) -> None:
        """Steer the ``SO_REUSEPORT`` group ``sock`` is in (``kind``: OPENVPN or
        DTLS); its sockets must all be bound, in worker order."""
        self._attach(sock, b"relay_steer_openvpn" if kind == OPENVPN else b"relay_steer_dtls",
                     kind)

    def attach_tcp(self, sock: socket.socket) -> None:
        """Balance the TCP listeners' group ``sock`` is in by :meth:`set_least`;
        its sockets must all be listening, in worker order."""
        self._attach(sock, b"relay_steer_tcp", "TCP")

    def _attach(self, sock: socket.socket, prog: bytes, what: str) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF,
                            struct.pack("i", self._progs[prog]))
        except OSError as exc:
            raise RelayError(f"cannot steer the {what} sockets: {exc.strerror}") from None

    # -- the maps -----------------------------------------------------------------

    def set_least(self, worker: int) -> None:
        """New TCP connections go to ``worker`` (HASH: the kernel's choice)."""
        self._update(self._least, ffi.new("uint32_t *", 0), worker, "TCP listener")

    def set_mac(self, mac: bytes, worker: int) -> None:
        """Frames to ``mac`` go to ``worker``'s queue."""
        self._update(self._macs, ffi.new("uint64_t *", mac_key(mac)), worker, "session MAC")

    def drop_mac(self, mac: bytes) -> None:
        lib.relay_bpf_map_delete(self._macs, ffi.new("uint64_t *", mac_key(mac)))

    def set_peer(self, kind: str, peer: tuple[str, int], worker: int) -> None:
        """Datagrams of the ``kind`` service from ``peer`` go to ``worker``."""
        self._update(self._peers[kind], ffi.new("uint8_t[]", peer_key(peer)), worker,
                     f"{kind} peer")

    def drop_peer(self, kind: str, peer: tuple[str, int]) -> None:
        lib.relay_bpf_map_delete(self._peers[kind], ffi.new("uint8_t[]", peer_key(peer)))

    @staticmethod
    def _update(fd: int, key: Any, worker: int, what: str) -> None:
        if lib.relay_bpf_map_update(fd, key, ffi.new("uint32_t *", worker)) < 0:
            raise RelayError(f"cannot steer a {what}: {os.strerror(ffi.errno)}")
