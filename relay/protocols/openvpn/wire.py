"""OpenVPN's wire format (``ssl_pkt.h``, ``reliable.c``): opcodes, the control
packet codec, the data packet header's sizes, and TCP framing."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# --- Wire constants (ssl_pkt.h) ------------------------------------------------------


class Opcode(enum.IntEnum):
    CONTROL_SOFT_RESET_V1 = 3
    CONTROL_V1 = 4
    ACK_V1 = 5
    DATA_V1 = 6
    CONTROL_HARD_RESET_CLIENT_V2 = 7
    CONTROL_HARD_RESET_SERVER_V2 = 8
    DATA_V2 = 9
    CONTROL_HARD_RESET_CLIENT_V3 = 10
    CONTROL_WKC_V1 = 11


OPCODE_SHIFT = 3
KEY_ID_MASK = 0x07
SID_SIZE = 8
PACKET_ID_SIZE = 4
PACKET_ID_MAX = 0xFFFFFFFF
# Data channel: P_DATA_V2 header is opcode/key id (1 byte) + peer id (3 bytes).
PEER_ID_MAX = 0xFFFFFF
GCM_TAG_SIZE = 16

# ping.c: a data-channel payload that means "still alive".
PING_MAGIC = bytes.fromhex("2a187bf3641eb4cb07ed2d0a981fc748")
# occ.c: options-consistency messages ride the data channel after this magic.
OCC_MAGIC = bytes.fromhex("287f346bd4ef7a812d56b8d3afc5459c")
OCC_EXIT = 6

# --- Sizes of a packet (OpenVPN 2.6 defaults unless said otherwise) -------------------

# ssl_pkt.h CONTROL_SEND_ACK_MAX: ACKs piggybacked on one control packet;
# reliable.h RELIABLE_ACK_SIZE: ACKs in one P_ACK_V1.
CONTROL_SEND_ACK_MAX = 4
RELIABLE_ACK_SIZE = 8
# --tls-mtu 1250: largest control packet; the TLS payload gets what the largest
# header (opcode, sid, 4 ACKs, remote sid, packet id) leaves.
TLS_MTU = 1250
CONTROL_HEADER_MAX = 1 + SID_SIZE + 1 + CONTROL_SEND_ACK_MAX * PACKET_ID_SIZE + SID_SIZE + 4
TLS_PAYLOAD_MAX = TLS_MTU - CONTROL_HEADER_MAX
# Largest packet accepted, a TCP frame or a UDP datagram. OpenVPN 2.6 sizes its
# buffers from --tun-max-mtu (default 1600) plus the crypto overhead, and the relay
# pushes a smaller tun-mtu; 4 KiB also fits a client configured with a larger MTU,
# while a stream that is not OpenVPN (whose "length" is two arbitrary bytes) fails
# fast.
MAX_PACKET_BYTES = 4096
# TCP framing: a 16-bit length before each packet.
TCP_LENGTH = struct.Struct("!H")


# --- Packet codec ----------------------------------------------------------------------


class Malformed(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ControlPacket:
    opcode: Opcode
    key_id: int
    session_id: bytes
    acks: tuple[int, ...]
    remote_session_id: bytes | None
    packet_id: int | None  # None for P_ACK_V1
    payload: bytes


CONTROL_OPCODES = frozenset({Opcode.CONTROL_SOFT_RESET_V1, Opcode.CONTROL_V1, Opcode.ACK_V1,
                             Opcode.CONTROL_HARD_RESET_CLIENT_V2,
                             Opcode.CONTROL_HARD_RESET_SERVER_V2})


def parse_control(pkt: bytes) -> ControlPacket:
    if len(pkt) < 1 + SID_SIZE + 1:
        raise Malformed(f"control packet of {len(pkt)} bytes")
    try:
        op = Opcode(pkt[0] >> OPCODE_SHIFT)
    except ValueError:
        raise Malformed(f"unknown opcode {pkt[0] >> OPCODE_SHIFT}") from None
    if op not in CONTROL_OPCODES:
        raise Malformed(f"{op.name} is not a control packet the relay accepts")
    sid = pkt[1:1 + SID_SIZE]
    pos = 1 + SID_SIZE
    n = pkt[pos]
    pos += 1
    if n > RELIABLE_ACK_SIZE:
        raise Malformed(f"{n} ACKs in one packet")
    end = pos + n * PACKET_ID_SIZE
    if len(pkt) < end + (SID_SIZE if n else 0):
        raise Malformed("truncated ACK array")
    acks = struct.unpack_from(f"!{n}I", pkt, pos)
    pos = end
    remote = None
    if n:
        remote = pkt[pos:pos + SID_SIZE]
        pos += SID_SIZE
    pid = None
    if op is not Opcode.ACK_V1:
        if len(pkt) < pos + PACKET_ID_SIZE:
            raise Malformed("truncated packet id")
        (pid,) = struct.unpack_from("!I", pkt, pos)
        pos += PACKET_ID_SIZE
    elif not n:
        raise Malformed("P_ACK_V1 without ACKs")
    return ControlPacket(op, pkt[0] & KEY_ID_MASK, sid, acks, remote, pid, pkt[pos:])


def build_control(op: Opcode, key_id: int, sid: bytes, acks: list[int],
                  remote_sid: bytes, packet_id: int | None, payload: bytes = b"") -> bytes:
    head = bytes([(op << OPCODE_SHIFT) | key_id]) + sid + bytes([len(acks)])
    head += struct.pack(f"!{len(acks)}I", *acks)
    if acks:
        head += remote_sid
    if packet_id is not None:
        head += struct.pack("!I", packet_id)
    return head + payload


def client_reset_session_id(pkt: bytes) -> bytes | None:
    """The session id of a well-formed P_CONTROL_HARD_RESET_CLIENT_V2 for key 0
    with packet id 0 (how every client session starts), else None."""
    try:
        p = parse_control(pkt)
    except Malformed:
        return None
    if p.opcode is not Opcode.CONTROL_HARD_RESET_CLIENT_V2 or p.key_id or p.packet_id != 0:
        return None
    return p.session_id


def control_session_id(pkt: bytes) -> bytes | None:
    """The sender's session id of a control packet (opcode and key id, then the
    id), read without parsing the rest; None for data packets and runts."""
    if len(pkt) < 1 + SID_SIZE or pkt[0] >> OPCODE_SHIFT not in CONTROL_OPCODES:
        return None
    return pkt[1:1 + SID_SIZE]
