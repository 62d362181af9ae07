"""The datapath's batches in C (cext/batch.c): TAP reads and writes, UDP
``recvmmsg``/``sendmmsg``, the source check of a session's packets and the
payloads of the frames the kernel sends it, each one call for all the packets of
a wake-up. :mod:`relay.serve.batch_py` is the pure-Python twin, which states the
rules; the functions here have its signatures and its results.
"""

from __future__ import annotations

import errno
import os
import socket
from array import array

from relay.cext import ffi, lib
from relay.errors import RelayError
from relay.serve.batch_py import (
    ADDR_SIZE,
    ETH_HLEN,
    GROUP_MAX,
    MAC_LEN,
    Frames,
    Written,
    address_length,
    decode_address,
    encode_address,
)

__all__ = [
    "ADDR_SIZE",
    "Frames",
    "Written",
    "address_length",
    "decode_address",
    "encode_address",
    "frames_from",
    "from_ipv4",
    "group_by_mac",
    "ip_payloads",
    "tap_read",
    "tap_write",
    "udp_recv",
    "udp_send",
]

if (lib.RELAY_BATCH_ADDR_SIZE, lib.RELAY_BATCH_ETH_HLEN, lib.RELAY_BATCH_MAC_LEN,
        lib.RELAY_BATCH_GROUP_MAX) != (ADDR_SIZE, ETH_HLEN, MAC_LEN, GROUP_MAX):
    raise RelayError("cext/batch.h and relay/serve/batch_py.py disagree on a size; "
                     "rebuild with pip install .")

_from_buffer = ffi.from_buffer
_U8 = ffi.typeof("uint8_t[]")
_U32 = ffi.typeof("uint32_t[]")


def _spans(n: int) -> array[int]:
    return array("I", bytes(8 * n))


def from_ipv4(buf: bytes | bytearray | memoryview, spans: array[int], src: bytes) -> array[int]:
    n = len(spans) // 2
    out = _spans(n)
    kept = lib.relay_batch_from_ipv4(_from_buffer(_U8, buf), len(buf), _from_buffer(_U32, spans),
                                     n, src, _from_buffer(_U32, out, True))
    del out[2 * kept:]
    return out


def frames_from(buf: bytes | bytearray | memoryview, spans: array[int], mac: bytes,
                ip: bytes) -> Frames:
    n = len(spans) // 2
    frames, ips = _spans(n), _spans(n)
    counts = ffi.new("uint32_t[2]")
    n_ip = ffi.new("size_t *")
    kept = lib.relay_batch_frames_from(
        _from_buffer(_U8, buf), len(buf), _from_buffer(_U32, spans), n, mac, ip,
        _from_buffer(_U32, frames, True), _from_buffer(_U32, ips, True), n_ip, counts,
        counts + 1)
    del frames[2 * kept:]
    del ips[2 * n_ip[0]:]
    return Frames(frames, ips, counts[0], counts[1])


def ip_payloads(buf: bytes | bytearray | memoryview, spans: array[int],
                allow_ipv6: bool) -> array[int]:
    n = len(spans) // 2
    out = _spans(n)
    kept = lib.relay_batch_ip_payloads(_from_buffer(_U8, buf), len(buf),
                                       _from_buffer(_U32, spans), n, allow_ipv6,
                                       _from_buffer(_U32, out, True))
    del out[2 * kept:]
    return out


def group_by_mac(buf: bytes | bytearray | memoryview, spans: array[int]) -> array[int]:
    n = len(spans) // 2
    groups = _spans(n)
    count = lib.relay_batch_group_by_mac(_from_buffer(_U8, buf), _from_buffer(_U32, spans, True),
                                         n, _from_buffer(_U32, groups, True))
    del groups[2 * count:]
    return groups


def tap_read(fd: int, buf: bytearray, frame_max: int, max_frames: int) -> tuple[array[int], int]:
    spans = _spans(max_frames)
    err = ffi.new("int *")
    n = lib.relay_batch_tap_read(fd, _from_buffer(_U8, buf, True), len(buf), frame_max,
                                 max_frames, _from_buffer(_U32, spans, True), err)
    del spans[2 * n:]
    return spans, err[0]


def tap_write(fd: int, head: bytes, buf: bytes | bytearray | memoryview,
              spans: array[int]) -> Written:
    total = ffi.new("uint64_t *")
    errors = ffi.new("uint32_t *")
    err = ffi.new("int *")
    packets = lib.relay_batch_tap_write(fd, head, len(head), _from_buffer(_U8, buf), len(buf),
                                        _from_buffer(_U32, spans), len(spans) // 2, total,
                                        errors, err)
    return Written(packets, total[0], errors[0], err[0])


def udp_recv(sock: socket.socket, buf: bytearray, slot: int,
             n: int) -> tuple[array[int], bytes]:
    spans = _spans(n)
    addrs = bytearray(n * ADDR_SIZE)
    got = lib.relay_batch_udp_recv(sock.fileno(), _from_buffer(_U8, buf, True), slot, n,
                                   _from_buffer(_U32, spans, True), _from_buffer(_U8, addrs, True))
    if got < 0:
        raise OSError(-got, os.strerror(-got))
    del spans[2 * got:]
    return spans, bytes(addrs[:got * ADDR_SIZE])


def udp_send(sock: socket.socket, buf: bytes | bytearray | memoryview, spans: array[int],
             addr: bytes) -> int:
    sent = lib.relay_batch_udp_send(sock.fileno(), _from_buffer(_U8, buf), len(buf),
                                    _from_buffer(_U32, spans), len(spans) // 2, addr,
                                    address_length(addr))
    if sent == -errno.EAGAIN:
        return 0
    if sent < 0:
        raise OSError(-sent, os.strerror(-sent))
    return int(sent)
