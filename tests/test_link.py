"""The lifecycle every protocol link shares (relay.serve.link.LinkBase), with a
stand-in core (LinkHost) and a stand-in sans-IO machine, on a real event loop:
counted in and out once, the login deadline, the common half of opening a
session, and the one timer driven by the machine's next_timeout/handle_timeout."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from array import array
from collections.abc import Awaitable
from typing import Any

import pytest

from relay.serve.link import (
    CLIENT_WRITE_HIGH_WATER,
    Lease,
    Link,
    LinkBase,
    LinkHost,
    LinkSettings,
    StreamLink,
)
from relay.serve.sessions import AddressPool, Session, SessionRefused, SessionTable
from relay.serve.worker import WorkerHost

SETTINGS = LinkSettings(login_timeout_s=60, handshake_timeout_s=15, dpd_s=30, keepalive_s=20)


class FakeHost:
    """A LinkHost that records what links ask of it."""

    def __init__(self, settings: LinkSettings = SETTINGS) -> None:
        self.settings = settings
        self.calls: list[tuple[Any, ...]] = []
        self.refusal: str | None = None
        self.table = SessionTable(AddressPool(ipaddress.IPv4Network("10.211.0.0/29")), set())
        self.opened = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def admit(self, ip: str) -> str | None:
        return None

    def link_began(self, link: Link) -> asyncio.Future[Any] | None:
        self.calls.append(("began",))
        return None

    def link_ended(self, link: Link, lifetime_s: float, had_session: bool) -> None:
        assert lifetime_s >= 0
        self.calls.append(("ended", had_session))

    def spawn(self, coro: Awaitable[None], link: Link | None = None) -> None:
        raise AssertionError("the shared lifecycle spawns nothing")

    def check_login(self, link: Link, username: str, password: str) -> bool:
        return True

    async def open_session(self, link: Link, protocol: str, software: dict[str, Any],
                           mac: bytes | None = None, data_channel: str | None = None) -> Lease:
        if self.refusal is not None:
            raise SessionRefused(self.refusal)
        s = self.table.open(link.peer_ip, link.peer_port, protocol)
        self.calls.append(("open", protocol))
        self.opened.set()
        await self.release.wait()
        return Lease(s, s.virtual_ip, "255.255.255.248", "10.211.0.1", 1400, ("10.211.0.1",))

    def handshake_done(self, link: Link) -> None:
        self.calls.append(("handshake-done",))

    def close_session(self, link: Link, s: Session, reason: str, error: str | None) -> None:
        self.calls.append(("close", reason, error))

    def count_handshake_failure(self, reason: str) -> None:
        self.calls.append(("handshake-failure", reason))

    def count_peer_closed(self, cap: str) -> None:
        self.calls.append(("peer-closed", cap))


class Machine:
    """The time half of a sans-IO machine: events due at given times."""

    def __init__(self) -> None:
        self.due: list[tuple[float, str]] = []
        self.calls: list[float] = []

    def next_timeout(self) -> float | None:
        return min(t for t, _ in self.due) if self.due else None

    def handle_timeout(self, now: float) -> list[str]:
        self.calls.append(now)
        fired = [ev for t, ev in self.due if t <= now]
        self.due = [(t, ev) for t, ev in self.due if t > now]
        return fired


class StandInLink(LinkBase[str]):
    def __init__(self, host: FakeHost) -> None:
        super().__init__(host, ("198.51.100.7", 40000), "192.0.2.1")
        self.proto = Machine()
        self.events: list[str] = []
        self.refusals: list[str] = []
        self.got_event = asyncio.Event()

    def __repr__(self) -> str:
        return f"{self.peer_ip}:{self.peer_port}"

    def _handle(self, events: list[str]) -> None:
        for ev in events:
            if ev == "dead":
                self._peer_dead("nothing from the client for 90 s")
            self.events.append(ev)
            self.got_event.set()
        self._arm()

    def _refusal(self, message: str) -> list[str]:
        self.refusals.append(message)
        return []

    def from_kernel_batch(self, buf: bytearray, spans: array[int]) -> None:
        raise AssertionError("not in these tests")

    def terminate(self, reason: str, message: str) -> None:
        self._end(reason, None)
        self._close()


def run(loop: asyncio.AbstractEventLoop, coro: Awaitable[Any]) -> Any:
    return loop.run_until_complete(asyncio.wait_for(coro, 5))


def test_one_timer_follows_the_machine_deadlines(loop: asyncio.AbstractEventLoop) -> None:
    async def scenario() -> StandInLink:
        link = StandInLink(FakeHost())
        now = loop.time()
        link.proto.due = [(now + 0.05, "second"), (now + 0.02, "first")]
        link._arm()
        # A later deadline does not move the timer: it fires early and re-arms.
        link.proto.due.append((now + 0.5, "never"))
        link._arm()
        while link.events != ["first", "second"]:
            link.got_event.clear()
            await link.got_event.wait()
        assert link._timer is not None and link._timer_at == now + 0.5
        # An earlier deadline (a retransmission, say) moves it.
        link.proto.due.append((loop.time() + 0.01, "sooner"))
        link._arm()
        link.got_event.clear()
        await link.got_event.wait()
        return link

    link = run(loop, scenario())
    assert link.events == ["first", "second", "sooner"]
    # Each firing handled the machine once, at or after its deadline.
    assert len(link.proto.calls) == 3


def test_dead_peer_ends_the_session_and_the_timer(loop: asyncio.AbstractEventLoop,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    host = FakeHost()

    async def scenario() -> StandInLink:
        link = StandInLink(host)
        link.begin()
        lease = await link._open("SSL-VPN", {"name": "x"})
        assert lease is not None and link.session is lease.session
        link.proto.due = [(loop.time() + 0.01, "dead")]
        link._arm()
        await link.got_event.wait()
        return link

    with caplog.at_level(logging.WARNING, logger="relay"):
        link = run(loop, scenario())
    assert "198.51.100.7:40000: nothing from the client for 90 s" in caplog.text
    assert host.calls == [("began",), ("open", "SSL-VPN"), ("handshake-done",),
                          ("close", "dead-peer", "nothing from the client for 90 s"),
                          ("ended", True)]
    assert link.closed and link.session is None
    # Closed: no timer is armed again, and no deadline handled.
    link.proto.due = [(loop.time(), "late")]
    link._arm()
    assert link._timer is None
    link._on_timer()
    assert link.events == ["dead"]


def test_login_deadline_closes_a_link_without_session(
        loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture) -> None:
    host = FakeHost(LinkSettings(login_timeout_s=0, handshake_timeout_s=15, dpd_s=30,
                                 keepalive_s=20))

    async def scenario() -> StandInLink:
        link = StandInLink(host)
        link.opens = "tunnel"
        link.begin()
        while not link.closed:
            await asyncio.sleep(0.001)
        return link

    with caplog.at_level(logging.WARNING, logger="relay"):
        link = run(loop, scenario())
    assert "refused 198.51.100.7:40000: no tunnel within 0 s of connecting" in caplog.text
    assert host.calls == [("began",), ("ended", False)]
    link._forget()  # a second end counts nothing
    assert host.calls == [("began",), ("ended", False)]


def test_an_open_session_cancels_the_login_deadline(loop: asyncio.AbstractEventLoop) -> None:
    host = FakeHost(LinkSettings(login_timeout_s=0, handshake_timeout_s=15, dpd_s=30,
                                 keepalive_s=20))

    async def scenario() -> StandInLink:
        link = StandInLink(host)
        link.begin()
        assert await link._open("OpenVPN", {}) is not None  # before the deadline's turn
        await asyncio.sleep(0.01)
        return link

    link = run(loop, scenario())
    assert not link.closed and link.had_session
    assert host.calls == [("began",), ("open", "OpenVPN"), ("handshake-done",)]


def test_a_refused_session_is_told_to_the_client(loop: asyncio.AbstractEventLoop,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    host = FakeHost()
    host.refusal = "the relay is full; try again later or another relay"

    async def scenario() -> StandInLink:
        link = StandInLink(host)
        link.begin()
        assert await link._open("SSL-VPN", {}) is None
        return link

    with caplog.at_level(logging.ERROR, logger="relay"):
        link = run(loop, scenario())
    assert link.refusals == [host.refusal] and link.session is None
    assert f"refused a session from 198.51.100.7:40000: {host.refusal}" in caplog.text
    assert ("handshake-done",) not in host.calls


def test_a_client_gone_during_set_up_gets_its_session_closed(
        loop: asyncio.AbstractEventLoop) -> None:
    host = FakeHost()
    host.release.clear()

    async def scenario() -> StandInLink:
        link = StandInLink(host)
        link.begin()
        opening = asyncio.ensure_future(link._open("OpenVPN", {}))
        await host.opened.wait()
        link._close()  # the client went away while the core set the session up
        host.release.set()
        assert await opening is None
        return link

    link = run(loop, scenario())
    assert link.session is None and not link.had_session
    assert host.calls == [("began",), ("open", "OpenVPN"), ("ended", False),
                          ("close", "connection-closed", "closed during session set-up")]


class FakeTransport:
    def __init__(self) -> None:
        self.high: int | None = None
        self.closing = False

    def set_write_buffer_limits(self, high: int) -> None:
        self.high = high

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


class StandInStreamLink(StreamLink[str]):
    def __init__(self, host: FakeHost) -> None:
        super().__init__(host, ("198.51.100.7", 40000), "192.0.2.1")
        self.proto = Machine()

    def _handle(self, events: list[str]) -> None:
        pass

    def _refusal(self, message: str) -> list[str]:
        return []

    def _start_failed(self, exc: OSError, elapsed_s: float) -> None:
        pass

    def from_kernel_batch(self, buf: bytearray, spans: array[int]) -> None:
        pass

    def terminate(self, reason: str, message: str) -> None:
        pass


def test_a_stream_link_queues_to_the_high_water_mark_and_ends_with_its_connection(
        loop: asyncio.AbstractEventLoop) -> None:
    host = FakeHost()

    async def scenario() -> list[StandInStreamLink]:
        links = [StandInStreamLink(host) for _ in range(3)]
        for link in links:
            link.begin()
            link.connection_made(FakeTransport())  # type: ignore[arg-type]
            assert await link._open("SSL-VPN", {}) is not None
        return links

    closed, lost, dropped = run(loop, scenario())
    transport = closed.transport
    assert isinstance(transport, FakeTransport) and transport.high == CLIENT_WRITE_HIGH_WATER
    closed.pause_writing()
    assert closed.paused
    closed.resume_writing()
    assert not closed.paused
    closed.connection_lost(None)
    lost.connection_lost(ConnectionResetError("reset by peer"))
    dropped._end("banned", None)  # the relay's side: the session ends, then the connection
    dropped._close()
    assert dropped.transport is not None and dropped.transport.is_closing() and dropped.closed
    dropped.connection_lost(None)  # what the transport reports then changes nothing
    assert [c for c in host.calls if c[0] in ("close", "ended")] == [
        ("close", "connection-closed", None), ("ended", True),
        ("close", "connection-lost", "reset by peer"), ("ended", True),
        ("close", "banned", None), ("ended", True)]


def test_a_connection_made_after_the_link_ended_is_closed(
        loop: asyncio.AbstractEventLoop) -> None:
    async def scenario() -> tuple[StandInStreamLink, FakeTransport]:
        link = StandInStreamLink(FakeHost())
        link.begin()
        link._close()  # the login deadline passed during a slow TLS handshake
        transport = FakeTransport()
        link.connection_made(transport)  # type: ignore[arg-type]
        return link, transport

    link, transport = run(loop, scenario())
    assert transport.closing and link.transport is None


def test_the_worker_offers_every_member_of_the_host_interface(tmp_path: Any) -> None:
    """No type checker runs here: a member of LinkHost missing from the worker's
    host would only show when a link first calls it."""
    from relay import config

    host = WorkerHost(None, None, config.Config().with_data_dir(tmp_path), None)  # type: ignore[arg-type]
    members = [name for name in vars(LinkHost) if not name.startswith("_")]
    assert "open_session" in members and "settings" in members
    for name in members:
        assert hasattr(host, name), name
    assert host.settings == SETTINGS  # the defaults of [server]
