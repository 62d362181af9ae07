"""The datapath (relay.serve.datapath) over a datagram socket pair standing in for
the TAP device: what the relay writes into the "TAP" is read from the other end,
frames "from the kernel" are written there. Source check, hot path (stamp in
place, destinations), writes, routing by MAC and the counters."""

from __future__ import annotations

import ipaddress
import os
import socket
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hotpath_packets import SERVER_V4, http_request, ipv4, ipv6

from relay.serve.batch_py import ETHERTYPE_ARP, ETHERTYPE_IPV4
from relay.serve.datapath import TAP_READ_BATCH, Datapath
from relay.serve.hotpath import Destination
from relay.serve.sessions import AddressPool, Session, SessionTable
from relay.serve.tap import ETH_HLEN

TAP_MAC = b"\x02\x00\x00\x00\x00\x01"
ETHERTYPE_IPV6 = b"\x86\xdd"


@dataclass
class FakeDevice:
    name: str
    fd: int
    mac: bytes


class RecordingLink:
    peer_ip, peer_port, local_ip = "198.51.100.7", 40000, "192.0.2.1"

    def __init__(self, session: Session) -> None:
        self.session: Session | None = session
        self.frames: list[bytes] = []

    def client_hostname(self) -> str | None:
        return None

    def from_kernel_batch(self, buf: bytearray, spans: array[int]) -> None:
        self.frames += [bytes(buf[spans[i]:spans[i] + spans[i + 1]])
                        for i in range(0, len(spans), 2)]

    def terminate(self, reason: str, message: str) -> None:
        raise AssertionError("the datapath ends no link")


@dataclass
class Rig:
    datapath: Datapath
    kernel: socket.socket  # the kernel's end of the "TAP"
    sessions: SessionTable

    def session(self) -> Session:
        return self.sessions.open("198.51.100.7", 40000, "SSL-VPN")

    def written(self) -> list[bytes]:
        """The frames the datapath wrote into the TAP since the last call."""
        out = []
        while True:
            try:
                out.append(self.kernel.recv(65536))
            except BlockingIOError:
                return out


@pytest.fixture
def rig() -> Iterator[Rig]:
    relay_end, kernel_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for sock in (relay_end, kernel_end):
        sock.setblocking(False)
        # Room for a whole TAP_READ_BATCH and more of small frames.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    table = SessionTable(AddressPool(ipaddress.IPv4Network("10.211.0.0/29")), set())
    yield Rig(Datapath(FakeDevice("fake0", relay_end.fileno(), TAP_MAC)), kernel_end, table)
    relay_end.close()
    kernel_end.close()


def from_session(s: Session, payload: bytes = b"x" * 20, src: str | None = None) -> bytearray:
    """An IPv4 (not TCP: the hot path leaves it alone) packet from ``src``,
    by default the session's own address."""
    source = ipaddress.IPv4Address(src or s.virtual_ip).packed
    total = 20 + len(payload)
    return bytearray(b"\x45\x00" + total.to_bytes(2, "big") + bytes(5) + b"\x11" + bytes(2)
                     + source + socket.inet_aton(SERVER_V4) + payload)


def batch(*packets: bytearray) -> tuple[bytearray, array[int]]:
    data, spans = bytearray(), array("I")
    for p in packets:
        spans.extend((len(data), len(p)))
        data += p
    return data, spans


def test_a_batch_goes_in_as_frames_from_the_session_mac(rig: Rig) -> None:
    s = rig.session()
    first, second = from_session(s, b"a" * 30), from_session(s, b"b" * 50)
    rig.datapath.to_kernel_batch(s, *batch(first, second))
    head = TAP_MAC + s.mac + ETHERTYPE_IPV4
    assert rig.written() == [head + first, head + second]
    t = rig.datapath.traffic
    assert (s.packets_in, s.bytes_in) == (t.packets_in, t.bytes_in) == (2, 120)
    assert not t.dropped


def test_spoofed_and_non_ipv4_packets_are_dropped_and_counted(rig: Rig) -> None:
    s = rig.session()
    other = rig.session()  # another session's address is spoofing too
    honest = from_session(s)
    v6 = bytearray(ipv6(b"GET / HTTP/1.1\r\n\r\n"))
    runt = bytearray(b"\x45" + bytes(10))
    rig.datapath.to_kernel_batch(s, *batch(from_session(s, src="203.0.113.9"), honest,
                                            from_session(s, src=other.virtual_ip), v6, runt))
    assert rig.written() == [TAP_MAC + s.mac + ETHERTYPE_IPV4 + honest]
    # The relay routes IPv4 only: a CSTP client's IPv6 is not its address either.
    assert rig.datapath.traffic.dropped == {"spoofed-source": 4}
    assert (s.packets_in, rig.datapath.traffic.packets_in) == (1, 1)
    # A batch of nothing but spoofs writes nothing and calls no hot path.
    rig.datapath.to_kernel_batch(s, *batch(from_session(s, src="203.0.113.9")))
    assert rig.written() == [] and rig.datapath.traffic.dropped["spoofed-source"] == 5


def test_user_agent_stamped_in_place_and_destination_noted(rig: Rig) -> None:
    s = rig.session()
    assert s.virtual_ip == "10.211.0.2"  # the hot-path packets' client address
    request = ipv4(http_request(host="example.com", ua="curl/8.1.2"))
    data, spans = batch(request)
    rig.datapath.to_kernel_batch(s, data, spans)
    [frame] = rig.written()
    stamped = frame[ETH_HLEN:]
    assert b"User-Agent: cu" + s.tag_bytes + b"\r\n" in stamped  # the last 8 characters
    assert stamped == bytes(data)  # in place: what was handed over is what went in
    assert rig.datapath.traffic.ua_stamped == 1 and rig.datapath.traffic.ua_missed == 0
    assert s.destinations == {Destination(host="example.com", ip=SERVER_V4, port=80, scheme="http")}


def test_bridged_frames_checked_by_mac_address_and_type(rig: Rig) -> None:
    s = rig.session()
    dp = rig.datapath
    honest = bytearray(TAP_MAC + s.mac + ETHERTYPE_IPV4) + from_session(s)
    arp = bytearray(b"\xff" * 6 + s.mac + ETHERTYPE_ARP + bytes(8) + s.mac + s.vip_bytes
                    + bytes(10))
    dp.to_kernel_frames(s, *batch(honest, arp))
    assert rig.written() == [bytes(honest), bytes(arp)]
    assert (s.packets_in, s.bytes_in) == (2, len(honest) + len(arp) - 2 * ETH_HLEN)
    other_mac = bytes(6)
    dp.to_kernel_frames(s, *batch(
        bytearray(TAP_MAC + other_mac + ETHERTYPE_IPV4) + from_session(s),
        bytearray(TAP_MAC + s.mac + ETHERTYPE_IPV4) + from_session(s, src="203.0.113.9"),
        bytearray(b"\xff" * 6 + s.mac + ETHERTYPE_ARP + bytes(8) + s.mac + bytes(4)
                  + bytes(10)),  # ARP for another address
        bytearray(s.mac[:4]),  # a runt
        bytearray(TAP_MAC + s.mac + ETHERTYPE_IPV6) + ipv6()))
    assert rig.written() == []
    assert dp.traffic.dropped == {"spoofed-source": 4, "not-ipv4": 1}
    assert dp.traffic.packets_in == 2


def test_frames_from_the_kernel_routed_by_destination_mac(rig: Rig) -> None:
    dp = rig.datapath
    a, b = rig.session(), rig.session()
    links = {s.mac: RecordingLink(s) for s in (a, b)}
    dp.links.update(links)
    frames = [a.mac + TAP_MAC + ETHERTYPE_IPV4 + b"to a", b.mac + TAP_MAC + ETHERTYPE_IPV4
              + b"to b", bytes(6) + TAP_MAC + ETHERTYPE_IPV4 + b"nobody's",
              a.mac + TAP_MAC + ETHERTYPE_IPV6 + b"the link decides"]
    for frame in frames:
        rig.kernel.send(frame)
    dp.on_tap_readable()
    assert links[a.mac].frames == [frames[0], frames[3]]
    assert links[b.mac].frames == [frames[1]]
    assert dp.traffic.dropped == {"no-session": 1}


def test_tap_reads_yield_after_a_batch(rig: Rig) -> None:
    dp = rig.datapath
    s = rig.session()
    link = RecordingLink(s)
    dp.links[s.mac] = link
    for i in range(TAP_READ_BATCH + 3):
        rig.kernel.send(s.mac + TAP_MAC + ETHERTYPE_IPV4 + i.to_bytes(4, "big"))
    dp.on_tap_readable()
    assert len(link.frames) == TAP_READ_BATCH  # the rest waits for the next wake-up
    dp.on_tap_readable()
    assert len(link.frames) == TAP_READ_BATCH + 3


def test_write_errors_are_counted_not_raised(rig: Rig) -> None:
    s = rig.session()
    rig.kernel.close()  # writes to the "TAP" now fail (ECONNREFUSED)
    rig.datapath.to_kernel_batch(s, *batch(from_session(s), from_session(s)))
    rig.datapath.to_kernel_frames(s, *batch(bytearray(TAP_MAC + s.mac + ETHERTYPE_IPV4)
                                            + from_session(s)))
    assert rig.datapath.traffic.dropped == {"tap-write-error": 3}
    # Reading a failing device logs and returns rather than raising.
    rig.datapath.tap.fd = os.open(os.devnull, os.O_WRONLY)
    try:
        rig.datapath.on_tap_readable()
    finally:
        os.close(rig.datapath.tap.fd)
