"""An OpenVPN UDP client that floated (relay.serve.openvpn_link.OpenVPNLink.moved):
what it sends while the control plane records the move is held, so that the packet
log never names the old address for a packet that came from the new one, and the
hold is bounded. The end-to-end float is in test_e2e_openvpn."""

from __future__ import annotations

import asyncio
import os
from array import array
from collections.abc import Awaitable
from pathlib import Path
from types import SimpleNamespace

from test_link import FakeHost

from relay import config
from relay.protocols.openvpn.cookie import Proof
from relay.protocols.openvpn.events import Packets
from relay.serve.datapath import Datapath
from relay.serve.link import Link
from relay.serve.openvpn_link import FLOAT_HOLD_PACKETS, OpenVPNLink, OpenVPNListener
from relay.serve.sessions import Session

OLD = ("198.51.100.7", 40000)
NEW = ("198.51.100.7", 40001)


class MovingHost(FakeHost):
    """A host whose control plane records a move only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.recorded = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    def look_up(self, link: Link) -> None:
        self.calls.append(("look-up", link.peer_ip, link.peer_port))

    async def client_moved(self, link: Link, old: tuple[str, int]) -> None:
        self.calls.append(("moved", old, (link.peer_ip, link.peer_port)))
        await self.recorded.wait()

    def spawn(self, coro: Awaitable[None], link: Link | None = None) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def packets(*payloads: bytes) -> Packets:
    """The payloads in one buffer with room around them, as a receive leaves them."""
    data, spans = bytearray(b"\xee" * 7), array("I")
    for p in payloads:
        spans.extend((len(data), len(p)))
        data += p + b"\xee" * 5
    return Packets(data, spans)


def make_link(tmp_path: Path) -> tuple[MovingHost, OpenVPNLink, list[list[bytes]]]:
    host = MovingHost()
    datapath = Datapath(SimpleNamespace(fd=-1))  # type: ignore[arg-type]
    written: list[list[bytes]] = []

    def to_kernel(s: Session, data: bytearray, spans: array[int]) -> None:
        written.append([bytes(data[spans[i]:spans[i] + spans[i + 1]])
                        for i in range(0, len(spans), 2)])

    datapath.to_kernel_batch = to_kernel  # type: ignore[method-assign]
    listener = OpenVPNListener(host, datapath, config.Config().with_data_dir(tmp_path), 0,  # type: ignore[arg-type]
                               os.urandom(32))
    link = OpenVPNLink(listener, OLD, "192.0.2.1", tcp=False, proof=Proof(b"C" * 8, b"S" * 8))
    link.session = host.table.open(*OLD, "OpenVPN")
    return host, link, written


def test_packets_from_the_new_address_wait_until_the_move_is_recorded(tmp_path: Path) -> None:
    async def scenario() -> None:
        host, link, written = make_link(tmp_path)
        link.moved(NEW)
        assert (link.peer_ip, link.peer_port) == NEW  # replies go there at once
        first = packets(b"syn-from-new", b"second")
        link._handle([first])
        first.data[:] = b"\x00" * len(first.data)  # the next receive reuses the buffer
        link._handle([packets(b"third")])
        await asyncio.sleep(0)
        assert host.calls[-2:] == [("look-up", *NEW), ("moved", OLD, NEW)]
        assert written == []  # nothing reaches the TAP, where the capture still says OLD

        host.recorded.set()
        await asyncio.gather(*host.tasks)
        assert written == [[b"syn-from-new", b"second"], [b"third"]]  # as they came
        link._handle([packets(b"after")])
        assert written[-1] == [b"after"]  # no hold once the move is recorded
        assert link.listener.counts["floats"] == 1

    asyncio.run(scenario())


def test_the_hold_is_bounded_and_what_it_drops_is_counted(tmp_path: Path) -> None:
    async def scenario() -> None:
        host, link, written = make_link(tmp_path)
        link.moved(NEW)
        batch = packets(*[b"p%d" % i for i in range(64)])
        batches = FLOAT_HOLD_PACKETS // 64
        for _ in range(batches + 3):
            link._handle([batch])
        assert link.traffic.dropped["float-hold-full"] == 3 * 64

        host.recorded.set()
        await asyncio.gather(*host.tasks)
        assert sum(map(len, written)) == batches * 64

    asyncio.run(scenario())


def test_a_link_that_ended_during_the_move_writes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        host, link, written = make_link(tmp_path)
        link.moved(NEW)
        link._handle([packets(b"late")])
        link.end_quietly("client-restart")
        host.recorded.set()
        await asyncio.gather(*host.tasks)
        assert written == []

    asyncio.run(scenario())
