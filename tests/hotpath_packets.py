"""Packet builders for the hot-path tests, the fuzz seed corpus and the benchmark:
IPv4/IPv6 (with extension headers) TCP packets with correct checksums, HTTP
requests, TLS ClientHellos, and an independent from-scratch TCP checksum check."""

from __future__ import annotations

import itertools
import socket
import struct

TAG = b"Zq3_x-9A"
CLIENT_V4, SERVER_V4 = "10.211.0.2", "93.184.216.34"
CLIENT_V6, SERVER_V6 = "fd00:211::2", "2001:db8::80"
HOPOPTS, ROUTING, FRAGMENT, DSTOPTS = 0, 43, 44, 60


def ones_sum(data: bytes) -> int:
    """RFC 1071 sum of 16-bit big-endian words, odd byte padded with zero."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def tcp_header(dport: int, sport: int, seq: int, ack: int, options: bytes) -> bytes:
    assert len(options) % 4 == 0
    doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, 0x18, 64240, 0, 0) + options


def _with_checksum(segment: bytes, pseudo: bytes) -> bytearray:
    seg = bytearray(segment)
    seg[16:18] = struct.pack("!H", ~ones_sum(pseudo + bytes(seg)) & 0xFFFF)
    return seg


def ipv4(
    payload: bytes = b"",
    *,
    dport: int = 80,
    sport: int = 40000,
    seq: int = 1000,
    ack: int = 2000,
    dst: str = SERVER_V4,
    tcp_options: bytes = b"",
    ip_options: bytes = b"",
    frag: int = 0x4000,
    trailer: bytes = b"",
) -> bytearray:
    """An IPv4 TCP packet with correct checksums; ``trailer`` is padding past the
    total length (as Ethernet minimum-size frames leave)."""
    src_b, dst_b = socket.inet_aton(CLIENT_V4), socket.inet_aton(dst)
    seg = tcp_header(dport, sport, seq, ack, tcp_options) + payload
    seg = _with_checksum(seg, src_b + dst_b + struct.pack("!BBH", 0, 6, len(seg)))
    assert len(ip_options) % 4 == 0
    ihl = 5 + len(ip_options) // 4
    hdr = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(seg), 7, frag, 64, 6, 0, src_b, dst_b
        )
        + ip_options
    )
    hdr[10:12] = struct.pack("!H", ~ones_sum(bytes(hdr)) & 0xFFFF)
    return hdr + seg + trailer


def ext_header(kind: int, next_header: int, *, frag_offset: int = 0, more: bool = False) -> bytes:
    """One 8-byte IPv6 extension header of the given kind, pointing at next_header."""
    if kind == FRAGMENT:
        return struct.pack("!BBHI", next_header, 0, frag_offset << 3 | more, 0x1234)
    if kind == ROUTING:  # type 4 (segment routing), segments left 0: dst is final
        return struct.pack("!BBBB4x", next_header, 0, 4, 0)
    return struct.pack("!BB", next_header, 0) + b"\x01\x04\0\0\0\0"  # PadN


def ipv6(
    payload: bytes = b"",
    *,
    dport: int = 80,
    sport: int = 40000,
    seq: int = 1000,
    ack: int = 2000,
    dst: str = SERVER_V6,
    ext: tuple[int, ...] = (),
    tcp_options: bytes = b"",
    frag_offset: int = 0,
) -> bytearray:
    """An IPv6 TCP packet with a correct checksum behind the extension headers ``ext``
    (kinds, in order)."""
    src_b, dst_b = (
        socket.inet_pton(socket.AF_INET6, CLIENT_V6),
        socket.inet_pton(socket.AF_INET6, dst),
    )
    seg = tcp_header(dport, sport, seq, ack, tcp_options) + payload
    seg = _with_checksum(seg, src_b + dst_b + struct.pack("!I3xB", len(seg), 6))
    chain = b""
    kinds = (*ext, 6)
    for kind, nxt in itertools.pairwise(kinds):
        chain += ext_header(kind, nxt, frag_offset=frag_offset)
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(chain) + len(seg), kinds[0], 64, src_b, dst_b)
    return bytearray(hdr + chain + seg)


def tcp_offsets(packet: bytes) -> tuple[int, int, bytes]:
    """(TCP offset, IP end, pseudo-header without length) of a packet built above."""
    if packet[0] >> 4 == 4:
        end = struct.unpack_from("!H", packet, 2)[0]
        return (packet[0] & 15) * 4, end, packet[12:20] + b"\0\x06"
    end = 40 + struct.unpack_from("!H", packet, 4)[0]
    nxt, off = packet[6], 40
    while nxt != 6:
        nxt, off = packet[off], off + (8 if nxt == FRAGMENT else (packet[off + 1] + 1) * 8)
    return off, end, packet[8:40] + b"\0\0\0\x06"


def tcp_sum(packet: bytes) -> int:
    """One's complement sum of pseudo-header + TCP segment, recomputed from scratch:
    0xFFFF when the checksum is right."""
    off, end, pseudo = tcp_offsets(packet)
    seg = bytes(packet[off:end])
    if packet[0] >> 4 == 4:
        pseudo += struct.pack("!H", len(seg))
    else:
        pseudo = pseudo[:32] + struct.pack("!I3xB", len(seg), 6)
    return ones_sum(pseudo + seg)


def tcp_checksum_ok(packet: bytes) -> bool:
    return tcp_sum(packet) == 0xFFFF


def http_request(
    method: str = "GET",
    target: str = "/",
    *,
    host: str | None = "example.com",
    ua: str | None = "curl/8.1.2",
    ua_name: str = "User-Agent",
    headers: tuple[tuple[str, str], ...] = (("Accept", "*/*"),),
    body: bytes = b"",
    version: str = "1.1",
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    if ua is not None:
        lines.append(f"{ua_name}: {ua}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def client_hello(
    sni: bytes | None = b"www.example.org",
    *,
    session_id: bytes = bytes(range(32)),
    extensions_before: bytes = b"",
    extensions_after: bytes = b"",
) -> bytes:
    """A TLS 1.3-style ClientHello record, SNI in a server_name extension."""
    ext = extensions_before
    if sni is not None:
        entry = b"\0" + struct.pack("!H", len(sni)) + sni
        sn = struct.pack("!H", len(entry)) + entry
        ext += struct.pack("!HH", 0, len(sn)) + sn
    ext += extensions_after
    body = (
        b"\x03\x03"
        + bytes(32)
        + bytes([len(session_id)])
        + session_id
        + struct.pack("!H", 4)
        + b"\x13\x01\x13\x02"
        + b"\x01\x00"
        + struct.pack("!H", len(ext))
        + ext
    )
    hs = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def extension(kind: int, data: bytes) -> bytes:
    return struct.pack("!HH", kind, len(data)) + data
