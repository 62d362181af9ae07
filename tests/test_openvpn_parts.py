"""The parts of the OpenVPN protocol that hold no session, each against its
reference: the TLS-PRF and key expansion (keys), the control packet codec (wire),
the replay window, the reliability layer's send window, tls-crypt and its key
file, and the stateless UDP cookie (the session is in test_openvpn.py)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_openvpn import CLIENT_TLS_CRYPT, COOKIE_KEY, PEER, STATIC_KEY, T0

from relay.protocols.openvpn.cookie import COOKIE_SLOT_S, Proof, check_proof, reset_reply
from relay.protocols.openvpn.keys import ReplayWindow, derive_key2, tls1_prf
from relay.protocols.openvpn.reliable import SEND_WINDOW, ReliableSend
from relay.protocols.openvpn.tlscrypt import (
    TLS_CRYPT_OVERHEAD,
    TlsCrypt,
    format_static_key,
    parse_static_key,
)
from relay.protocols.openvpn.wire import (
    Malformed,
    Opcode,
    build_control,
    client_reset_session_id,
    control_session_id,
    parse_control,
)

# --- the PRF and key derivation --------------------------------------------------------


def test_tls1_prf_matches_openvpns_own_test_vector() -> None:
    # tests/unit_tests/openvpn/test_crypto.c (crypto_test_tls_prf): an odd-length
    # secret, so the MD5 and SHA-1 halves overlap by one byte.
    secret = (b"Lorem ipsum dolor sit amet, consectetur adipisici elit, sed eiusmod tempor "
              b"incidunt ut labore et dolore magna aliqua.")
    seed = b"Quis aute iure reprehenderit in voluptate velit esse cillum dolore"
    assert len(secret) % 2 == 1
    assert tls1_prf(secret, seed, 32) == bytes.fromhex(
        "d98c8518c85e946927916acfc2d592fbb1567e4b4b1459e6a904ac2ddab72d67")


def test_key_expansion_is_two_prf_rounds_with_both_session_ids() -> None:
    pre, cr1, sr1, cr2, sr2 = (bytes([i]) * n for i, n in
                               ((1, 48), (2, 32), (3, 32), (4, 32), (5, 32)))
    csid, ssid = b"C" * 8, b"S" * 8
    master = tls1_prf(pre, b"OpenVPN master secret" + cr1 + sr1, 48)
    expected = tls1_prf(master, b"OpenVPN key expansion" + cr2 + sr2 + csid + ssid, 256)
    key2 = derive_key2(pre, cr1, sr1, cr2, sr2, csid, ssid)
    assert key2 == expected and len(key2) == 256
    # Swapping the session ids (a server that mixed up its roles) changes every key.
    assert derive_key2(pre, cr1, sr1, cr2, sr2, ssid, csid)[:32] != key2[:32]


# --- packets -------------------------------------------------------------------------------


def test_control_packet_round_trip_and_truncation() -> None:
    pkt = build_control(Opcode.CONTROL_V1, 3, b"A" * 8, [5, 6], b"B" * 8, 9, b"tls")
    p = parse_control(pkt)
    assert (p.opcode, p.key_id, p.session_id, p.acks, p.remote_session_id, p.packet_id,
            p.payload) == (Opcode.CONTROL_V1, 3, b"A" * 8, (5, 6), b"B" * 8, 9, b"tls")
    ack = parse_control(build_control(Opcode.ACK_V1, 0, b"A" * 8, [1], b"B" * 8, None))
    assert ack.packet_id is None and ack.acks == (1,)
    for cut in range(1, len(pkt) - 3):
        with pytest.raises(Malformed):
            parse_control(pkt[:cut])
    with pytest.raises(Malformed):  # an ACK packet must ACK something
        parse_control(build_control(Opcode.ACK_V1, 0, b"A" * 8, [], b"", None))
    with pytest.raises(Malformed):  # P_DATA is not control
        parse_control(bytes([Opcode.DATA_V2 << 3]) + bytes(20))


def test_client_reset_session_id() -> None:
    reset = build_control(Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0, b"C" * 8, [], b"", 0)
    assert client_reset_session_id(reset) == b"C" * 8
    assert client_reset_session_id(reset[:5]) is None
    v3 = bytes([Opcode.CONTROL_HARD_RESET_CLIENT_V3 << 3]) + reset[1:]
    assert client_reset_session_id(v3) is None  # tls-crypt-v2 is not offered


def test_replay_window() -> None:
    w = ReplayWindow(8)
    assert not w.check(0)
    for pid in (1, 3, 2, 10):
        assert w.check(pid)
        w.commit(pid)
    assert not w.check(3) and not w.check(10)  # each id once
    assert not w.check(2)  # 10 - 2 = 8: out of the window
    assert w.check(4) and w.check(11)
    w.commit(4)
    assert not w.check(4)


# --- the reliability layer ----------------------------------------------------------------


def test_send_window_holds_back_packets_until_acked() -> None:
    send = ReliableSend()
    for i in range(SEND_WINDOW + 3):
        send.queue(Opcode.CONTROL_V1, bytes([i]))
    assert [pid for pid, _ in send.due(T0)] == list(range(SEND_WINDOW))
    send.ack(0)
    send.ack(1)
    assert [pid for pid, _ in send.due(T0)] == [SEND_WINDOW, SEND_WINDOW + 1]
    # An ACK out of order does not move the window; the missing one does.
    send.ack(3)
    assert send.base == 2 and send.due(T0) == []
    send.ack(2)
    assert send.base == 4
    assert [pid for pid, _ in send.due(T0)] == [SEND_WINDOW + 2]
    assert send.queued_bytes == SEND_WINDOW + 3 - 4


# --- the UDP cookie (stateless answer to a reset) --------------------------------------


def test_a_udp_reset_gets_a_stateless_cookie_answer_no_larger_than_the_reset() -> None:
    reset = build_control(Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0, b"C" * 8, [], b"", 0)
    reply = reset_reply(COOKIE_KEY, PEER, reset, T0)
    assert reply is not None and len(reply) == len(reset) == 14
    p = parse_control(reply)
    assert (p.opcode, p.key_id, p.acks, p.packet_id, p.payload) == (
        Opcode.CONTROL_HARD_RESET_SERVER_V2, 0, (), 0, b"")
    # The session id is the cookie: the same inputs give the same answer (no state),
    # and each of key, address, port, client session id and time slot changes it.
    assert reset_reply(COOKIE_KEY, PEER, reset, T0 + 1) == reply
    other_sid = build_control(Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0, b"D" * 8, [], b"", 0)
    variants = [reset_reply(bytes(32), PEER, reset, T0),
                reset_reply(COOKIE_KEY, ("198.18.1.3", PEER[1]), reset, T0),
                reset_reply(COOKIE_KEY, (PEER[0], PEER[1] + 1), reset, T0),
                reset_reply(COOKIE_KEY, PEER, other_sid, T0),
                reset_reply(COOKIE_KEY, PEER, reset, T0 + COOKIE_SLOT_S)]
    assert len({reply, *variants}) == 6
    # Only a client's reset for key 0 with packet id 0 is answered.
    for other in (reset[:13], bytes([Opcode.CONTROL_HARD_RESET_CLIENT_V2 << 3 | 1]) + reset[1:],
                  build_control(Opcode.CONTROL_V1, 0, b"C" * 8, [], b"", 0),
                  build_control(Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0, b"C" * 8, [], b"", 1),
                  b"", os.urandom(14)[:1] + bytes(13)):
        if client_reset_session_id(other) is None:
            assert reset_reply(COOKIE_KEY, PEER, other, T0) is None


def test_the_proof_must_echo_the_cookie_of_that_address_and_session_in_time() -> None:
    sid = b"C" * 8
    reset = build_control(Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0, sid, [], b"", 0)
    reply = reset_reply(COOKIE_KEY, PEER, reset, T0)
    assert reply is not None
    cookie = parse_control(reply).session_id

    def ack(remote: bytes = cookie, acks: tuple[int, ...] = (0,), op: Opcode = Opcode.ACK_V1,
            pid: int | None = None, key_id: int = 0, own: bytes = sid) -> bytes:
        return build_control(op, key_id, own, list(acks), remote, pid)

    good = check_proof(COOKIE_KEY, PEER, ack(), T0)
    assert good == Proof(client_session_id=sid, server_session_id=cookie)
    # The stock client's reset again with the ACK, or its first TLS packet, prove it too.
    for pkt in (ack(op=Opcode.CONTROL_HARD_RESET_CLIENT_V2, pid=0),
                ack(op=Opcode.CONTROL_V1, pid=1)):
        assert check_proof(COOKIE_KEY, PEER, pkt, T0) == good
    # Good until the end of the slot after the one it was made in.
    slot_end = (T0 // COOKIE_SLOT_S + 2) * COOKIE_SLOT_S
    assert check_proof(COOKIE_KEY, PEER, ack(), slot_end - 0.001) == good
    refused = [
        check_proof(COOKIE_KEY, PEER, ack(), slot_end),  # too late
        check_proof(COOKIE_KEY, ("198.18.1.3", PEER[1]), ack(), T0),  # another address
        check_proof(COOKIE_KEY, (PEER[0], PEER[1] + 1), ack(), T0),  # another port
        check_proof(bytes(32), PEER, ack(), T0),  # after a restart (a new key)
        check_proof(COOKIE_KEY, PEER, ack(own=b"D" * 8), T0),  # another session
        check_proof(COOKIE_KEY, PEER, ack(remote=bytes(8)), T0),  # a guessed cookie
        check_proof(COOKIE_KEY, PEER, ack(acks=(1,)), T0),  # ACKs what was never sent
        check_proof(COOKIE_KEY, PEER, ack(acks=(0, 5)), T0),
        check_proof(COOKIE_KEY, PEER, ack(key_id=1), T0),
        check_proof(COOKIE_KEY, PEER, ack(op=Opcode.CONTROL_V1, pid=7), T0),
        check_proof(COOKIE_KEY, PEER, ack(op=Opcode.CONTROL_SOFT_RESET_V1, pid=1), T0),
        check_proof(COOKIE_KEY, PEER, reset, T0),  # no ACK: nothing echoed
        check_proof(COOKIE_KEY, PEER, ack()[:-1], T0),
    ]
    assert refused == [None] * len(refused)


@settings(max_examples=2000, deadline=None)
@given(pkt=st.binary(max_size=64), now=st.floats(0, 1e9))
def test_the_stateless_udp_path_never_raises(pkt: bytes, now: float) -> None:
    reply = reset_reply(COOKIE_KEY, PEER, pkt, now)
    assert reply is None or len(reply) <= len(pkt)
    check_proof(COOKIE_KEY, PEER, pkt, now)
    control_session_id(pkt)


# --- tls-crypt -----------------------------------------------------------------------------


def test_static_key_file_round_trip() -> None:
    text = format_static_key(STATIC_KEY)
    assert text.startswith("-----BEGIN OpenVPN Static key V1-----\n")
    assert len(text.splitlines()) == 2 + 256 * 2 // 32
    assert parse_static_key("# openvpn --genkey secret\n" + text) == STATIC_KEY
    for bad in ("", text.replace("V1-----\n", "V1-----\n00", 1), text.replace("0001", "zz", 1)):
        with pytest.raises(ValueError):
            parse_static_key(bad)


def test_tls_crypt_wrap_hides_and_authenticates_the_control_packet() -> None:
    server = TlsCrypt(STATIC_KEY)
    pkt = build_control(Opcode.CONTROL_V1, 0, b"C" * 8, [3], b"S" * 8, 4, b"secret TLS")
    wrapped = CLIENT_TLS_CRYPT.wrap(pkt, 9, 1234)
    assert len(wrapped) == len(pkt) + TLS_CRYPT_OVERHEAD
    assert wrapped[:9] == pkt[:9] and b"secret" not in wrapped  # opcode and sid in clear
    assert wrapped[9:17] == struct.pack("!II", 9, 1234)
    assert server.unwrap(wrapped) == (pkt, 9)
    # Every byte counts; the client's own direction does not open it; runts fail.
    for i in range(len(wrapped)):
        bad = bytearray(wrapped)
        bad[i] ^= 1
        assert server.unwrap(bytes(bad)) is None
    assert CLIENT_TLS_CRYPT.unwrap(wrapped) is None
    assert server.unwrap(wrapped[:9 + TLS_CRYPT_OVERHEAD - 1]) is None
    assert CLIENT_TLS_CRYPT.unwrap(server.wrap(pkt, 1, 1)) == (pkt, 1)


def test_without_the_tls_crypt_key_a_reset_gets_no_answer() -> None:
    tls_crypt = TlsCrypt(STATIC_KEY)
    plain = build_control(Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0, b"C" * 8, [], b"", 0)
    assert reset_reply(COOKIE_KEY, PEER, plain, T0, tls_crypt) is None
    stranger = TlsCrypt(bytes(256))
    assert reset_reply(COOKIE_KEY, PEER, stranger.wrap(plain, 1, 1), T0, tls_crypt) is None
    wrapped = CLIENT_TLS_CRYPT.wrap(plain, 1, 1)
    reply = reset_reply(COOKIE_KEY, PEER, wrapped, T0, tls_crypt)
    assert reply is not None and len(reply) == len(wrapped) == 14 + TLS_CRYPT_OVERHEAD
