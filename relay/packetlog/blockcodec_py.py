"""Pure-Python twin of the block decoder in cext/blockcodec.c (``relay_block_decode``).

Used by the packet-log writer to read a block's session and address tables (the
segment index) without a Python pass over its records, and by the tests to check
the C codec against an independent reading of the layout documented in
relay/packetlog/segments.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.sessionid import RAW_LEN

LAYOUT_VERSION = 1
FAMILY_V4 = 4
FAMILY_V6 = 6
# Widths of the fields behind the varints (ebpf/record.h): the encoder writes no
# more, so a wider varint is a corrupt block, never a value to cut down (as
# cext/blockcodec.c's get_uint).
U16_MAX = 2**16 - 1
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


class BlockError(ValueError):
    """The block bytes do not follow the layout."""


@dataclass
class Session:
    session_id: bytes
    rflags: int
    client_family: int
    client_ip: bytes
    client_port: int


@dataclass
class Tables:
    count: int
    sessions: list[Session] = field(default_factory=list)
    addresses: list[tuple[int, bytes]] = field(default_factory=list)
    end: int = 0  # offset of the flow table


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BlockError("block ends early")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def varint(self, limit: int = U64_MAX) -> int:
        v = shift = 0
        while True:
            if self.pos >= len(self.data):
                raise BlockError("block ends inside a varint")
            b = self.data[self.pos]
            self.pos += 1
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                if v > limit:
                    raise BlockError(f"varint {v} wider than its field")
                return v
            shift += 7
            if shift >= 64:
                raise BlockError("varint too long")

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def addr(self, family: int) -> bytes:
        if family not in (0, FAMILY_V4, FAMILY_V6):
            raise BlockError(f"bad address family {family}")
        return self.take(16 if family == FAMILY_V6 else 4)


def _unzigzag(v: int) -> int:
    return (v >> 1) ^ -(v & 1)


def _tables(r: _Reader) -> Tables:
    if r.take(1)[0] != LAYOUT_VERSION:
        raise BlockError("unknown block layout version")
    t = Tables(count=r.varint())
    for _ in range(r.varint()):
        head = r.take(RAW_LEN + 2)  # session ID, record flags, client family
        family = head[RAW_LEN + 1]
        t.sessions.append(Session(head[:RAW_LEN], head[RAW_LEN], family, r.addr(family),
                                  r.u16()))
    for _ in range(r.varint()):
        family = r.take(1)[0]
        t.addresses.append((family, r.addr(family)))
    t.end = r.pos
    return t


def read_tables(block: bytes) -> Tables:
    """The session and address tables at the front of an encoded block."""
    return _tables(_Reader(block))


def decode_block(block: bytes) -> list[dict[str, int | bytes]]:
    """Every record of an encoded block, as raw field values (addresses as bytes
    of their family's length, ports and numbers as ints)."""
    r = _Reader(block)
    t = _tables(r)
    flows = []
    for _ in range(r.varint()):
        sess, direction = r.varint(U32_MAX), r.take(1)[0]
        src, dst = r.varint(U32_MAX), r.varint(U32_MAX)
        sport, dport = r.u16(), r.u16()
        if sess >= len(t.sessions) or src >= len(t.addresses) or dst >= len(t.addresses):
            raise BlockError("flow refers past a table")
        flows.append((t.sessions[sess], direction, t.addresses[src], t.addresses[dst],
                      sport, dport))
    n = t.count
    time = int.from_bytes(r.take(8), "little")
    times = []
    for _ in range(n):
        time = (time + _unzigzag(r.varint())) & U64_MAX
        times.append(time)
    flow_of = [r.varint(U32_MAX) for _ in range(n)]
    if any(f >= len(flows) for f in flow_of):
        raise BlockError("record refers past the flow table")
    flags = r.take(n)
    lens = [r.varint(U16_MAX) for _ in range(n)]
    columns = []
    for mask in (U16_MAX, U32_MAX, U32_MAX):  # window, seq, ack: per-flow deltas
        prev = [0] * len(flows)
        col = []
        for f in flow_of:
            prev[f] = (prev[f] + _unzigzag(r.varint(U32_MAX))) & U32_MAX
            col.append(prev[f] & mask)
        columns.append(col)
    if r.pos != len(block):
        raise BlockError("trailing bytes after the last column")
    out: list[dict[str, int | bytes]] = []
    for i in range(n):
        sess, direction, (family, src), (_, dst), sport, dport = flows[flow_of[i]]
        out.append({
            "time_ns": times[i], "session_id": sess.session_id, "rflags": sess.rflags,
            "client_family": sess.client_family, "client_ip": sess.client_ip,
            "client_port": sess.client_port, "direction": direction, "family": family,
            "src_ip": src, "dst_ip": dst, "src_port": sport, "dst_port": dport,
            "tcp_flags": flags[i], "payload_len": lens[i], "window": columns[0][i],
            "seq": columns[1][i], "ack": columns[2][i],
        })
    return out
