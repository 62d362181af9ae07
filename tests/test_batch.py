"""The datapath's batches in C (relay.serve.batch, cext/batch.c) against the Python
twin (relay.serve.batch_py): source checks, frame checks, payloads and grouping by
MAC on random batches (hypothesis), TAP reads and writes over a datagram socket
pair standing in for the device, UDP batches over loopback."""

from __future__ import annotations

import socket
from array import array
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.serve import batch, batch_py
from relay.serve.batch_py import ETH_HLEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6

MAC = b"\x02\x00\x00\x00\x00\x05"
VIP = bytes([10, 211, 0, 5])
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ipv4_from(src: bytes, size: int = 20) -> bytes:
    return b"\x45" + bytes(11) + src + bytes(4) + bytes(size - 20)


PACKETS = [ipv4_from(VIP), ipv4_from(VIP, 60), ipv4_from(b"\x0a\xd3\x00\x06"),
           b"\x60" + bytes(39), ipv4_from(VIP)[:19], b"", b"\x45"]
FRAMES = [MAC + MAC + ETHERTYPE_IPV4 + ipv4_from(VIP), b"\xff" * 6 + MAC + ETHERTYPE_ARP
          + bytes(8) + MAC + VIP + bytes(10), b"\xff" * 6 + MAC + ETHERTYPE_ARP + bytes(8)
          + MAC + bytes(4) + bytes(10), bytes(6) + bytes(6) + ETHERTYPE_IPV4 + ipv4_from(VIP),
          MAC + MAC + ETHERTYPE_IPV6 + bytes(40), MAC + MAC + ETHERTYPE_IPV4
          + ipv4_from(b"\x01\x02\x03\x04"), MAC[:4], MAC + MAC + ETHERTYPE_ARP + bytes(10)]


def batch_of(items: list[bytes], gap: int = 0) -> tuple[bytearray, array[int]]:
    buf, spans = bytearray(), array("I")
    for p in items:
        spans.extend((len(buf), len(p)))
        buf += p + bytes(gap)
    return buf, spans


@st.composite
def batches(draw: st.DrawFn, pool: list[bytes]) -> tuple[bytearray, array[int]]:
    items = draw(st.lists(st.one_of(st.sampled_from(pool), st.binary(max_size=50)),
                          max_size=12))
    buf, spans = batch_of(items, draw(st.integers(0, 2)))
    if draw(st.booleans()):  # a span outside the buffer
        spans.extend((len(buf), 1))
    return buf, spans


@given(batches(PACKETS))
@FUZZ
def test_source_check_alike(b: tuple[bytearray, array[int]]) -> None:
    assert batch.from_ipv4(*b, VIP) == batch_py.from_ipv4(*b, VIP)


@given(batches(FRAMES))
@FUZZ
def test_frame_check_alike(b: tuple[bytearray, array[int]]) -> None:
    assert batch.frames_from(*b, MAC, VIP) == batch_py.frames_from(*b, MAC, VIP)


@given(batches(FRAMES), st.booleans())
@FUZZ
def test_payloads_alike(b: tuple[bytearray, array[int]], allow_ipv6: bool) -> None:
    assert batch.ip_payloads(*b, allow_ipv6) == batch_py.ip_payloads(*b, allow_ipv6)


@given(st.lists(st.sampled_from([b"\x01" * 6, b"\x02" * 6, b"\x03" * 6]), max_size=40))
@FUZZ
def test_grouping_by_mac_alike(macs: list[bytes]) -> None:
    buf, spans = batch_of([m + bytes([i]) * 10 for i, m in enumerate(macs)])
    c_spans, py_spans = array("I", spans), array("I", spans)
    groups = batch.group_by_mac(buf, c_spans)
    assert groups == batch_py.group_by_mac(buf, py_spans) and c_spans == py_spans
    for g in range(0, len(groups), 2):  # one MAC per group, frames in their order
        first, n = groups[g], groups[g + 1]
        members = [bytes(buf[c_spans[2 * i]:c_spans[2 * i] + c_spans[2 * i + 1]])
                   for i in range(first, first + n)]
        assert len({m[:6] for m in members}) == 1 and members == sorted(members,
                                                                         key=lambda m: m[6])


def test_the_checks_keep_what_is_right() -> None:
    buf, spans = batch_of(PACKETS)
    assert list(batch.from_ipv4(buf, spans, VIP)) == [0, 20, 20, 60]
    kept = batch.frames_from(*batch_of(FRAMES), MAC, VIP)
    assert (len(kept.frames) // 2, len(kept.ips) // 2, kept.spoofed, kept.not_ipv4) == (2, 1, 5, 1)
    buf, spans = batch_of(FRAMES[:5])
    ip = [(spans[2 * i] + ETH_HLEN, spans[2 * i + 1] - ETH_HLEN) for i in range(5)]
    assert list(batch.ip_payloads(buf, spans, True)) == [*ip[0], *ip[3], *ip[4]]
    assert list(batch.ip_payloads(buf, spans, False)) == [*ip[0], *ip[3]]


@pytest.fixture
def tap_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    relay_end, kernel_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for sock in (relay_end, kernel_end):
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    yield relay_end, kernel_end
    relay_end.close()
    kernel_end.close()


@pytest.mark.parametrize("impl", [batch, batch_py])
def test_tap_read_and_write(tap_pair: tuple[socket.socket, socket.socket], impl) -> None:
    relay_end, kernel_end = tap_pair
    frames = [MAC + bytes([i]) * (20 + i) for i in range(10)] + [b"runt"]
    for f in frames:
        kernel_end.send(f)
    buf = bytearray(4096)
    spans, err = impl.tap_read(relay_end.fileno(), buf, 1600, 6)
    assert err == 0 and [bytes(buf[spans[i]:spans[i] + spans[i + 1]])
                         for i in range(0, len(spans), 2)] == frames[:6]
    small = bytearray(1600 + 40)  # room for a read of 1600 after one frame, not two
    spans, err = impl.tap_read(relay_end.fileno(), small, 1600, 100)
    assert list(spans) == [0, 6 + 26, 6 + 26, 6 + 27] and err == 0
    spans, err = impl.tap_read(relay_end.fileno(), small, 1600, 100)
    assert len(spans) == 4  # the last two frames; the runt is dropped
    assert impl.tap_read(relay_end.fileno(), small, 1600, 100) == (array("I"), 0)
    data, spans = batch_of([b"one", b"two!", b"3"], gap=2)
    done = impl.tap_write(relay_end.fileno(), b"HEAD", data, spans)
    assert (done.packets, done.bytes, done.errors) == (3, 8, 0)
    assert [kernel_end.recv(100) for _ in range(3)] == [b"HEADone", b"HEADtwo!", b"HEAD3"]
    kernel_end.close()
    done = impl.tap_write(relay_end.fileno(), b"", data, spans)
    assert (done.packets, done.errors) == (0, 3) and done.errno != 0


@pytest.fixture
def udp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (a, b):
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    yield a, b
    a.close()
    b.close()


def wait_readable(sock: socket.socket) -> None:
    import select
    assert select.select([sock], [], [], 5)[0]


@pytest.mark.parametrize("impl", [batch, batch_py])
def test_udp_batches(udp_pair: tuple[socket.socket, socket.socket], impl) -> None:
    a, b = udp_pair
    data, spans = batch_of([b"first", b"", b"x" * 300, b"y" * 2000], gap=1)
    assert impl.udp_send(a, data, spans, batch.encode_address(b.getsockname())) == 4
    wait_readable(b)
    buf = bytearray(4 * 1001)
    got, addrs = impl.udp_recv(b, buf, 1001, 4)
    assert [bytes(buf[got[i]:got[i] + got[i + 1]]) for i in range(0, len(got), 2)] == [
        b"first", b"", b"x" * 300, b"y" * 1001]  # cut to its slot
    assert [batch.decode_address(addrs[i:i + batch.ADDR_SIZE])
            for i in range(0, len(addrs), batch.ADDR_SIZE)] == [a.getsockname()] * 4
    assert addrs == batch_py.encode_address(a.getsockname()) * 4
    assert impl.udp_recv(b, buf, 1001, 4) == (array("I"), b"")


def test_addresses_as_the_kernel_writes_them() -> None:
    six = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    six.bind(("::1", 0))
    six.setblocking(False)
    try:
        sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sender.bind(("::1", 0))
        sender.sendto(b"hello", six.getsockname())
        wait_readable(six)
        got, addrs = batch.udp_recv(six, bytearray(100), 100, 4)
        assert len(got) == 2 and batch.decode_address(addrs) == sender.getsockname()[:2]
        assert addrs == batch_py.encode_address(sender.getsockname())
        assert batch.address_length(addrs) == batch.ADDR_SIZE
        assert batch.udp_send(six, b"back", array("I", (0, 4)), addrs) == 1
        wait_readable(sender)
        assert sender.recv(10) == b"back"
        sender.close()
    finally:
        six.close()
    assert batch.address_length(batch.encode_address(("127.0.0.1", 1))) == 16
