"""pcapng files synthesized from packet-log records, for Wireshark and tshark.

The packet log keeps TCP/IP header fields, not packets, so each record becomes
an Ethernet + IPv4/IPv6 + TCP header built from its fields, captured without its
payload: the captured length is the headers', the original length the headers'
plus the recorded payload length, exactly as a ``tcpdump -s`` capture truncates.
Wireshark then shows "[Packet size limited during capture]" instead of inventing
bytes. The IPv4 header checksum is always valid; the TCP checksum is valid on
packets without payload (SYN, pure ACK, FIN: the whole packet is there) and zero
on the others, whose payload the relay never kept (Wireshark cannot verify a
truncated segment and leaves it "unverified").

Each packet carries a comment option with the session ID, the client's physical
address and the direction, and the epb_flags direction bits; timestamps are in
nanoseconds (if_tsresol 9), as the records are. Layout per the pcapng spec
(draft-ietf-opsawg-pcapng): section header, one interface description, then
enhanced packet blocks, all little endian.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from typing import Any, BinaryIO

from relay.times import parse_rfc3339_ns

BT_SHB = 0x0A0D0D0A
BT_IDB = 0x00000001
BT_EPB = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
LINKTYPE_ETHERNET = 1
OPT_END = 0
OPT_COMMENT = 1
OPT_SHB_USERAPPL = 4
OPT_IF_NAME = 2
OPT_IF_TSRESOL = 9
OPT_EPB_FLAGS = 2
EPB_INBOUND, EPB_OUTBOUND = 1, 2
TSRESOL_NS = 9  # 10^-9 s: the records' own resolution

ETH_HLEN = 14
IPV4_HLEN = 20
IPV6_HLEN = 40
TCP_HLEN = 20
# The largest synthesized header (Ethernet + IPv6 + TCP): the interface's snap
# length, so every packet's captured length is at most it.
SNAPLEN = ETH_HLEN + IPV6_HLEN + TCP_HLEN
# IP length fields are 16 bits: a record's payload length (u16) plus headers can
# exceed them only on GSO super-packets, which are clamped.
IP_LEN_MAX = 0xFFFF
# Locally administered MACs: the client's side and the relay's side of the TAP.
CLIENT_MAC = bytes.fromhex("020000000001")
RELAY_MAC = bytes.fromhex("020000000002")
ETHERTYPE = {4: b"\x08\x00", 6: b"\x86\xdd"}
IPPROTO_TCP = 6
TTL = 64
TCP_FLAG_BITS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10,
                 "URG": 0x20, "ECE": 0x40, "CWR": 0x80}


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_flags(text: str) -> int:
    return sum(TCP_FLAG_BITS[f] for f in text.split(",") if f)


def synthesize(rec: dict[str, Any]) -> tuple[bytes, int]:
    """(captured bytes, original length) of one packet-log record."""
    src, dst = ipaddress.ip_address(rec["src_ip"]), ipaddress.ip_address(rec["dst_ip"])
    family = src.version
    plen = rec["len"]
    tcp = bytearray(struct.pack("!HHIIBBHHH", rec["src_port"], rec["dst_port"], rec["seq"],
                                rec["ack"], TCP_HLEN // 4 << 4, tcp_flags(rec["flags"]),
                                rec["window"], 0, 0))
    if plen == 0:
        # Complete packet: a checksum Wireshark can verify.
        if family == 4:
            pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, IPPROTO_TCP, TCP_HLEN)
        else:
            pseudo = src.packed + dst.packed + struct.pack("!I3xB", TCP_HLEN, IPPROTO_TCP)
        struct.pack_into("!H", tcp, 16, _checksum(pseudo + bytes(tcp)))
    if family == 4:
        total = min(IPV4_HLEN + TCP_HLEN + plen, IP_LEN_MAX)
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, TTL,
                                   IPPROTO_TCP, 0, src.packed, dst.packed))
        struct.pack_into("!H", ip, 10, _checksum(bytes(ip)))
        orig = ETH_HLEN + total
    else:
        payload_len = min(TCP_HLEN + plen, IP_LEN_MAX)
        ip = bytearray(struct.pack("!IHBB16s16s", 6 << 28, payload_len, IPPROTO_TCP, TTL,
                                   src.packed, dst.packed))
        orig = ETH_HLEN + IPV6_HLEN + payload_len
    from_client = rec["direction"] == "in"
    eth = (RELAY_MAC + CLIENT_MAC if from_client else CLIENT_MAC + RELAY_MAC) + ETHERTYPE[family]
    return eth + bytes(ip) + bytes(tcp), orig


def header(app: str) -> bytes:
    shb = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + \
        _option(OPT_SHB_USERAPPL, app.encode()) + _option(OPT_END, b"")
    idb = struct.pack("<HHI", LINKTYPE_ETHERNET, 0, SNAPLEN) + \
        _option(OPT_IF_NAME, b"relay packet log (synthesized headers)") + \
        _option(OPT_IF_TSRESOL, bytes([TSRESOL_NS])) + _option(OPT_END, b"")
    return _block(BT_SHB, shb) + _block(BT_IDB, idb)


def packet(rec: dict[str, Any]) -> bytes:
    data, orig = synthesize(rec)
    ts = parse_rfc3339_ns(rec["time"])
    comment = (f"session {rec['session_id']} client {rec['client_ip']}:{rec['client_port']} "
               f"{'from' if rec['direction'] == 'in' else 'to'} client")
    flags = EPB_INBOUND if rec["direction"] == "in" else EPB_OUTBOUND
    body = struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, len(data), orig) + \
        _pad4(data) + _option(OPT_COMMENT, comment.encode()) + \
        _option(OPT_EPB_FLAGS, struct.pack("<I", flags)) + _option(OPT_END, b"")
    return _block(BT_EPB, body)


def write(out: BinaryIO, records: Iterable[dict[str, Any]], app: str = "relay") -> int:
    """Write a whole pcapng file; returns the number of packets."""
    out.write(header(app))
    n = 0
    for rec in records:
        out.write(packet(rec))
        n += 1
    return n
