"""The stateless answer to a UDP reset (``mudp.c`` do_pre_decrypt_check, ``ssl_pkt.c``
calculate_session_id_hmac and check_session_hmac_and_pkt_id).

Over UDP anyone can forge a reset "from" any address, so a reset gets a stateless
answer (:func:`reset_reply`, as OpenVPN 2.6's ``mudp.c`` does): the relay's session
id in it is a cookie, an HMAC over the peer's address and port, the client's
session id and a coarse time slot under a key drawn at start. Only a later packet
from that address that echoes the cookie (:func:`check_proof`) shows the peer
receives there; the session state starts then. The answer acknowledges nothing, so
it is no larger than the reset it answers (14 bytes each); the ACK of the client's
reset follows the proof.
"""

from __future__ import annotations

import hmac
import secrets
import struct
from dataclasses import dataclass

from relay.protocols.openvpn.keys import HAND_WINDOW_S
from relay.protocols.openvpn.tlscrypt import TLS_CRYPT_RESET_REPLY_PID, TlsCrypt
from relay.protocols.openvpn.wire import (
    SID_SIZE,
    Malformed,
    Opcode,
    build_control,
    client_reset_session_id,
    parse_control,
)

# HMAC-SHA256 under a 256-bit key drawn when the relay starts (session_id_hmac_init);
# a restart only invalidates the handshakes in progress.
COOKIE_KEY_SIZE = 32
COOKIE_DIGEST = "sha256"
# Time is cut into slots of half the hand window, as OpenVPN quantises it
# ((handwindow + 1) / 2); a cookie holds in its own slot and the next, so a client
# has 30 to 60 s to echo it (it does so within a round trip).
COOKIE_SLOT_S = HAND_WINDOW_S / 2

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


@dataclass(frozen=True, slots=True)
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


def _unwrapped(tls_crypt: TlsCrypt | None, pkt: bytes) -> bytes | None:
    if tls_crypt is None:
        return pkt
    opened = tls_crypt.unwrap(pkt)
    return None if opened is None else opened[0]
