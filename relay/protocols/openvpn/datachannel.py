"""The data channel in batches (``crypto.c`` openvpn_encrypt_aead /
openvpn_decrypt_aead, ``packet_id.c``): the pure-Python reference, and the
interface its C twin (:mod:`relay.serve.datachannel`, ``cext/ovpn.c``) shares.

:class:`OpenVPNServer <relay.protocols.openvpn.server.OpenVPNServer>` keeps one
data channel per session, holding the data keys of each key id with its send
packet id and replay window, and calls it for every data packet it receives or
sends, all those of one receive (a UDP batch, a TCP read) in one call. The relay
hands it the C twin; the tests run both over the same packets and compare bytes,
statuses and window states.

Layout of a packet (P_DATA_V2; P_DATA_V1 has only the opcode byte and
authenticates only its packet id)::

    opcode/key id (1) | peer id (3) | packet id (4) | tag (16) | ciphertext
    '------------ additional data -------------'

The nonce is the packet id then the key's 8-byte implicit IV. AES-256-GCM and
CHACHA20-POLY1305 share all of it.

Opening a packet: at most ``max_packet`` bytes and a data opcode
(``MALFORMED``); its key id has a key (``NO_KEY``); header, packet id and tag
present (``SHORT``); the packet id passes the replay window (``REPLAY``); the tag
verifies (``BAD_TAG``); only then is the id committed to the window. Its
plaintext is ``PING`` when it is exactly the ping magic, ``OCC`` when it starts
with the OCC magic, else ``DATA``. Sealing takes the next packet id of the key
(none past 2^32 - 1) and skips a payload whose packet would exceed 65535 bytes.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from relay.protocols.openvpn.keys import DataKeys, ReplayWindow
from relay.protocols.openvpn.wire import (
    KEY_ID_MASK,
    OCC_MAGIC,
    OPCODE_SHIFT,
    PACKET_ID_MAX,
    PACKET_ID_SIZE,
    PING_MAGIC,
    TCP_LENGTH,
    Opcode,
)

# The AEAD of each cipher the relay negotiates (keys.DATA_CIPHERS).
AEADS = {"AES-256-GCM": AESGCM, "CHACHA20-POLY1305": ChaCha20Poly1305}
TAG_SIZE = 16  # both ciphers' tag
KEY_IDS = KEY_ID_MASK + 1
V2_HEAD = 4  # opcode/key id and peer id
V2_OVERHEAD = V2_HEAD + PACKET_ID_SIZE + TAG_SIZE
# The largest packet a 16-bit TCP length can frame.
MAX_SEALED = 0xFFFF
# Frames one open_stream call takes; the caller calls again for the rest.
STREAM_BATCH = 1024

# What became of each packet (cext/ovpn.h RELAY_OVPN_*): the authenticated first.
DATA, PING, OCC, NO_KEY, SHORT, REPLAY, BAD_TAG, MALFORMED = range(8)
NSTATUS = 8
# The session's drop summary names the others so.
DROP_REASONS = {
    NO_KEY: "data packet for a key not (yet) negotiated",
    SHORT: "truncated data packet",
    REPLAY: "replayed or too old data packet id",
    BAD_TAG: "data packet failed authentication (tag)",
    MALFORMED: "not a data packet, or too large",
}
_PID = struct.Struct("!I")


@dataclass(slots=True)
class Opened:
    """What one open call did. ``plain`` holds packet i's plaintext at
    ``spans[2i] : spans[2i] + spans[2i+1]`` when ``status[i]`` is authenticated
    (where its ciphertext was); ``data`` lists the spans of the ``DATA`` ones, in
    order."""

    plain: bytearray
    data: array[int]
    counts: list[int]  # packets by status
    status: bytes
    spans: array[int]
    end: int = 0  # open_stream: the offset where it stopped

    @property
    def authenticated(self) -> int:
        return self.counts[DATA] + self.counts[PING] + self.counts[OCC]


@dataclass(slots=True)
class Sealed:
    """Packets sealed by one call: packet i is ``data[spans[2i] : spans[2i] +
    spans[2i+1]]`` (framed for TCP, all of ``data[:size]`` one after the other).
    ``data`` may be the channel's scratch buffer: send it before the next call."""

    data: bytearray | memoryview
    spans: array[int]
    count: int
    size: int  # bytes of data used
    payload_bytes: int


class DataChannel(Protocol):
    """One session's data keys, by key id (this module's :class:`PyDataChannel`,
    or the C twin)."""

    def install(self, key_id: int, keys: DataKeys) -> None:
        """The data keys of ``key_id``, replacing any (a fresh window and send id)."""

    def remove(self, key_id: int) -> None: ...

    def open(self, buf: bytearray, spans: array[int], max_packet: int) -> Opened:
        """The packets ``buf[spans[2i] : spans[2i] + spans[2i+1]]``, in place: an
        authenticated packet's plaintext replaces its ciphertext (the bytes of one
        that fails are undefined). ``plain`` is ``buf``."""

    def open_stream(self, buf: bytes | bytearray, start: int, max_packet: int) -> Opened:
        """The consecutive complete data packets of a TCP stream from ``start``
        (a 16-bit length before each), at most :data:`STREAM_BATCH`, into a new
        buffer as long as ``buf`` (the stream's moves on); ``end`` is where it
        stopped: before an incomplete frame, a length of 0 or above
        ``max_packet``, or a control packet."""

    def seal(self, key_id: int, peer_id: int, buf: bytes | bytearray, spans: array[int],
             tcp: bool) -> Sealed:
        """The payloads ``buf[spans[2i] : spans[2i] + spans[2i+1]]`` as P_DATA_V2
        packets of ``key_id`` (which must have keys)."""

    def key_state(self, key_id: int) -> tuple[int, int, int]:
        """(last packet id sent, highest received, window bits) of ``key_id``."""


class _Key:
    def __init__(self, keys: DataKeys) -> None:
        aead = AEADS[keys.cipher]
        self.decrypt = aead(keys.decrypt_key).decrypt
        self.decrypt_iv = keys.decrypt_iv
        self.encrypt = aead(keys.encrypt_key).encrypt
        self.encrypt_iv = keys.encrypt_iv
        self.send_pid = 0
        self.replay = ReplayWindow()


class PyDataChannel:
    """The reference data channel, a packet at a time in Python."""

    def __init__(self) -> None:
        self._keys: list[_Key | None] = [None] * KEY_IDS

    def install(self, key_id: int, keys: DataKeys) -> None:
        self._keys[key_id] = _Key(keys)

    def remove(self, key_id: int) -> None:
        self._keys[key_id] = None

    def key_state(self, key_id: int) -> tuple[int, int, int]:
        k = self._keys[key_id]
        assert k is not None
        return k.send_pid, k.replay.highest, k.replay.seen

    # -- opening ----------------------------------------------------------------------

    def _open_one(self, pkt: bytes, max_packet: int) -> tuple[int, int, bytes]:
        """(status, offset of the ciphertext in pkt, plaintext)."""
        if not pkt or len(pkt) > max_packet:
            return MALFORMED, 0, b""
        op = pkt[0] >> OPCODE_SHIFT
        if op != Opcode.DATA_V2 and op != Opcode.DATA_V1:
            return MALFORMED, 0, b""
        k = self._keys[pkt[0] & KEY_ID_MASK]
        if k is None:
            return NO_KEY, 0, b""
        head = V2_HEAD if op == Opcode.DATA_V2 else 1
        pid_end = head + PACKET_ID_SIZE
        ct_off = pid_end + TAG_SIZE
        if len(pkt) < ct_off:
            return SHORT, 0, b""
        pid_bytes = pkt[head:pid_end]
        (pid,) = _PID.unpack(pid_bytes)
        if not k.replay.check(pid):
            return REPLAY, 0, b""
        aad = pkt[:pid_end] if op == Opcode.DATA_V2 else pid_bytes
        try:
            plain = k.decrypt(pid_bytes + k.decrypt_iv, pkt[ct_off:] + pkt[pid_end:ct_off], aad)
        except InvalidTag:
            return BAD_TAG, 0, b""
        k.replay.commit(pid)
        if plain == PING_MAGIC:
            return PING, ct_off, plain
        if plain[:len(OCC_MAGIC)] == OCC_MAGIC:
            return OCC, ct_off, plain
        return DATA, ct_off, plain

    def _put(self, out: bytearray, off: int, pkt: bytes, max_packet: int,
             opened: Opened) -> None:
        """Open the packet that sits at ``off``, its plaintext into ``out`` at its
        ciphertext's offset."""
        status, ct_off, plain = self._open_one(pkt, max_packet)
        at = off + ct_off
        if plain:
            out[at:at + len(plain)] = plain
        opened.counts[status] += 1
        opened.status += bytes([status])
        opened.spans.extend((at if ct_off else off, len(plain)))
        if status == DATA:
            opened.data.extend((at, len(plain)))

    def open(self, buf: bytearray, spans: array[int], max_packet: int) -> Opened:
        opened = Opened(buf, array("I"), [0] * NSTATUS, b"", array("I"))
        for i in range(0, len(spans), 2):
            off, n = spans[i], spans[i + 1]
            if off > len(buf) or n > len(buf) - off:
                off = n = 0  # outside the buffer: malformed, nothing read
            self._put(buf, off, bytes(buf[off:off + n]), max_packet, opened)
        return opened

    def open_stream(self, buf: bytes | bytearray, start: int, max_packet: int) -> Opened:
        opened = Opened(bytearray(len(buf)), array("I"), [0] * NSTATUS, b"", array("I"))
        pos = start
        while len(opened.status) < STREAM_BATCH and len(buf) - pos > TCP_LENGTH.size:
            (n,) = TCP_LENGTH.unpack_from(buf, pos)
            first = pos + TCP_LENGTH.size
            op = buf[first] >> OPCODE_SHIFT
            if not 0 < n <= max_packet or n > len(buf) - first \
                    or (op != Opcode.DATA_V2 and op != Opcode.DATA_V1):
                break
            self._put(opened.plain, first, bytes(buf[first:first + n]), max_packet, opened)
            pos = first + n
        opened.end = pos
        return opened

    # -- sealing ----------------------------------------------------------------------

    def seal(self, key_id: int, peer_id: int, buf: bytes | bytearray, spans: array[int],
             tcp: bool) -> Sealed:
        k = self._keys[key_id]
        assert k is not None
        out = bytearray()
        out_spans = array("I")
        payload_bytes = 0
        for i in range(0, len(spans), 2):
            off, n = spans[i], spans[i + 1]
            if off > len(buf) or n > len(buf) - off or V2_OVERHEAD + n > MAX_SEALED:
                continue
            if k.send_pid >= PACKET_ID_MAX:
                break  # ids used up: the client renegotiates long before
            k.send_pid += 1
            pid_bytes = _PID.pack(k.send_pid)
            head = bytes([(Opcode.DATA_V2 << OPCODE_SHIFT) | key_id]) \
                + peer_id.to_bytes(3, "big") + pid_bytes
            ct = k.encrypt(pid_bytes + k.encrypt_iv, bytes(buf[off:off + n]), head)
            pkt = head + ct[-TAG_SIZE:] + ct[:-TAG_SIZE]
            start = len(out)
            if tcp:
                out += TCP_LENGTH.pack(len(pkt))
            out += pkt
            out_spans.extend((start, len(out) - start))
            payload_bytes += n
        return Sealed(out, out_spans, len(out_spans) // 2, len(out), payload_bytes)


def udp_runs(buf: bytes | bytearray, spans: array[int], addrs: bytes, addr_size: int,
             max_packet: int) -> array[int]:
    """How a UDP endpoint splits the datagrams of one receive (``addrs``: their
    source addresses, ``addr_size`` bytes each) into runs: consecutive datagrams
    from the same address and of the same kind, as (first, length, data) triples.
    Data (1) is a data packet of at most ``max_packet`` bytes, P_DATA_V1 or
    P_DATA_V2 with its peer id (a run has one opcode and one peer id), which a
    session takes a run at a time; anything else is 0."""
    runs = array("I")
    key: tuple[bytes, int, bytes] | None = None
    for i in range(len(spans) // 2):
        off, n = spans[2 * i], spans[2 * i + 1]
        pkt = bytes(buf[off:off + n]) if off <= len(buf) and n <= len(buf) - off else b""
        op = pkt[0] >> OPCODE_SHIFT if pkt else -1
        data = 0 < len(pkt) <= max_packet and (
            op == Opcode.DATA_V1 or (op == Opcode.DATA_V2 and len(pkt) >= V2_HEAD))
        addr = addrs[i * addr_size:(i + 1) * addr_size]
        this = (addr, op, pkt[1:V2_HEAD] if op == Opcode.DATA_V2 else b"") if data \
            else (addr, -1, b"")
        if runs and this == key:
            runs[-2] += 1
            continue
        runs.extend((i, 1, int(data)))
        key = this
    return runs
