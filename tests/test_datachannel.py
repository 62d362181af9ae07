"""The OpenVPN data channel in C (relay.serve.datachannel, cext/ovpn.c) against its
Python twin (relay.protocols.openvpn.datachannel): the same packets sealed to the
same bytes, the same statuses, plaintext and replay windows for packets opened,
genuine, forged, replayed, cut or of no key, one at a time and in batches, for
both ciphers; the TCP stream cut anywhere; the UDP runs. Hypothesis draws the
batches."""

from __future__ import annotations

import os
from array import array

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.protocols.openvpn import datachannel as py
from relay.protocols.openvpn.datachannel import (
    DATA,
    NO_KEY,
    OCC,
    PING,
    REPLAY,
    V2_OVERHEAD,
    Opened,
    PyDataChannel,
    udp_runs,
)
from relay.protocols.openvpn.keys import DATA_CIPHERS, REPLAY_WINDOW, DataKeys
from relay.protocols.openvpn.wire import MAX_PACKET_BYTES, OCC_MAGIC, PING_MAGIC, TCP_LENGTH
from relay.serve import datachannel as c
from relay.serve.batch_py import ADDR_SIZE
from relay.serve.datachannel import CDataChannel

KEY2 = bytes(range(256))
SERVER = {cipher: DataKeys.from_key2(cipher, KEY2) for cipher in DATA_CIPHERS}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def client_keys(cipher: str) -> DataKeys:
    """The client's direction of the same key2: it sends what the server opens."""
    k = SERVER[cipher]
    return DataKeys(cipher, k.decrypt_key, k.decrypt_iv, k.encrypt_key, k.encrypt_iv)


def pair(keys: DataKeys, key_id: int = 0) -> tuple[PyDataChannel, CDataChannel]:
    a, b = PyDataChannel(), CDataChannel()
    a.install(key_id, keys)
    b.install(key_id, keys)
    return a, b


def batch(pkts: list[bytes], gap: int = 0) -> tuple[bytearray, array[int]]:
    buf, spans = bytearray(), array("I")
    for p in pkts:
        spans.extend((len(buf), len(p)))
        buf += p + bytes(gap)
    return buf, spans


def same(x: Opened, y: Opened) -> Opened:
    """Two results agree on everything, and on every authenticated plaintext."""
    assert (x.counts, x.status, x.spans, x.data, x.end) == (y.counts, y.status, y.spans,
                                                            y.data, y.end)
    for i, status in enumerate(x.status):
        if status in (DATA, PING, OCC):
            off, n = x.spans[2 * i], x.spans[2 * i + 1]
            assert x.plain[off:off + n] == y.plain[off:off + n]
    return x


def sealed_by_client(cipher: str, payloads: list[bytes], key_id: int = 0,
                     peer_id: int = 7) -> list[bytes]:
    ch = PyDataChannel()
    ch.install(key_id, client_keys(cipher))
    out = ch.seal(key_id, peer_id, *batch(payloads), tcp=False)
    return [bytes(out.data[out.spans[i]:out.spans[i] + out.spans[i + 1]])
            for i in range(0, len(out.spans), 2)]


@pytest.mark.parametrize("cipher", DATA_CIPHERS)
@pytest.mark.parametrize("tcp", [False, True])
def test_sealed_the_same_bytes_and_openable_by_the_aead_itself(cipher: str, tcp: bool) -> None:
    payloads = [b"", b"x", PING_MAGIC, os.urandom(1400), os.urandom(64)]
    a, b = pair(SERVER[cipher], key_id=2)
    for _ in range(2):  # the packet ids go on from one call to the next
        x = a.seal(2, 0xABCDEF, *batch(payloads, gap=3), tcp=tcp)
        y = b.seal(2, 0xABCDEF, *batch(payloads, gap=3), tcp=tcp)
        assert bytes(x.data[:x.size]) == bytes(y.data[:y.size])
        assert (x.spans, x.count, x.size, x.payload_bytes) == \
            (y.spans, y.count, y.size, y.payload_bytes) == \
            (x.spans, 5, sum(map(len, payloads)) + 5 * (V2_OVERHEAD + 2 * tcp), 1464 + 16 + 1)
    assert a.key_state(2) == b.key_state(2) == (10, 0, 0)
    # What OpenVPN's openvpn_decrypt_aead does, with the library's AEAD.
    frame = TCP_LENGTH.size if tcp else 0
    pkt = bytes(y.data[y.spans[6] + frame:y.spans[6] + y.spans[7]])
    assert pkt[:4] == bytes([9 << 3 | 2]) + bytes.fromhex("abcdef") and pkt[4:8] == bytes(
        [0, 0, 0, 9])
    aead = AESGCM if cipher == "AES-256-GCM" else ChaCha20Poly1305
    k = SERVER[cipher]
    assert aead(k.encrypt_key).decrypt(pkt[4:8] + k.encrypt_iv, pkt[24:] + pkt[8:24],
                                       pkt[:8]) == payloads[3]


@pytest.mark.parametrize("cipher", DATA_CIPHERS)
def test_opened_alike_genuine_forged_replayed_cut_and_keyless(cipher: str) -> None:
    payloads = [b"\x45" + bytes(40), PING_MAGIC, OCC_MAGIC + b"\x06", os.urandom(900), b"v"]
    good = sealed_by_client(cipher, payloads)
    forged = bytearray(good[3])
    forged[-1] ^= 1
    v1 = bytes([6 << 3]) + good[4][4:]  # as P_DATA_V1: authenticated otherwise
    pkts = [good[0], good[0], good[1], bytes(forged), good[2], good[3], good[3][:23],
            bytes([9 << 3 | 5]) + good[0][1:], b"", bytes([4 << 3]) + bytes(30), v1,
            bytes(MAX_PACKET_BYTES + 1)]
    a, b = pair(SERVER[cipher])
    x = same(a.open(*batch(pkts, gap=5), MAX_PACKET_BYTES),
             b.open(*batch(pkts, gap=5), MAX_PACKET_BYTES))
    assert list(x.status) == [DATA, REPLAY, PING, py.BAD_TAG, OCC, DATA, py.SHORT, NO_KEY,
                              py.MALFORMED, py.MALFORMED, py.BAD_TAG, py.MALFORMED]
    assert a.key_state(0) == b.key_state(0) == (0, 4, 0b1111)
    assert [bytes(x.plain[x.data[i]:x.data[i] + x.data[i + 1]]) for i in (0, 2)] == \
        [payloads[0], payloads[3]]


def test_the_replay_window_slides_alike() -> None:
    cipher = "AES-256-GCM"
    client = PyDataChannel()
    client.install(0, client_keys(cipher))
    pkts = []
    for _ in range(3 * REPLAY_WINDOW):
        s = client.seal(0, 7, *batch([b"\x45" + bytes(30)]), tcp=False)
        pkts.append(bytes(s.data[:s.size]))
    order = [pkts[i] for i in (5, 1, 70, 6, 7, 6, 69, 140, 77, 76, 139, 191, 127, 128, 0, 191)]
    a, b = pair(SERVER[cipher])
    for p in order:  # one at a time, then the same as one batch
        same(a.open(*batch([p]), MAX_PACKET_BYTES), b.open(*batch([p]), MAX_PACKET_BYTES))
        assert a.key_state(0) == b.key_state(0)
    a2, b2 = pair(SERVER[cipher])
    x = same(a2.open(*batch(order), MAX_PACKET_BYTES), b2.open(*batch(order), MAX_PACKET_BYTES))
    assert a2.key_state(0) == b2.key_state(0) == a.key_state(0)
    assert x.counts[DATA] == 10 and x.counts[REPLAY] == 6  # the window edge: 64 back is out


@given(data=st.data())
@FUZZ
def test_fuzzed_batches_open_alike(data: st.DataObject) -> None:
    cipher = data.draw(st.sampled_from(DATA_CIPHERS))
    payloads = data.draw(st.lists(st.binary(max_size=80), min_size=1, max_size=6))
    genuine = sealed_by_client(cipher, payloads, key_id=data.draw(st.sampled_from([0, 1])))
    pkts = []
    for _ in range(data.draw(st.integers(1, 10))):
        p = bytearray(data.draw(st.sampled_from(genuine)))
        for _ in range(data.draw(st.integers(0, 2))):
            if p:
                p[data.draw(st.integers(0, len(p) - 1))] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            p = p[:data.draw(st.integers(0, len(p)))]
        pkts.append(bytes(p) if data.draw(st.integers(0, 5)) else data.draw(st.binary(
            max_size=60)))
    a, b = pair(SERVER[cipher], key_id=data.draw(st.sampled_from([0, 1])))
    buf, spans = batch(pkts, gap=data.draw(st.integers(0, 3)))
    if data.draw(st.booleans()):  # a span past the buffer's end
        spans.extend((max(len(buf) - 1, 0), 5))
    same(a.open(bytearray(buf), spans, MAX_PACKET_BYTES),
         b.open(bytearray(buf), spans, MAX_PACKET_BYTES))
    assert a.key_state(0 if a._keys[0] else 1) == b.key_state(0 if a._keys[0] else 1)


@given(data=st.data())
@FUZZ
def test_fuzzed_tcp_streams_open_alike(data: st.DataObject) -> None:
    cipher = data.draw(st.sampled_from(DATA_CIPHERS))
    genuine = sealed_by_client(cipher, data.draw(st.lists(st.binary(max_size=60), min_size=1,
                                                            max_size=5)))
    stream = bytearray()
    for p in genuine:
        stream += TCP_LENGTH.pack(len(p)) + p
    kind = data.draw(st.integers(0, 3))
    if kind == 1:  # a control frame in the middle
        stream[len(stream) // 2:len(stream) // 2] = TCP_LENGTH.pack(14) + bytes([4 << 3]) \
            + bytes(13)
    elif kind == 2:  # a bad length
        stream += TCP_LENGTH.pack(data.draw(st.sampled_from([0, MAX_PACKET_BYTES + 1])))
    elif kind == 3 and stream:
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    stream = stream[:data.draw(st.integers(0, len(stream)))]
    start = data.draw(st.integers(0, min(len(stream), 4)))
    a, b = pair(SERVER[cipher])
    x = same(a.open_stream(bytes(stream), start, MAX_PACKET_BYTES),
             b.open_stream(bytes(stream), start, MAX_PACKET_BYTES))
    assert x.end >= start and len(x.plain) == len(stream)


def test_a_stream_batch_stops_at_its_bound_and_goes_on() -> None:
    genuine = sealed_by_client("AES-256-GCM", [b"x"] * (py.STREAM_BATCH + 10))
    stream = b"".join(TCP_LENGTH.pack(len(p)) + p for p in genuine)
    a, b = pair(SERVER["AES-256-GCM"])
    x = same(a.open_stream(stream, 0, MAX_PACKET_BYTES), b.open_stream(stream, 0,
                                                                      MAX_PACKET_BYTES))
    assert x.counts[DATA] == py.STREAM_BATCH
    y = same(a.open_stream(stream, x.end, MAX_PACKET_BYTES),
             b.open_stream(stream, x.end, MAX_PACKET_BYTES))
    assert y.counts[DATA] == 10 and y.end == len(stream)


def test_removed_keys_open_nothing_and_c_keys_are_freed() -> None:
    a, b = pair(SERVER["AES-256-GCM"])
    pkt = sealed_by_client("AES-256-GCM", [b"\x45" + bytes(20)])
    a.remove(0)
    b.remove(0)
    x = same(a.open(*batch(pkt), MAX_PACKET_BYTES), b.open(*batch(pkt), MAX_PACKET_BYTES))
    assert list(x.status) == [NO_KEY]


@given(data=st.data())
@FUZZ
def test_udp_runs_alike(data: st.DataObject) -> None:
    addrs = [os.urandom(ADDR_SIZE) for _ in range(3)]
    kinds = [bytes([9 << 3]) + bytes([0, 0, 7]) + bytes(30), bytes([9 << 3 | 1]) + bytes(
        [0, 0, 7]) + bytes(30), bytes([9 << 3]) + bytes([0, 0, 8]) + bytes(30),
        bytes([6 << 3]) + bytes(30), bytes([7 << 3]) + bytes(30), bytes([9 << 3, 0]), b"",
        bytes([9 << 3]) + bytes(MAX_PACKET_BYTES)]
    n = data.draw(st.integers(0, 12))
    pkts = [data.draw(st.sampled_from(kinds)) for _ in range(n)]
    who = b"".join(data.draw(st.sampled_from(addrs)) for _ in range(n))
    buf, spans = batch(pkts)
    assert c.udp_runs(buf, spans, who, ADDR_SIZE, MAX_PACKET_BYTES) == \
        udp_runs(buf, spans, who, ADDR_SIZE, MAX_PACKET_BYTES)


def test_udp_runs_split_by_address_kind_and_peer_id() -> None:
    a, b = bytes(ADDR_SIZE), b"\x01" * ADDR_SIZE
    data7 = bytes([9 << 3]) + bytes([0, 0, 7]) + bytes(30)
    data7_key1 = bytes([9 << 3 | 1]) + bytes([0, 0, 7]) + bytes(30)
    data8 = bytes([9 << 3]) + bytes([0, 0, 8]) + bytes(30)
    control = bytes([4 << 3]) + bytes(20)
    buf, spans = batch([data7, data7_key1, data7, data8, control, control, data7, data7])
    who = a * 6 + b + a
    for impl in (c.udp_runs, udp_runs):
        assert list(impl(buf, spans, who, ADDR_SIZE, MAX_PACKET_BYTES)) == [
            0, 3, 1, 3, 1, 1, 4, 2, 0, 6, 1, 1, 7, 1, 1]
