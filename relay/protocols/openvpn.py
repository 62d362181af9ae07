"""OpenVPN 2.x server protocol (``--mode server``, TLS, no tls-auth), sans-IO.

As :mod:`relay.protocols.cstp` does for AnyConnect, :class:`OpenVPNServer` takes bytes
(:meth:`~OpenVPNServer.receive_data` for a TCP stream,
:meth:`~OpenVPNServer.receive_datagram` for UDP) and a ``now`` from the caller,
returns events, and queues the packets it wants sent (:meth:`~OpenVPNServer.packets_to_send`).
Time only advances through the ``now`` arguments and :meth:`handle_timeout`;
:meth:`next_timeout` says when that must be called.

The exchange, as the stock ``openvpn`` 2.6 client runs it::

    client                                   relay
    HARD_RESET_CLIENT_V2 sid=C pid=0     ->  TCP: an OpenVPNServer for the connection
                                         <-  HARD_RESET_SERVER_V2 sid=S ack[0] pid=0
                                             UDP: no state, see below
                                         <-  HARD_RESET_SERVER_V2 sid=S=cookie pid=0
    HARD_RESET_CLIENT_V2 sid=C pid=0
      ack[0] remote sid=S (or P_ACK_V1)  ->  the proof: OpenVPNServer(proof=...)
                                         <-  P_ACK_V1 ack[0] (the client's reset)
    P_CONTROL_V1 pid=1.. (TLS records)  <->  P_CONTROL_V1 / P_ACK_V1 (relay certificate)
    TLS data: key-method 2 (randoms,
      options, user/pass, peer-info)     ->  ClientAuth event
                                         <-  TLS data: key-method 2 (randoms, options)
      both sides derive data keys with the OpenVPN TLS-PRF
    TLS data: "PUSH_REQUEST"             ->  PushRequest event
                                         <-  "PUSH_REPLY,ifconfig ...,peer-id N,cipher ..."
    P_DATA_V2 (AES-256-GCM)             <->  Packet events / encrypt()

Over UDP anyone can forge a reset "from" any address, so a reset gets a stateless
answer (:func:`reset_reply`, as OpenVPN 2.6's ``mudp.c`` does): the relay's session
id in it is a cookie, an HMAC over the peer's address and port, the client's
session id and a coarse time slot under a key drawn at start. Only a later packet
from that address that echoes the cookie (:func:`check_proof`) shows the peer
receives there; the session state starts then. The answer acknowledges nothing, so
it is no larger than the reset it answers (14 bytes each); the ACK of the client's
reset follows the proof.

With ``tls-crypt`` (optional, a static key the client config carries) every
control packet is encrypted and authenticated under that key (:class:`TlsCrypt`), so
a peer without it gets no answer at all.

Each key (key id 0, then 1..7 for renegotiations the client starts with
P_CONTROL_SOFT_RESET_V1) has its own reliability layer, TLS session and data
keys, as in OpenVPN's ``key_state``; the previous key keeps decrypting for the
transition window.

Wire formats follow OpenVPN's ``ssl_pkt.h``, ``reliable.c``, ``ssl.c``
(key_method_2_read/write, openvpn_PRF) and ``crypto.c`` (openvpn_encrypt_aead).
"""

from __future__ import annotations

import enum
import hmac
import secrets
import ssl
import struct
from collections import Counter
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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
KEY_METHOD_2 = 2
KEY_METHOD_MASK = 0x0F
# Data channel: P_DATA_V2 header is opcode/key id (1 byte) + peer id (3 bytes).
PEER_ID_MAX = 0xFFFFFF
GCM_TAG_SIZE = 16
# The implicit part of the AEAD nonce, taken from the "HMAC" half of each key
# (crypto.c: iv length 12 minus the 4-byte packet id).
IMPLICIT_IV_SIZE = 8
AES_256_KEY_SIZE = 32
CIPHER = "AES-256-GCM"
# struct key2 (crypto.h): two keys, each cipher[64] + hmac[64] (MAX_CIPHER_KEY_LENGTH,
# MAX_HMAC_KEY_LENGTH); the client sends with keys[0], the server with keys[1].
KEY_HALF = 64
KEY2_SIZE = 4 * KEY_HALF
# key_source2: the client's pre_master (48) + random1 (32) + random2 (32); the
# server sends only the randoms.
PRE_MASTER_SIZE = 48
RANDOM_SIZE = 32
MASTER_SECRET_SIZE = 48
PRF_LABEL_MASTER = b"OpenVPN master secret"
PRF_LABEL_EXPANSION = b"OpenVPN key expansion"

# ping.c: a data-channel payload that means "still alive".
PING_MAGIC = bytes.fromhex("2a187bf3641eb4cb07ed2d0a981fc748")
# occ.c: options-consistency messages ride the data channel after this magic.
OCC_MAGIC = bytes.fromhex("287f346bd4ef7a812d56b8d3afc5459c")
OCC_EXIT = 6

# --- Limits and timeouts (OpenVPN 2.6 defaults unless said otherwise) -----------------

# ssl_pkt.h TLS_RELIABLE_N_SEND_BUFFERS / TLS_RELIABLE_N_REC_BUFFERS: the send
# window, and how far ahead of the next expected packet id we buffer.
SEND_WINDOW = 6
RECEIVE_WINDOW = 12
# ssl_pkt.h CONTROL_SEND_ACK_MAX: ACKs piggybacked on one control packet;
# reliable.h RELIABLE_ACK_SIZE: ACKs in one P_ACK_V1.
CONTROL_SEND_ACK_MAX = 4
RELIABLE_ACK_SIZE = 8
# --tls-timeout 2: retransmit an unacknowledged control packet after 2 s,
# doubling the wait on each retry (reliable.c).
TLS_TIMEOUT_S = 2.0
# --hand-window 60: a key negotiation must finish within 60 s.
HAND_WINDOW_S = 60.0
# --transition-window 3600: the previous key still decrypts this long.
TRANSITION_WINDOW_S = 3600.0
# --tls-mtu 1250: largest control packet; the TLS payload gets what the largest
# header (opcode, sid, 4 ACKs, remote sid, packet id) leaves.
TLS_MTU = 1250
CONTROL_HEADER_MAX = 1 + SID_SIZE + 1 + CONTROL_SEND_ACK_MAX * PACKET_ID_SIZE + SID_SIZE + 4
TLS_PAYLOAD_MAX = TLS_MTU - CONTROL_HEADER_MAX
# --replay-window 64: data packet ids up to 64 behind the highest are accepted once.
REPLAY_WINDOW = 64
# Pushed as the sample server.conf's "keepalive 10 60" does: ping every 10 s,
# the client restarts after 60 s of silence; the server side waits twice as
# long (OpenVPN's --keepalive doubles ping-restart on the server).
PING_INTERVAL_S = 10
PING_RESTART_S = 60
SERVER_PING_RESTART_S = 2 * PING_RESTART_S
# --scheduled-exit-interval 5: after AUTH_FAILED the client gets 5 s to read it.
SCHEDULED_EXIT_S = 5.0
# Decrypted control-channel text buffered before a message ends: the key-method 2
# message with a full peer-info is ~1.5 KiB (push_peer_info allocates 1536 bytes),
# user and password at most 4 KiB each (USER_PASS_LEN with auth-token).
MAX_PLAINTEXT_BYTES = 16 * 1024
# Largest packet accepted, a TCP frame or a UDP datagram. OpenVPN 2.6 sizes its
# buffers from --tun-max-mtu (default 1600) plus the crypto overhead, and the relay
# pushes a smaller tun-mtu; 4 KiB also fits a client configured with a larger MTU,
# while a stream that is not OpenVPN (whose "length" is two arbitrary bytes) fails
# fast.
MAX_PACKET_BYTES = 4096
# TCP framing: a 16-bit length before each packet.
TCP_LENGTH = struct.Struct("!H")
# Control bytes a key may hold queued and unacknowledged. OpenVPN keeps at most
# TLS_RELIABLE_N_SEND_BUFFERS (6) packets of --tls-mtu in flight and one control
# message of TLS_CHANNEL_BUF_SIZE (2048 bytes, common.h) waiting; the relay's largest
# legitimate backlog is its TLS flight (certificate chain included) plus key-method 2
# and the push reply. Four of TLS's largest records (2^14 bytes, RFC 8446 section
# 5.1) hold all of it several times over; past that the client is not acknowledging.
MAX_SEND_QUEUE_BYTES = 4 * 2**14
# push.c (sent_push_reply_expiry): once a PUSH_REPLY is sent, repeated PUSH_REQUESTs
# are ignored this long; the reliability layer retransmits the reply meanwhile.
PUSH_REPLY_HOLDOFF_S = 30.0

# --- Stateless answer to a UDP reset (mudp.c do_pre_decrypt_check, ssl_pkt.c
#     calculate_session_id_hmac and check_session_hmac_and_pkt_id) -----------------

# HMAC-SHA256 under a 256-bit key drawn when the relay starts (session_id_hmac_init);
# a restart only invalidates the handshakes in progress.
COOKIE_KEY_SIZE = 32
COOKIE_DIGEST = "sha256"
# Time is cut into slots of half the hand window, as OpenVPN quantises it
# ((handwindow + 1) / 2); a cookie holds in its own slot and the next, so a client
# has 30 to 60 s to echo it (it does so within a round trip).
COOKIE_SLOT_S = HAND_WINDOW_S / 2


# --- tls-crypt (tls_crypt.c tls_crypt_wrap / tls_crypt_unwrap) ------------------------

# A wrapped control packet: opcode/key id and session id in clear, the packet id and
# the time its sequence started (packet_id's long form, 4 + 4 bytes), an HMAC-SHA256
# tag over all of that and the plaintext, then the rest of the packet in AES-256-CTR
# with the tag's first 16 bytes as the IV.
TLS_CRYPT_CLEAR = 1 + SID_SIZE
TLS_CRYPT_PID = struct.Struct("!II")  # packet id, time
TLS_CRYPT_TAG_SIZE = 32
TLS_CRYPT_IV_SIZE = 16
TLS_CRYPT_HMAC_KEY_SIZE = 32
TLS_CRYPT_OVERHEAD = TLS_CRYPT_PID.size + TLS_CRYPT_TAG_SIZE
# The stateless reset reply is packet 1 of the relay's sequence; the session that
# its proof starts sends from the next.
TLS_CRYPT_RESET_REPLY_PID = 1
# The key file: OpenVPN's "Static key V1", the 256 bytes of a struct key2 in hex.
STATIC_KEY_BEGIN = "-----BEGIN OpenVPN Static key V1-----"
STATIC_KEY_END = "-----END OpenVPN Static key V1-----"
STATIC_KEY_HEX_PER_LINE = 32


# --- Events --------------------------------------------------------------------------


class Event:
    pass


@dataclass
class ClientAuth(Event):
    """The client's key-method 2 message of the first key: check the login, then
    call :meth:`OpenVPNServer.auth_failed` to refuse it."""

    username: str
    password: str
    peer_info: dict[str, str]
    dev_type: str  # "tun" or "tap", from the client's options string


@dataclass
class PushRequest(Event):
    """The client asks for its configuration: answer with :meth:`OpenVPNServer.push_reply`."""


@dataclass
class Packet(Event):
    # An IP packet (dev tun) or an Ethernet frame (dev tap), writable: the relay's
    # hot path stamps it in place.
    data: bytearray


@dataclass
class PeerExit(Event):
    reason: str


@dataclass
class PeerDead(Event):
    reason: str


@dataclass
class ProtocolError(Event):
    message: str
    # The metric label the relay counts it under (relay_handshake_failures_total):
    # "protocol-error", or the cap the peer exceeded.
    reason: str = "protocol-error"


@dataclass
class Closed(Event):
    """What had to reach the client (AUTH_FAILED) did, or its time ran out."""


@dataclass(frozen=True)
class PushParams:
    address: str
    netmask: str
    gateway: str
    mtu: int
    dns: tuple[str, ...] = ()
    lladdr: str | None = None  # dev tap: the MAC the client's tap device takes


# --- Packet codec ----------------------------------------------------------------------


class Malformed(ValueError):
    pass


@dataclass
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


# --- tls-crypt ---------------------------------------------------------------------------


def format_static_key(key2: bytes) -> str:
    """The key file text (what ``openvpn --genkey secret`` writes, without comments)."""
    hexed = key2.hex()
    lines = [hexed[i:i + STATIC_KEY_HEX_PER_LINE]
             for i in range(0, len(hexed), STATIC_KEY_HEX_PER_LINE)]
    return "\n".join([STATIC_KEY_BEGIN, *lines, STATIC_KEY_END]) + "\n"


def parse_static_key(text: str) -> bytes:
    """The 256 key bytes of a key file; ValueError when it is not one."""
    body = text.partition(STATIC_KEY_BEGIN)[2].partition(STATIC_KEY_END)
    if not body[1]:
        raise ValueError("not an OpenVPN static key (no BEGIN/END lines)")
    key2 = bytes.fromhex("".join(body[0].split()))
    if len(key2) != KEY2_SIZE:
        raise ValueError(f"an OpenVPN static key has {KEY2_SIZE} bytes, this one {len(key2)}")
    return key2


class TlsCrypt:
    """tls-crypt under one static key, in the server's direction (OpenVPN's
    KEY_DIRECTION_NORMAL: send with key2.keys[0], receive with keys[1]; each key
    is cipher[64] then hmac[64], of which AES-256 and HMAC-SHA256 use the start)."""

    def __init__(self, key2: bytes) -> None:
        if len(key2) != KEY2_SIZE:
            raise ValueError(f"a tls-crypt key has {KEY2_SIZE} bytes")
        send, receive = key2[:2 * KEY_HALF], key2[2 * KEY_HALF:]
        self._send = (send[:AES_256_KEY_SIZE], send[KEY_HALF:KEY_HALF + TLS_CRYPT_HMAC_KEY_SIZE])
        self._receive = (receive[:AES_256_KEY_SIZE],
                         receive[KEY_HALF:KEY_HALF + TLS_CRYPT_HMAC_KEY_SIZE])

    def wrap(self, pkt: bytes, pid: int, time: int) -> bytes:
        cipher_key, hmac_key = self._send
        clear = pkt[:TLS_CRYPT_CLEAR] + TLS_CRYPT_PID.pack(pid, time)
        plain = pkt[TLS_CRYPT_CLEAR:]
        tag = hmac.digest(hmac_key, clear + plain, "sha256")
        return clear + tag + _aes_ctr(cipher_key, tag[:TLS_CRYPT_IV_SIZE], plain)

    def unwrap(self, pkt: bytes) -> tuple[bytes, int] | None:
        """The packet as it would be without tls-crypt and its packet id; None when
        it is too short or does not authenticate."""
        if len(pkt) < TLS_CRYPT_CLEAR + TLS_CRYPT_OVERHEAD:
            return None
        cipher_key, hmac_key = self._receive
        tag_at = TLS_CRYPT_CLEAR + TLS_CRYPT_PID.size
        tag = pkt[tag_at:tag_at + TLS_CRYPT_TAG_SIZE]
        plain = _aes_ctr(cipher_key, tag[:TLS_CRYPT_IV_SIZE], pkt[tag_at + TLS_CRYPT_TAG_SIZE:])
        if not hmac.compare_digest(hmac.digest(hmac_key, pkt[:tag_at] + plain, "sha256"), tag):
            return None
        pid, _ = TLS_CRYPT_PID.unpack_from(pkt, TLS_CRYPT_CLEAR)
        return pkt[:TLS_CRYPT_CLEAR] + plain, pid


def _aes_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    ctx = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()  # CTR: the same both ways
    return ctx.update(data) + ctx.finalize()


def _unwrapped(tls_crypt: TlsCrypt | None, pkt: bytes) -> bytes | None:
    if tls_crypt is None:
        return pkt
    opened = tls_crypt.unwrap(pkt)
    return None if opened is None else opened[0]


# --- The UDP cookie ----------------------------------------------------------------------

Peer = tuple[str, int]  # IP address as text, port


def new_cookie_key() -> bytes:
    return secrets.token_bytes(COOKIE_KEY_SIZE)


def _cookie(key: bytes, peer: Peer, client_sid: bytes, slot: int) -> bytes:
    ip, port = peer
    msg = struct.pack("!qH", slot, port) + client_sid + ip.encode()
    return hmac.digest(key, msg, COOKIE_DIGEST)[:SID_SIZE]


def _slot(now: float) -> int:
    return int(now // COOKIE_SLOT_S)


def reset_reply(key: bytes, peer: Peer, pkt: bytes, now: float,
                tls_crypt: TlsCrypt | None = None) -> bytes | None:
    """The stateless answer to a client's reset from ``peer`` (None when ``pkt`` is
    not a well-formed P_CONTROL_HARD_RESET_CLIENT_V2, or not under ``tls_crypt``):
    the relay's reset with the cookie as its session id. It acknowledges nothing, so
    it is no larger than the smallest reset; the client acknowledges it, which is the
    proof. ``now`` is the wall clock (tls-crypt's packet ids carry it)."""
    plain = _unwrapped(tls_crypt, pkt)
    sid = None if plain is None else client_reset_session_id(plain)
    if sid is None:
        return None
    reply = build_control(Opcode.CONTROL_HARD_RESET_SERVER_V2, 0,
                          _cookie(key, peer, sid, _slot(now)), [], b"", 0)
    if tls_crypt is None:
        return reply
    return tls_crypt.wrap(reply, TLS_CRYPT_RESET_REPLY_PID, int(now))


@dataclass(frozen=True)
class Proof:
    """A peer showed it receives at its address: the session ids both sides use."""

    client_session_id: bytes
    server_session_id: bytes


# What may carry the proof, with its packet id: the client's ACK, its first TLS
# packet, or (what the stock 2.6 client sends first) its reset again with the ACK.
PROOF_PACKETS = frozenset({(Opcode.ACK_V1, None), (Opcode.CONTROL_V1, 1),
                           (Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0)})


def check_proof(key: bytes, peer: Peer, pkt: bytes, now: float,
                tls_crypt: TlsCrypt | None = None) -> Proof | None:
    """The proof in a client's control packet for key 0 from ``peer`` that
    acknowledges the relay's reset (packet id 0, nothing else) and echoes the cookie
    :func:`reset_reply` made for ``peer`` and its session id in this slot or the one
    before; None for anything else."""
    plain = _unwrapped(tls_crypt, pkt)
    if plain is None:
        return None
    try:
        p = parse_control(plain)
    except Malformed:
        return None
    if ((p.opcode, p.packet_id) not in PROOF_PACKETS or p.key_id
            or p.remote_session_id is None or any(p.acks)):
        return None
    slot = _slot(now)
    for s in (slot, slot - 1):
        if hmac.compare_digest(_cookie(key, peer, p.session_id, s), p.remote_session_id):
            return Proof(p.session_id, p.remote_session_id)
    return None


# --- Key derivation (ssl.c openvpn_PRF, crypto_openssl.c ssl_tls1_PRF) ----------------


def _p_hash(digest: str, secret: bytes, seed: bytes, size: int) -> bytes:
    out = b""
    a = seed
    while len(out) < size:
        a = hmac.digest(secret, a, digest)
        out += hmac.digest(secret, a + seed, digest)
    return out[:size]


def tls1_prf(secret: bytes, seed: bytes, size: int) -> bytes:
    """The TLS 1.0/1.1 PRF (RFC 2246 section 5): P_MD5 over the first half of
    the secret XOR P_SHA1 over the second (halves overlap by a byte when odd)."""
    half = (len(secret) + 1) // 2
    md5 = _p_hash("md5", secret[:half], seed, size)
    sha1 = _p_hash("sha1", secret[len(secret) - half:], seed, size)
    return bytes(x ^ y for x, y in zip(md5, sha1, strict=True))


def derive_key2(pre_master: bytes, client_random1: bytes, server_random1: bytes,
                client_random2: bytes, server_random2: bytes,
                client_sid: bytes, server_sid: bytes) -> bytes:
    """The 256 bytes of OpenVPN's struct key2 (generate_key_expansion_openvpn_prf)."""
    master = tls1_prf(pre_master, PRF_LABEL_MASTER + client_random1 + server_random1,
                      MASTER_SECRET_SIZE)
    return tls1_prf(master, PRF_LABEL_EXPANSION + client_random2 + server_random2
                    + client_sid + server_sid, KEY2_SIZE)


class DataKeys:
    """AES-256-GCM for one key id, in the server's direction: it sends with
    key2.keys[1] and receives with keys[0]."""

    def __init__(self, key2: bytes) -> None:
        client, server = key2[:2 * KEY_HALF], key2[2 * KEY_HALF:]
        self.decrypt_aead = AESGCM(client[:AES_256_KEY_SIZE])
        self.decrypt_iv = client[KEY_HALF:KEY_HALF + IMPLICIT_IV_SIZE]
        self.encrypt_aead = AESGCM(server[:AES_256_KEY_SIZE])
        self.encrypt_iv = server[KEY_HALF:KEY_HALF + IMPLICIT_IV_SIZE]
        self.send_pid = 0
        self.replay = ReplayWindow()


class ReplayWindow:
    """Sliding-window replay protection (packet_id.c, --replay-window 64):
    each packet id once, none older than the window behind the highest seen."""

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self.highest = 0
        self.seen = 0  # bit i: packet id (highest - i) was accepted

    def check(self, pid: int) -> bool:
        if pid == 0:
            return False
        if pid > self.highest:
            return True
        back = self.highest - pid
        return back < self.size and not (self.seen >> back) & 1

    def commit(self, pid: int) -> None:
        """Record an id that :meth:`check` passed and that authenticated."""
        if pid > self.highest:
            self.seen = ((self.seen << (pid - self.highest)) | 1) & ((1 << self.size) - 1)
            self.highest = pid
        else:
            self.seen |= 1 << (self.highest - pid)


# --- Reliability layer (reliable.c) -----------------------------------------------------


@dataclass
class _Outgoing:
    opcode: Opcode
    payload: bytes
    next_try: float = 0.0  # 0: never sent
    timeout: float = TLS_TIMEOUT_S


class ReliableSend:
    """Numbered control packets, at most SEND_WINDOW unacknowledged, each
    retransmitted with exponential back-off until acknowledged."""

    def __init__(self) -> None:
        self.next_id = 0
        self.base = 0  # the lowest id not acknowledged (next_id when all are)
        self.unacked: dict[int, _Outgoing] = {}
        self.queued_bytes = 0

    def queue(self, opcode: Opcode, payload: bytes) -> None:
        self.unacked[self.next_id] = _Outgoing(opcode, payload)
        self.next_id += 1
        self.queued_bytes += len(payload)

    def ack(self, pid: int) -> None:
        e = self.unacked.pop(pid, None)
        if e is None:
            return
        self.queued_bytes -= len(e.payload)
        while self.base < self.next_id and self.base not in self.unacked:
            self.base += 1

    def _window(self) -> list[int]:
        end = min(self.base + SEND_WINDOW, self.next_id)
        return [pid for pid in range(self.base, end) if pid in self.unacked]

    def due(self, now: float) -> list[tuple[int, _Outgoing]]:
        out = []
        for pid in self._window():
            e = self.unacked[pid]
            if e.next_try <= now:
                if e.next_try:  # a retransmission: back off
                    e.timeout *= 2
                e.next_try = now + e.timeout
                out.append((pid, e))
        return out

    def next_timeout(self) -> float | None:
        tries = [self.unacked[pid].next_try for pid in self._window()]
        return min(tries) if tries else None


class ReliableReceive:
    """Accepts numbered packets within RECEIVE_WINDOW of the next expected id,
    acknowledges them (duplicates again: our ACK may have been lost) and hands
    them over in order."""

    def __init__(self) -> None:
        self.next_id = 0
        self.buffered: dict[int, ControlPacket] = {}
        self.acks: list[int] = []

    def receive(self, p: ControlPacket) -> None:
        pid = p.packet_id
        assert pid is not None
        if pid >= self.next_id + RECEIVE_WINDOW:
            return  # no room: no ACK, the sender retries later
        if pid not in self.acks:
            self.acks.append(pid)
        if pid >= self.next_id:
            self.buffered.setdefault(pid, p)

    def ready(self) -> list[ControlPacket]:
        out = []
        while self.next_id in self.buffered:
            out.append(self.buffered.pop(self.next_id))
            self.next_id += 1
        return out


# --- Key-method 2 (ssl.c key_method_2_read/write) ------------------------------------


@dataclass
class KeyMethod2:
    pre_master: bytes
    random1: bytes
    random2: bytes
    options: str
    username: str
    password: str
    peer_info: dict[str, str]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise IndexError
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def string(self) -> str:
        """u16 length (counting a trailing NUL), then the bytes; 0 = empty."""
        (n,) = struct.unpack("!H", self.take(2))
        return self.take(n).rstrip(b"\0").decode("utf-8", "replace") if n else ""


def parse_key_method_2(data: bytes) -> tuple[KeyMethod2, int] | None:
    """The client's message and its length, None if more bytes are needed."""
    r = _Reader(data)
    try:
        if r.take(4) != b"\0\0\0\0":
            raise Malformed("key-method 2 message does not start with 4 zero bytes")
        method = r.take(1)[0]
        if method & KEY_METHOD_MASK != KEY_METHOD_2:
            raise Malformed(f"key method {method & KEY_METHOD_MASK} (only 2 exists)")
        pre_master, random1, random2 = (r.take(PRE_MASTER_SIZE), r.take(RANDOM_SIZE),
                                        r.take(RANDOM_SIZE))
        options = r.string()
        username = r.string()
        password = r.string()
    except IndexError:
        return None
    peer_info: dict[str, str] = {}
    if r.pos < len(data):  # peer-info is the last field; old clients omit it
        try:
            text = r.string()
        except IndexError:
            return None
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                peer_info[key] = value
    return KeyMethod2(pre_master, random1, random2, options, username, password, peer_info), r.pos


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("!H", len(raw)) + raw


def server_key_method_2(random1: bytes, random2: bytes, options: str) -> bytes:
    """The server's message: no pre_master, empty user, password and peer-info."""
    return (b"\0\0\0\0" + bytes([KEY_METHOD_2]) + random1 + random2 + _string(options)
            + b"\0\0" * 3)


def option_value(options: str, name: str) -> str | None:
    """The value of ``name`` in an OCC options string ("V4,dev-type tun,...")."""
    for item in options.split(","):
        key, _, value = item.partition(" ")
        if key == name:
            return value
    return None


# --- The state machine -------------------------------------------------------------------


class KeyState:
    """One key id: its reliability layer, TLS session and, once key-method 2 is
    done, its data keys (OpenVPN's struct key_state)."""

    def __init__(self, key_id: int, ctx: ssl.SSLContext, now: float) -> None:
        self.key_id = key_id
        self.send = ReliableSend()
        self.recv = ReliableReceive()
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.handshake_done = False
        self.plaintext = b""
        self.keys: DataKeys | None = None
        self.deadline = now + HAND_WINDOW_S  # key negotiation must finish by then
        self.expires: float | None = None  # set when a newer key takes over


class OpenVPNServer:
    """One client session: over TCP from the client's reset, over UDP from the
    ``proof`` that the peer receives at its address (:func:`check_proof`)."""

    def __init__(self, ctx: ssl.SSLContext, *, tcp: bool, peer_id: int, now: float,
                 proof: Proof | None = None, tls_crypt: TlsCrypt | None = None,
                 wall: int = 0) -> None:
        """``wall``: the wall-clock second, which tls-crypt's packet ids carry."""
        if not 0 <= peer_id <= PEER_ID_MAX:
            raise ValueError(f"peer id {peer_id} out of range")
        if tcp == (proof is not None):
            raise ValueError("a UDP session starts from a proof, a TCP one from a reset")
        self.ctx = ctx
        self.tcp = tcp
        self.peer_id = peer_id
        self.session_id = secrets.token_bytes(SID_SIZE)
        self.remote_session_id: bytes | None = None
        self.keys: dict[int, KeyState] = {}
        self.active: KeyState | None = None  # newest key with data keys
        self.dev_type = "tun"
        self.push_reply_text: str | None = None
        self.push_repeat_after = 0.0  # PUSH_REQUESTs before this are not answered again
        self.closing_at: float | None = None  # AUTH_FAILED queued: close when acked
        self.closed = False
        self.last_rx = now
        self.last_tx = now
        self.drops: Counter[str] = Counter()
        self._stream = bytearray()
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self.tls_crypt = tls_crypt
        # Our packet ids go on after the stateless reply's; the client's are checked
        # against replays (its sequence never restarts within a session).
        self._wrap_time = wall
        self._wrap_pid = TLS_CRYPT_RESET_REPLY_PID + 1 if proof is not None else 1
        self._wrap_replay = ReplayWindow()
        if proof is not None:
            # The resets crossed statelessly: ours (packet id 0) is acknowledged by
            # the proof, the client's (packet id 0) is received and owed an ACK.
            self.session_id = proof.server_session_id
            self.remote_session_id = proof.client_session_id
            ks = self.keys[0] = KeyState(0, ctx, now)
            ks.send.next_id = ks.send.base = 1
            ks.recv.next_id = 1
            ks.recv.acks.append(0)

    # -- input ----------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Bytes from the TCP stream: 16-bit length, packet, ..."""
        buf = self._stream
        buf += data
        pos = 0
        while len(buf) - pos >= TCP_LENGTH.size and not self.closed:
            (n,) = TCP_LENGTH.unpack_from(buf, pos)
            if not 0 < n <= MAX_PACKET_BYTES:
                self._fail(f"{n}-byte packet in the TCP stream (at most {MAX_PACKET_BYTES})",
                           "packet-too-large" if n else "protocol-error")
                break
            first = pos + TCP_LENGTH.size
            if (self.remote_session_id is None and len(buf) > first
                    and buf[first] != Opcode.CONTROL_HARD_RESET_CLIENT_V2 << OPCODE_SHIFT):
                self._fail("the TCP stream does not start with P_CONTROL_HARD_RESET_CLIENT_V2")
                break
            if len(buf) - pos - TCP_LENGTH.size < n:
                break
            start = pos + TCP_LENGTH.size
            self._packet(bytes(buf[start:start + n]), now)
            pos = start + n
        del buf[:pos]
        return self._finish(now)

    def receive_datagram(self, pkt: bytes, now: float) -> list[Event]:
        if len(pkt) > MAX_PACKET_BYTES:
            self._drop(f"datagram larger than {MAX_PACKET_BYTES} bytes")
        elif not self.closed:
            self._packet(pkt, now)
        return self._finish(now)

    def _packet(self, pkt: bytes, now: float) -> None:
        if not pkt:
            self._drop("empty packet")
            return
        op = pkt[0] >> OPCODE_SHIFT
        if op == Opcode.DATA_V2 or op == Opcode.DATA_V1:
            self._data(pkt, now)
            return
        if self.tls_crypt is not None:
            opened = self.tls_crypt.unwrap(pkt)
            if opened is None:
                self._hostile("control packet failed tls-crypt authentication")
                return
            pkt, pid = opened
            if not self._wrap_replay.check(pid):
                self._drop("replayed tls-crypt packet id")
                return
            self._wrap_replay.commit(pid)
        try:
            p = parse_control(pkt)
        except Malformed as exc:
            self._hostile(str(exc))
            return
        if self.remote_session_id is None:  # TCP: the stream's first packet
            if p.opcode is not Opcode.CONTROL_HARD_RESET_CLIENT_V2 or p.key_id:
                self._hostile(f"{p.opcode.name} before P_CONTROL_HARD_RESET_CLIENT_V2")
                return
            self.remote_session_id = p.session_id
            ks = self.keys[0] = KeyState(0, self.ctx, now)
            ks.send.queue(Opcode.CONTROL_HARD_RESET_SERVER_V2, b"")
        elif p.session_id != self.remote_session_id:
            self._hostile("control packet from another session id")
            return
        if p.acks and p.remote_session_id != self.session_id:
            self._hostile("ACK for another session id")
            return
        ks = self.keys.get(p.key_id)
        if p.opcode is Opcode.CONTROL_SOFT_RESET_V1 and ks is None:
            ks = self._soft_reset(p.key_id, now)
        if ks is None:
            self._drop(f"control packet for unknown key id {p.key_id}")
            return
        self.last_rx = now
        for pid in p.acks:
            ks.send.ack(pid)
        if p.packet_id is None:
            return
        ks.recv.receive(p)
        for q in ks.recv.ready():
            if q.opcode is Opcode.CONTROL_V1:
                self._tls_input(ks, q.payload, now)
            # Resets carry no TLS data (a 2.6 client may add early-negotiation TLVs
            # for tls-crypt-v2, which the relay does not use).
            if self.closed:
                return

    def _soft_reset(self, key_id: int, now: float) -> KeyState | None:
        """The client renegotiates: a new key state beside the current one."""
        if self.active is None or key_id == 0:
            self._drop(f"soft reset for key id {key_id} before the first key")
            return None
        for old in [k for k in self.keys.values() if k is not self.active]:
            del self.keys[old.key_id]  # at most the active key and the new one
        if key_id == self.active.key_id:
            self._drop(f"soft reset for the active key id {key_id}")
            return None
        ks = self.keys[key_id] = KeyState(key_id, self.ctx, now)
        ks.send.queue(Opcode.CONTROL_SOFT_RESET_V1, b"")
        return ks

    # -- TLS and the control-channel messages -------------------------------------------

    def _tls_input(self, ks: KeyState, data: bytes, now: float) -> None:
        ks.incoming.write(data)
        try:
            if not ks.handshake_done:
                ks.tls.do_handshake()
                ks.handshake_done = True
            while chunk := ks.tls.read(MAX_PLAINTEXT_BYTES):
                ks.plaintext += chunk
                if len(ks.plaintext) > MAX_PLAINTEXT_BYTES:
                    self._fail(f"more than {MAX_PLAINTEXT_BYTES} bytes of control text "
                               "without a complete message", "control-text-too-long")
                    return
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLZeroReturnError:
            self._events.append(PeerExit("TLS session closed by the client"))
            self.closed = True
            return
        except ssl.SSLError as exc:
            what = "handshake" if not ks.handshake_done else "record"
            self._fail(f"TLS {what} failed: {exc.reason or exc}")
            return
        self._plaintext(ks, now)

    def _plaintext(self, ks: KeyState, now: float) -> None:
        if ks.keys is None and ks.plaintext:
            try:
                parsed = parse_key_method_2(ks.plaintext)
            except Malformed as exc:
                self._fail(str(exc))
                return
            if parsed is None:
                return
            km2, used = parsed
            ks.plaintext = ks.plaintext[used:]
            self._key_exchange(ks, km2, now)
        while b"\0" in ks.plaintext and not self.closed:
            raw, _, ks.plaintext = ks.plaintext.partition(b"\0")
            self._control_message(raw.decode("utf-8", "replace"), now)

    def _key_exchange(self, ks: KeyState, km2: KeyMethod2, now: float) -> None:
        assert self.remote_session_id is not None
        if ks.key_id == 0:
            ciphers = km2.peer_info.get("IV_CIPHERS", "")
            if CIPHER not in ciphers.split(":") and "IV_NCP" not in km2.peer_info:
                self._fail(f"the client does not offer {CIPHER} (IV_CIPHERS={ciphers!r})")
                return
            self.dev_type = "tap" if option_value(km2.options, "dev-type") == "tap" else "tun"
            self._events.append(ClientAuth(km2.username, km2.password, km2.peer_info,
                                           self.dev_type))
        random1, random2 = secrets.token_bytes(RANDOM_SIZE), secrets.token_bytes(RANDOM_SIZE)
        ks.tls.write(server_key_method_2(random1, random2, self._options_string()))
        ks.keys = DataKeys(derive_key2(km2.pre_master, km2.random1, random1, km2.random2,
                                       random2, self.remote_session_id, self.session_id))
        previous = self.active
        self.active = ks
        if previous is not None:
            previous.expires = now + TRANSITION_WINDOW_S

    def _options_string(self) -> str:
        proto = "TCPv4_SERVER" if self.tcp else "UDPv4"
        return (f"V4,dev-type {self.dev_type},link-mtu 1550,tun-mtu 1500,proto {proto},"
                f"cipher {CIPHER},auth [null-digest],keysize 256,key-method 2,tls-server")

    def _control_message(self, text: str, now: float) -> None:
        if text == "PUSH_REQUEST":
            if self.push_reply_text is None:
                if self.closing_at is None:
                    self._events.append(PushRequest())
            elif now >= self.push_repeat_after:  # the client lost what we sent
                self._send_text(self.push_reply_text)
                self.push_repeat_after = now + PUSH_REPLY_HOLDOFF_S
        elif text == "EXIT" or text.startswith("EXIT,"):
            self._events.append(PeerExit("exit notification (control channel)"))
            self.closed = True
        else:
            self._drop("unknown control message")

    def _send_text(self, text: str) -> None:
        assert self.active is not None
        self.active.tls.write(text.encode() + b"\0")

    # -- the application's answers ------------------------------------------------------

    def push_reply(self, params: PushParams, now: float) -> list[Event]:
        items = ["PUSH_REPLY", "redirect-gateway def1", f"route-gateway {params.gateway}"]
        if self.dev_type == "tun":
            items.append("topology subnet")
        items += [f"ping {PING_INTERVAL_S}", f"ping-restart {PING_RESTART_S}",
                  f"ifconfig {params.address} {params.netmask}"]
        items += [f"dhcp-option DNS {ip}" for ip in params.dns]
        if params.lladdr is not None:
            items.append(f"lladdr {params.lladdr}")
        items += [f"tun-mtu {params.mtu}", f"peer-id {self.peer_id}", f"cipher {CIPHER}"]
        self.push_reply_text = ",".join(items)
        self._send_text(self.push_reply_text)
        self.push_repeat_after = now + PUSH_REPLY_HOLDOFF_S
        return self._finish(now)

    def auth_failed(self, message: str, now: float, *, temporary: bool = False) -> list[Event]:
        """Refuse the login (``temporary``: the client may retry later, OpenVPN
        2.6's AUTH_FAILED,TEMP); :class:`Closed` follows once the client has it."""
        self._send_text(f"AUTH_FAILED,{'TEMP:' if temporary else ''}{message}")
        self.closing_at = now + SCHEDULED_EXIT_S
        return self._finish(now)

    def disconnect(self, message: str, *, restart: bool, now: float) -> None:
        """Tell the client the relay ends the session (RESTART: come back later;
        HALT: do not) and stop; the caller sends what is queued, then closes."""
        if self.active is not None:
            self._send_text(f"{'RESTART' if restart else 'HALT'},{message}")
        self._finish(now)
        self.closed = True

    # -- data channel --------------------------------------------------------------------

    def encrypt(self, payload: bytes) -> bytes | None:
        """One data packet to send (framed for TCP), None before keys exist or
        when the key's packet ids are used up (the client renegotiates long before)."""
        ks = self.active
        if ks is None or ks.keys is None or self.closed:
            return None
        k = ks.keys
        pid = k.send_pid + 1
        if pid > PACKET_ID_MAX:
            return None
        k.send_pid = pid
        pid_bytes = pid.to_bytes(4, "big")
        head = bytes([(Opcode.DATA_V2 << OPCODE_SHIFT) | ks.key_id]) \
            + self.peer_id.to_bytes(3, "big") + pid_bytes
        ct = k.encrypt_aead.encrypt(pid_bytes + k.encrypt_iv, payload, head)
        pkt = head + ct[-GCM_TAG_SIZE:] + ct[:-GCM_TAG_SIZE]
        return TCP_LENGTH.pack(len(pkt)) + pkt if self.tcp else pkt

    def _data(self, pkt: bytes, now: float) -> None:
        v2 = pkt[0] >> OPCODE_SHIFT == Opcode.DATA_V2
        head_len = 4 if v2 else 1
        ks = self.keys.get(pkt[0] & KEY_ID_MASK)
        if ks is None or ks.keys is None:
            self._drop("data packet for a key not (yet) negotiated")
            return
        if len(pkt) < head_len + PACKET_ID_SIZE + GCM_TAG_SIZE:
            self._drop("truncated data packet")
            return
        k = ks.keys
        pid_end = head_len + PACKET_ID_SIZE
        pid_bytes = pkt[head_len:pid_end]
        pid = int.from_bytes(pid_bytes, "big")
        if not k.replay.check(pid):
            self._drop("replayed or too old data packet id")
            return
        tag_end = pid_end + GCM_TAG_SIZE
        aad = pkt[:pid_end] if v2 else pid_bytes
        try:
            plain = k.decrypt_aead.decrypt(pid_bytes + k.decrypt_iv,
                                           pkt[tag_end:] + pkt[pid_end:tag_end], aad)
        except InvalidTag:
            self._drop("data packet failed authentication (GCM tag)")
            return
        k.replay.commit(pid)
        self.last_rx = now
        if plain == PING_MAGIC:
            return
        if plain[:len(OCC_MAGIC)] == OCC_MAGIC:
            if plain[len(OCC_MAGIC):len(OCC_MAGIC) + 1] == bytes([OCC_EXIT]):
                self._events.append(PeerExit("exit notification (OCC_EXIT)"))
                self.closed = True
            return  # other OCC messages only matter in static-key mode
        self._events.append(Packet(bytearray(plain)))

    # -- time ----------------------------------------------------------------------------

    def next_timeout(self) -> float | None:
        times: list[float] = []
        for ks in self.keys.values():
            t = ks.send.next_timeout()
            if t is not None:
                times.append(t)
            times.append(ks.expires if ks.expires is not None
                         else ks.deadline if ks.keys is None else float("inf"))
        if self.push_reply_text is not None:
            times += [self.last_tx + PING_INTERVAL_S, self.last_rx + SERVER_PING_RESTART_S]
        if self.closing_at is not None:
            times.append(self.closing_at)
        finite = [t for t in times if t != float("inf")]
        return min(finite) if finite and not self.closed else None

    def handle_timeout(self, now: float) -> list[Event]:
        if self.closed:
            return []
        if self.closing_at is not None and now >= self.closing_at:
            self._events.append(Closed())
            self.closed = True
            return self._finish(now)
        for ks in list(self.keys.values()):
            if ks.expires is not None and now >= ks.expires:
                del self.keys[ks.key_id]
            elif ks.keys is None and now >= ks.deadline:
                if ks.key_id == 0:
                    self._events.append(PeerDead(
                        f"TLS key negotiation did not finish within {HAND_WINDOW_S:.0f} s"))
                    self.closed = True
                    return self._finish(now)
                self.drops["renegotiation timed out"] += 1
                del self.keys[ks.key_id]
        if self.push_reply_text is not None:
            if now - self.last_rx >= SERVER_PING_RESTART_S:
                idle = now - self.last_rx
                self._events.append(PeerDead(f"nothing from the client for {idle:.0f} s"))
                self.closed = True
                return self._finish(now)
            if now - self.last_tx >= PING_INTERVAL_S:
                ping = self.encrypt(PING_MAGIC)
                if ping is not None:
                    self._out.append(ping)
                    self.last_tx = now
        return self._finish(now)

    # -- output ---------------------------------------------------------------------------

    def packets_to_send(self) -> list[bytes]:
        """Packets (UDP) or framed bytes (TCP) to write, in order."""
        out, self._out = self._out, []
        return out

    def note_sent(self, now: float) -> None:
        """A data packet went out (keepalive pings are only needed when idle)."""
        self.last_tx = now

    def _finish(self, now: float) -> list[Event]:
        for ks in self.keys.values():
            if not self._flush_key(ks, now):
                break
        if (self.closing_at is not None and not self.closed
                and all(not ks.send.unacked for ks in self.keys.values())):
            self._events.append(Closed())
            self.closed = True
        events, self._events = self._events, []
        return events

    def _flush_key(self, ks: KeyState, now: float) -> bool:
        """Send what is due on one key; False when the peer exceeded the send cap."""
        pending = ks.outgoing.read()
        if ks.send.queued_bytes + len(pending) > MAX_SEND_QUEUE_BYTES:
            self._fail(f"more than {MAX_SEND_QUEUE_BYTES} bytes of control packets "
                       "unacknowledged", "send-queue-full")
            return False
        while pending:
            ks.send.queue(Opcode.CONTROL_V1, pending[:TLS_PAYLOAD_MAX])
            pending = pending[TLS_PAYLOAD_MAX:]
        remote = self.remote_session_id or b""
        acks = ks.recv.acks
        for pid, e in ks.send.due(now):
            carried, acks = acks[:CONTROL_SEND_ACK_MAX], acks[CONTROL_SEND_ACK_MAX:]
            self._emit(build_control(e.opcode, ks.key_id, self.session_id, carried, remote,
                                     pid, e.payload), now)
        while acks:
            carried, acks = acks[:RELIABLE_ACK_SIZE], acks[RELIABLE_ACK_SIZE:]
            self._emit(build_control(Opcode.ACK_V1, ks.key_id, self.session_id, carried,
                                     remote, None), now)
        ks.recv.acks = []
        return True

    def _emit(self, pkt: bytes, now: float) -> None:
        if self.tls_crypt is not None:
            if self._wrap_pid > PACKET_ID_MAX:  # tls_crypt_wrap: "packet ID roll over"
                if not self.closed:
                    self._fail("tls-crypt packet ids used up")
                return
            pkt = self.tls_crypt.wrap(pkt, self._wrap_pid, self._wrap_time)
            self._wrap_pid += 1
        self._out.append(TCP_LENGTH.pack(len(pkt)) + pkt if self.tcp else pkt)
        self.last_tx = now

    # -- errors ---------------------------------------------------------------------------

    def _drop(self, why: str) -> None:
        self.drops[why] += 1

    def _hostile(self, why: str) -> None:
        """Malformed control input: a TCP stream is beyond repair, a UDP
        datagram is dropped (anyone can spoof one)."""
        if self.tcp:
            self._fail(why)
        else:
            self._drop(why)

    def _fail(self, message: str, reason: str = "protocol-error") -> None:
        self._events.append(ProtocolError(message, reason))
        self.closed = True

