"""Pure-Python twin of the datapath's batches (cext/batch.c, wrapped by
:mod:`relay.serve.batch`): the same functions, the same results. It is the
reference for the differential tests and the baseline of the benchmarks; the
datapath uses the C version, which makes no Python call per packet.

A batch is a buffer and an ``array("I")`` of spans: packet i is
``buf[spans[2i] : spans[2i] + spans[2i+1]]``. A span that is not inside its
buffer is skipped (dropped) by every function.
"""

from __future__ import annotations

import os
import socket
import struct
from array import array
from dataclasses import dataclass

from relay.serve.tap import ETH_HLEN

MAC_LEN = 6
# One socket address slot: the size of a sockaddr_in6, which a sockaddr_in fits.
ADDR_SIZE = 28
# relay_batch_group_by_mac sorts this many frames; later ones are a group each.
GROUP_MAX = 1024
IPV4_MIN_HDR = 20
IPV4_SRC = 12
ARP_IPV4_LEN = 28  # ARP for IPv4 over Ethernet
ARP_SENDER_MAC, ARP_SENDER_IP = 8, 14
ETHERTYPE_IPV4 = b"\x08\x00"
ETHERTYPE_IPV6 = b"\x86\xdd"
ETHERTYPE_ARP = b"\x08\x06"
_FAMILY = struct.Struct("=H")  # sa_family_t, host order
_PORT = struct.Struct("!H")
_V6_TAIL = struct.Struct("=I16sI")  # flowinfo (as stored), address, scope id


@dataclass(frozen=True, slots=True)
class Frames:
    """What :func:`frames_from` kept of a bridged client's frames."""

    frames: array[int]  # the frames to write
    ips: array[int]  # the IPv4 packets in them (for the hot path)
    spoofed: int
    not_ipv4: int


@dataclass(frozen=True, slots=True)
class Written:
    packets: int
    bytes: int  # without the head
    errors: int
    errno: int  # of the last failed write, 0 if none


def _inside(buf: bytes | bytearray | memoryview, off: int, n: int) -> bool:
    return off <= len(buf) and n <= len(buf) - off


def _ipv4_from(buf: bytes | bytearray | memoryview, off: int, n: int, src: bytes) -> bool:
    return n >= IPV4_MIN_HDR and buf[off] >> 4 == 4 \
        and bytes(buf[off + IPV4_SRC:off + IPV4_SRC + 4]) == src


def from_ipv4(buf: bytes | bytearray | memoryview, spans: array[int], src: bytes) -> array[int]:
    """The spans of the IPv4 packets from ``src`` (4 bytes), at least a minimal
    header long: attribution in the logs relies on no client sending as another."""
    out = array("I")
    for i in range(0, len(spans), 2):
        off, n = spans[i], spans[i + 1]
        if _inside(buf, off, n) and _ipv4_from(buf, off, n, src):
            out.extend((off, n))
    return out


def frames_from(buf: bytes | bytearray | memoryview, spans: array[int], mac: bytes,
                ip: bytes) -> Frames:
    """A bridged client's Ethernet frames from ``mac``: IPv4 from ``ip``, or ARP
    with ``mac`` and ``ip`` as the sender. Others are spoofed, or another
    ethertype (``not_ipv4``: IPv6, which the relay does not route, ...)."""
    frames, ips = array("I"), array("I")
    spoofed = not_ipv4 = 0
    for i in range(0, len(spans), 2):
        off, n = spans[i], spans[i + 1]
        if not _inside(buf, off, n) or n < ETH_HLEN \
                or bytes(buf[off + MAC_LEN:off + 2 * MAC_LEN]) != mac:
            spoofed += 1
            continue
        ethertype = bytes(buf[off + 2 * MAC_LEN:off + ETH_HLEN])
        l3, l3_len = off + ETH_HLEN, n - ETH_HLEN
        if ethertype == ETHERTYPE_IPV4:
            if not _ipv4_from(buf, l3, l3_len, ip):
                spoofed += 1
                continue
            ips.extend((l3, l3_len))
        elif ethertype == ETHERTYPE_ARP:
            if l3_len < ARP_IPV4_LEN \
                    or bytes(buf[l3 + ARP_SENDER_MAC:l3 + ARP_SENDER_MAC + MAC_LEN]) != mac \
                    or bytes(buf[l3 + ARP_SENDER_IP:l3 + ARP_SENDER_IP + 4]) != ip:
                spoofed += 1
                continue
        else:
            not_ipv4 += 1
            continue
        frames.extend((off, n))
    return Frames(frames, ips, spoofed, not_ipv4)


def ip_payloads(buf: bytes | bytearray | memoryview, spans: array[int],
                allow_ipv6: bool) -> array[int]:
    """The IP packets (Ethernet header off) of the frames whose ethertype is IPv4,
    or also IPv6 with ``allow_ipv6``."""
    out = array("I")
    for i in range(0, len(spans), 2):
        off, n = spans[i], spans[i + 1]
        if not _inside(buf, off, n) or n < ETH_HLEN:
            continue
        ethertype = bytes(buf[off + 2 * MAC_LEN:off + ETH_HLEN])
        if ethertype == ETHERTYPE_IPV4 or (allow_ipv6 and ethertype == ETHERTYPE_IPV6):
            out.extend((off + ETH_HLEN, n - ETH_HLEN))
    return out


def group_by_mac(buf: bytes | bytearray | memoryview, spans: array[int]) -> array[int]:
    """Order the frames (in place) so that those for the same destination MAC are
    together, in their order; the groups as (first frame, frames) pairs."""
    n = len(spans) // 2
    m = min(n, GROUP_MAX)
    order: dict[bytes, list[int]] = {}
    for i in range(m):
        order.setdefault(bytes(buf[spans[2 * i]:spans[2 * i] + MAC_LEN]), []).append(i)
    sorted_spans, groups = array("I"), array("I")
    for members in order.values():
        groups.extend((len(sorted_spans) // 2, len(members)))
        for i in members:
            sorted_spans.extend((spans[2 * i], spans[2 * i + 1]))
    spans[:2 * m] = sorted_spans
    for i in range(m, n):
        groups.extend((i, 1))
    return groups


def tap_read(fd: int, buf: bytearray, frame_max: int, max_frames: int) -> tuple[array[int], int]:
    """Frames read from ``fd`` (one per read) into ``buf`` until it would block,
    ``max_frames`` are read, or fewer than ``frame_max`` bytes of room are left;
    shorter than an Ethernet header are dropped. (spans, errno of a failed read
    other than EAGAIN or 0)."""
    spans = array("I")
    pos = 0
    view = memoryview(buf)
    while len(spans) // 2 < max_frames and len(buf) - pos >= frame_max:
        try:
            got = os.readv(fd, [view[pos:pos + frame_max]])
        except BlockingIOError:
            return spans, 0
        except InterruptedError:
            continue
        except OSError as exc:
            return spans, exc.errno or 0
        if got < ETH_HLEN:
            continue
        spans.extend((pos, got))
        pos += got
    return spans, 0


def tap_write(fd: int, head: bytes, buf: bytes | bytearray | memoryview,
              spans: array[int]) -> Written:
    """Each packet written to ``fd`` after ``head`` (one frame per write)."""
    packets = total = errors = err = 0
    view = memoryview(buf)
    for i in range(0, len(spans), 2):
        off, n = spans[i], spans[i + 1]
        if not _inside(buf, off, n):
            continue
        try:
            os.writev(fd, (head, view[off:off + n]) if head else (view[off:off + n],))
        except OSError as exc:
            errors += 1
            err = exc.errno or 0
            continue
        packets += 1
        total += n
    return Written(packets, total, errors, err)


def encode_address(addr: tuple[str, int] | tuple[str, int, int, int]) -> bytes:
    """A socket address as the kernel stores it, in an ADDR_SIZE slot."""
    if ":" in addr[0]:
        flow, scope = (addr[2], addr[3]) if len(addr) == 4 else (0, 0)
        raw = (_FAMILY.pack(socket.AF_INET6) + _PORT.pack(addr[1])
               + _V6_TAIL.pack(socket.htonl(flow), socket.inet_pton(socket.AF_INET6, addr[0]),
                               scope))
    else:
        raw = _FAMILY.pack(socket.AF_INET) + _PORT.pack(addr[1]) \
            + socket.inet_pton(socket.AF_INET, addr[0])
    return raw.ljust(ADDR_SIZE, b"\0")


def decode_address(raw: bytes) -> tuple[str, int]:
    """(IP, port) of an address slot (IPv4, or IPv6 as the socket gives it)."""
    (family,) = _FAMILY.unpack_from(raw)
    (port,) = _PORT.unpack_from(raw, 2)
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


def address_length(raw: bytes) -> int:
    """The socklen of an address slot."""
    return ADDR_SIZE if _FAMILY.unpack_from(raw)[0] == socket.AF_INET6 else 16


def udp_recv(sock: socket.socket, buf: bytearray, slot: int,
             n: int) -> tuple[array[int], bytes]:
    """At most ``n`` waiting datagrams, datagram i into ``buf[i * slot:]`` (cut to
    ``slot`` bytes); (spans, their source addresses in ADDR_SIZE slots)."""
    spans = array("I")
    addrs = bytearray()
    view = memoryview(buf)
    for i in range(n):
        try:
            got, addr = sock.recvfrom_into(view[i * slot:(i + 1) * slot], slot)
        except (BlockingIOError, InterruptedError):
            break
        spans.extend((i * slot, got))
        addrs += encode_address(addr)
    return spans, bytes(addrs)


def udp_send(sock: socket.socket, buf: bytes | bytearray | memoryview, spans: array[int],
             addr: bytes) -> int:
    """The packets to one address slot; how many the kernel took (the rest are the
    caller's to drop)."""
    target = decode_address(addr)
    view = memoryview(buf)
    sent = 0
    for i in range(0, len(spans), 2):
        off, n = spans[i], spans[i + 1]
        if not _inside(buf, off, n):
            continue
        try:
            sock.sendto(view[off:off + n], target)
        except OSError as exc:
            if sent or isinstance(exc, BlockingIOError):
                break  # the socket's buffer is full: the rest are dropped
            raise
        sent += 1
    return sent
