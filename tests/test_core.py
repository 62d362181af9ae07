"""The protocol-agnostic core (relay.serve.core.Relay) without devices: logins with
any text, sessions refused when the relay is full (counted, audited), tasks that
fail end their connection, client text cleaned for every protocol, leases, and a
metrics scrape that does not walk the sessions. The TAP device is a stand-in:
these are unit tests of the core's bookkeeping; the end-to-end tests run the real
one, and tests/test_datapath.py the datapath."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from array import array
from pathlib import Path
from typing import Any

import pytest
from conftest import records

from relay import config
from relay.connlog import daylog, reader
from relay.errors import RelayError
from relay.protocols import cstp
from relay.serve import hotpath
from relay.serve.abuse import Abuse
from relay.serve.core import Relay
from relay.serve.datapath import Datapath
from relay.serve.openvpn_link import client_software
from relay.serve.sessions import AddressPool, Journal, SessionRefused, SessionTable


class FakeTap:
    """Neighbour entries in a dict, frames into a pipe."""

    name = "fake0"
    mac = b"\x02\x00\x00\x00\x00\x01"

    def __init__(self) -> None:
        self.neighbours: dict[str, bytes] = {}
        self.fail = False
        self.frames, self.fd = os.pipe()
        os.set_blocking(self.frames, False)

    async def add_neighbour(self, ip: str, mac: bytes) -> None:
        if self.fail:
            raise RelayError("netlink: RTM_NEWNEIGH failed")
        self.neighbours[ip] = mac

    async def remove_neighbour(self, ip: str) -> None:
        self.neighbours.pop(ip, None)


class FakeLink:
    local_ip = "192.0.2.1"

    def __init__(self, port: int = 40000, ip: str = "198.51.100.7") -> None:
        self.peer_ip, self.peer_port = ip, port
        self.session = None
        self.terminated: tuple[str, str] | None = None

    def __repr__(self) -> str:
        return f"{self.peer_ip}:{self.peer_port}"

    def client_hostname(self) -> str | None:
        return None

    def from_kernel_batch(self, buf: bytearray, spans: array[int]) -> None:
        pass

    def terminate(self, reason: str, message: str) -> None:
        self.terminated = (reason, message)


def make_relay(data: Path, users: Path | None = None, **server: Any) -> Relay:
    if users is not None:
        server["users"] = str(users)
    cfg = config.from_dict({"server": server, "logs": {"data_dir": str(data)},
                            "tap": {"pool": "10.211.0.0/29"}})
    relay = Relay(cfg)
    daylog.ensure_dir(data)
    relay.connlog = daylog.ConnectionLog(data)
    relay.journal = Journal(data)
    relay.abuse = Abuse(cfg.abuse, data, relay.audit, time.time)
    relay.sessions = SessionTable(AddressPool(cfg.pool), set())
    relay.tap = FakeTap()  # type: ignore[assignment]
    relay.datapath = Datapath(relay.tap)  # type: ignore[arg-type]
    return relay


def test_login_compares_any_text_in_constant_time(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    users = tmp_path / "users"
    users.write_text("alice:pässwörd\nbob:secret\n")
    relay = make_relay(tmp_path / "data", users)
    link = FakeLink()
    assert relay.check_login(link, "alice", "pässwörd")
    # Non-ASCII against ASCII and the reverse raised TypeError from compare_digest.
    assert not relay.check_login(link, "bob", "sécret")
    assert not relay.check_login(link, "alice", "password")
    assert not relay.check_login(link, "alice", "\udcff")  # a lone surrogate, too
    with caplog.at_level(logging.WARNING, logger="relay"):
        assert not relay.check_login(link, "\u202emallory\x1b[2J", "x")
    assert "login refused for 'mallory[2J' from 198.51.100.7:40000" in caplog.text


def test_full_relay_refuses_counts_and_audits(tmp_path: Path,
                                              loop: asyncio.AbstractEventLoop) -> None:
    relay = make_relay(tmp_path, max_sessions=2)
    first, second, third = FakeLink(1), FakeLink(2), FakeLink(3, "203.0.113.9")
    for link in (first, second):
        loop.run_until_complete(relay.open_session(link, "SSL-VPN", {"name": "x"}))
    assert relay.refuse_reason(third) == "the relay is full; try again later or another relay"
    with pytest.raises(SessionRefused, match="the relay is full"):
        loop.run_until_complete(relay.open_session(third, "SSL-VPN", {"name": "x"}))
    assert len(relay.sessions) == 2
    assert relay.abuse.refused_total["max-sessions"] == 2
    summary = relay.abuse.summarise()
    assert summary is not None and summary["sources"] == {"203.0.113.9": {"max-sessions": 2}}
    [refusals] = [m for m in relay._metrics() if m.name == "relay_refusals_total"]
    assert refusals.samples == [({"reason": "max-sessions"}, 2)]


def test_exhausted_pool_is_a_refusal_not_an_exception(tmp_path: Path,
                                                      loop: asyncio.AbstractEventLoop) -> None:
    relay = make_relay(tmp_path)  # a /29: five client addresses
    for port in range(5):
        loop.run_until_complete(relay.open_session(FakeLink(port), "OpenVPN", {"name": "x"}))
    with pytest.raises(SessionRefused, match=r"no free address in 10\.211\.0\.0/29"):
        loop.run_until_complete(relay.open_session(FakeLink(9), "OpenVPN", {"name": "x"}))
    assert relay.abuse.refused_total == {"pool-exhausted": 1}


def test_a_failed_open_leaves_nothing_behind(tmp_path: Path,
                                             loop: asyncio.AbstractEventLoop) -> None:
    relay = make_relay(tmp_path)
    relay.tap.fail = True  # type: ignore[union-attr]
    with pytest.raises(RelayError, match="netlink"):
        loop.run_until_complete(relay.open_session(FakeLink(), "SSL-VPN", {"name": "x"}))
    loop.run_until_complete(asyncio.sleep(0))  # the address is released by a task
    assert len(relay.sessions) == 0 and relay.sessions.pool.available() == 5
    assert records(tmp_path) == []


def test_a_task_that_fails_ends_its_connection_with_a_log_line(
        tmp_path: Path, loop: asyncio.AbstractEventLoop,
        caplog: pytest.LogCaptureFixture) -> None:
    relay = make_relay(tmp_path)
    link = FakeLink()
    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))

    async def fails() -> None:
        raise RelayError("netlink: RTM_NEWNEIGH failed")

    async def run() -> None:
        relay.spawn(fails(), link)
        relay.spawn(fails())
        await asyncio.sleep(0.01)

    with caplog.at_level(logging.ERROR, logger="relay"):
        loop.run_until_complete(run())
    assert link.terminated == ("relay-error", "internal error in the relay")
    assert ("dropped 198.51.100.7:40000: internal error: RelayError: netlink: RTM_NEWNEIGH "
            "failed") in caplog.text
    assert "internal error: RelayError" in caplog.text
    assert "Traceback" not in caplog.text
    assert not relay.background
    gc.collect()
    assert unretrieved == []


def test_client_text_is_cleaned_for_every_protocol(tmp_path: Path,
                                                   loop: asyncio.AbstractEventLoop) -> None:
    relay = make_relay(tmp_path)
    machine = cstp.CstpServer()
    body = (b'<config-auth type="init"><device-id unique-id="&#x202E;id&#x200B;">'
            b"linux&#x2066;-64</device-id>")
    machine.receive_data(
        b"POST / HTTP/1.1\r\nUser-Agent: Evil\tClient  v6.6\r\n"
        b"X-CSTP-Hostname: host\tname\r\nContent-Length: %d\r\n\r\n" % len(body) + body, 0.0)
    peer_info = {"IV_VER": "2.6.3\x1b[2J", "IV_PLAT": "linux\u202e\u2066",
                 "IV_GUI_VER": "gui " + "x" * 5000, "IV_HWADDR": "\x00\x1b"}
    for link, protocol, software in ((FakeLink(1), "SSL-VPN", machine.client.software()),
                                     (FakeLink(2), "OpenVPN", client_software(peer_info))):
        s = loop.run_until_complete(relay.open_session(link, protocol, software)).session
        relay.close_session(link, s, "client-disconnect: bye\x1b[2J\u202e\r\nforged", None)
    connects = records(tmp_path, "connect")
    assert connects[0]["client_software"] == {
        "name": "Evil Client", "version": "v6.6", "id": "id", "platform": "linux-64",
        "hostname": "host name"}
    sw = connects[1]["client_software"]
    assert sw["version"] == "2.6.3[2J" and sw["platform"] == "linux" and sw["id"] is None
    assert sw["gui"] == ("gui " + "x" * 5000)[:256]
    for rec in records(tmp_path, "disconnect"):
        assert rec["reason"] == "client-disconnect: bye[2J forged"


def test_metrics_scrape_keeps_totals_without_walking_sessions(
        tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    relay = make_relay(tmp_path)
    links = [FakeLink(port) for port in range(3)]
    sessions = [loop.run_until_complete(relay.open_session(link, proto, {"name": "x"})).session
                for link, proto in zip(links, ("SSL-VPN", "SSL-VPN", "OpenVPN"), strict=True)]
    # Packets from the clients, counted where the datapath writes them to the TAP;
    # the first session's still count once it is closed.
    assert relay.datapath is not None
    for s in sessions[:2]:
        packet = bytearray(b"\x45" + bytes(11) + s.vip_bytes + bytes(4) + b"x" * 80)
        relay.datapath.to_kernel_batch(s, packet + packet, array("I", (0, 100, 100, 100)))
    arp = (b"\xff" * 6 + sessions[2].mac + b"\x08\x06" + bytes(8) + sessions[2].mac
           + sessions[2].vip_bytes + bytes(10))
    relay.datapath.to_kernel_frames(sessions[2], bytearray(arp), array("I", (0, len(arp))))
    relay.close_session(links[0], sessions[0], "client-disconnect", None)

    class NoWalking(dict):  # type: ignore[type-arg]
        def values(self) -> Any:
            raise AssertionError("the scrape walked the sessions")

        def __iter__(self) -> Any:
            raise AssertionError("the scrape walked the sessions")

    relay.sessions.by_id = NoWalking(relay.sessions.by_id)
    metrics = {m.name: m.samples for m in relay._metrics()}
    assert metrics["relay_sessions_active"] == [({"protocol": "OpenVPN"}, 1),
                                                ({"protocol": "SSL-VPN"}, 1)]
    assert metrics["relay_sessions_total"] == [({"protocol": "OpenVPN"}, 1),
                                               ({"protocol": "SSL-VPN"}, 2)]
    assert metrics["relay_packets_total"] == [({"direction": "in"}, 5), ({"direction": "out"}, 0)]
    assert metrics["relay_bytes_total"] == [({"direction": "in"}, 428),
                                            ({"direction": "out"}, 0)]


class NamedLink(FakeLink):
    """A link whose reverse lookup answers only after the connect record."""

    hostname: str | None = None

    def client_hostname(self) -> str | None:
        return self.hostname


def _log_lines(data: Path, sid: str) -> list[bytes]:
    """The connection log's lines, the random session ID made a placeholder."""
    [day] = reader.log_days(data)
    return day.source.read_bytes().replace(sid.encode(), b"<SID>").splitlines()


# The records are a format that the collector, searches and operators' own tools
# parse: these are their exact bytes, field order included.
GOLDEN_CONNECT = (
    b'{"id":"rec-1","time":"2026-11-25T21:05:32.123Z","action":"connect",'
    b'"session_id":"<SID>","server":{"id":"relay-1","ip":"192.0.2.1","hostname":"relay.test"},'
    b'"client":{"ip":"198.51.100.7","port":40000,"hostname":null},"protocol":"SSL-VPN",'
    b'"data_channel":"DTLS","client_software":{"name":"Evil Client","version":"v6.6","id":null},'
    b'"virtual_ip":"10.211.0.2"}')
GOLDEN_DISCONNECT = (
    b'{"id":"rec-2","time":"2026-11-25T21:05:42.123Z","action":"disconnect",'
    b'"session_id":"<SID>","server":{"id":"relay-1","ip":"192.0.2.1","hostname":"relay.test"},'
    b'"client":{"ip":"198.51.100.7","port":40000,"hostname":"later.example"},'
    b'"protocol":"SSL-VPN","data_channel":"DTLS",'
    b'"client_software":{"name":"Evil Client","version":"v6.6","id":null},'
    b'"virtual_ip":"10.211.0.2","connect_time":"2026-11-25T21:05:32.123Z",'
    b'"packets":{"in":3,"out":4},"bytes":{"in":300,"out":400},'
    b'"destinations":[{"host":"example.com","ip":"93.184.216.34","port":80,"scheme":"http"}],'
    b'"destinations_dropped":0,"floats":[],"duration_s":9.877,"reason":"client-disconnect: bye[2J",'
    b'"error":null}')
GOLDEN_RESTART = (
    b'{"id":"rec-2","time":"2026-11-25T21:05:42.123Z","action":"disconnect",'
    b'"session_id":"<SID>","server":{"id":"relay-1","ip":"192.0.2.1","hostname":"relay.test"},'
    b'"client":{"ip":"198.51.100.7","port":40000,"hostname":null},'
    b'"protocol":"SSL-VPN","data_channel":"DTLS",'
    b'"client_software":{"name":"Evil Client","version":"v6.6","id":null},'
    b'"virtual_ip":"10.211.0.2","connect_time":"2026-11-25T21:05:32.123Z",'
    b'"packets":{"in":3,"out":4},"bytes":{"in":300,"out":400},'
    b'"destinations":[{"host":"example.com","ip":"93.184.216.34","port":80,"scheme":"http"}],'
    b'"destinations_dropped":0,"floats":[],"duration_s":9.877,"reason":"relay-restart",'
    b'"error":"the relay stopped without closing this session (killed or crashed); '
    b'counters are from its last checkpoint and the end time is the restart"}')


@pytest.fixture
def pinned_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record IDs counted, and the end of every session at one fixed time."""
    ids = iter(range(1, 100))
    monkeypatch.setattr(daylog, "new_record_id", lambda: f"rec-{next(ids)}")
    monkeypatch.setattr(time, "time", lambda: 1795640742.0)  # 21:05:42Z


def _session_with_traffic(relay: Relay, link: FakeLink,
                          loop: asyncio.AbstractEventLoop) -> Any:
    relay.hostname = "relay.test"
    assert relay.connlog is not None
    relay.connlog.clock = lambda: 1795640732.123  # 2026-11-25T21:05:32.123Z
    s = loop.run_until_complete(relay.open_session(
        link, "SSL-VPN", {"name": "Evil\tClient\x1b", "version": "v6.6", "id": None},
        data_channel="DTLS")).session
    relay.connlog.clock = lambda: 1795640742.123
    s.packets_in, s.packets_out, s.bytes_in, s.bytes_out = 3, 4, 300, 400
    s.add_destination(hotpath.Destination("example.com", "93.184.216.34", 80, "http"))
    return s


def test_connect_and_disconnect_records_are_byte_for_byte_the_format(
        tmp_path: Path, loop: asyncio.AbstractEventLoop, pinned_records: None) -> None:
    relay = make_relay(tmp_path)
    link = NamedLink()
    s = _session_with_traffic(relay, link, loop)
    link.hostname = "later.example"  # the lookup answered meanwhile
    relay.close_session(link, s, "client-disconnect: bye\x1b[2J", None)
    assert _log_lines(tmp_path, s.id) == [GOLDEN_CONNECT, GOLDEN_DISCONNECT]


def test_a_killed_relays_session_is_closed_at_restart_byte_for_byte(
        tmp_path: Path, loop: asyncio.AbstractEventLoop, pinned_records: None) -> None:
    relay = make_relay(tmp_path)
    s = _session_with_traffic(relay, NamedLink(), loop)
    relay.journal.write(s)  # the last checkpoint; then the relay is killed
    restarted = make_relay(tmp_path)
    restarted.connlog.clock = lambda: 1795640742.123  # type: ignore[union-attr]
    restarted._close_leftover_sessions()
    assert _log_lines(tmp_path, s.id) == [GOLDEN_CONNECT, GOLDEN_RESTART]
    assert list(restarted.journal.dir.iterdir()) == []


def test_operator_sessions_disconnect_and_status(tmp_path: Path,
                                                 loop: asyncio.AbstractEventLoop) -> None:
    """The control socket's sessions, session-disconnect and status commands: the
    open sessions with their records and counters, an operator's disconnect ends
    the named ones (by ID or every session of an address) with its reason, and
    status reads the same samples as a metrics scrape."""
    from relay.metrics import render

    relay = make_relay(tmp_path)
    links = [FakeLink(1), FakeLink(2), FakeLink(3, "2001:db8::9")]
    leases = [loop.run_until_complete(relay.open_session(link, "SSL-VPN", {"name": "oc"}))
              for link in links]
    leases[0].session.bytes_in, leases[0].session.bytes_out = 1234, 5678

    def control(**req: Any) -> dict[str, Any]:
        return loop.run_until_complete(relay._control(req))

    views = control(cmd="sessions")["sessions"]
    assert [v["connect"]["session_id"] for v in views] == [le.session.id for le in leases]
    first = views[0]
    assert first["connect"]["client"] == {"ip": "198.51.100.7", "port": 1, "hostname": None}
    assert first["counters"]["bytes"] == {"in": 1234, "out": 5678}
    assert first["connect"]["virtual_ip"] == leases[0].address

    ended = control(cmd="session-disconnect", session=leases[1].session.id, reason="abuse")
    assert ended == {"ok": True, "disconnected": [leases[1].session.id]}
    assert links[1].terminated == ("operator-disconnect: abuse",
                                   "disconnected by the relay's operator: abuse")
    assert links[0].terminated is None and links[2].terminated is None
    by_ip = control(cmd="session-disconnect", client_ip="2001:db8::9")
    assert by_ip["disconnected"] == [leases[2].session.id]
    assert links[2].terminated == ("operator-disconnect", "disconnected by the relay's operator")
    assert control(cmd="session-disconnect", session="nope")["disconnected"] == []

    status = control(cmd="status")["status"]
    scrape = render(relay._metrics())
    assert status["running"] and status["sessions"]["active"] == 3
    assert f'relay_sessions_active{{protocol="SSL-VPN"}} {3.0!r}' in scrape
    assert status["sessions"]["by_protocol"] == {"SSL-VPN": 3}
    assert status["workers"] == [{"pid": os.getpid(), "sessions": 3}]
    assert status["bans"] == 0 and status["free_disk_bytes"] > 0
    assert status["capture"] is None and status["shipping"] is None


def test_a_client_that_moved_is_audited_and_named_at_its_last_address(
        tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    relay = make_relay(tmp_path)
    link = FakeLink(40000)
    assert relay.admit(link.peer_ip) is None  # as the UDP endpoint admits a proven peer
    s = link.session = loop.run_until_complete(
        relay.open_session(link, "OpenVPN", {"name": "OpenVPN"})).session  # type: ignore[assignment]
    relay.handshake_done(link)

    async def move(ip: str, port: int) -> None:  # a reverse lookup starts on the loop
        old = (link.peer_ip, link.peer_port)
        link.peer_ip, link.peer_port = ip, port
        relay.client_moved(link, old)  # type: ignore[arg-type]

    loop.run_until_complete(move("::ffff:203.0.113.9", 50000))
    [moved] = records(tmp_path, "client-float")
    assert (moved["session_id"], moved["from"], moved["to"]) == (
        s.id, {"ip": "198.51.100.7", "port": 40000}, {"ip": "203.0.113.9", "port": 50000})
    assert (s.client_ip, s.client_port) == ("203.0.113.9", 50000)
    # The session counts at its new address, so it ends where it is counted.
    assert relay.abuse.sources[relay.abuse.key("203.0.113.9")].sessions == 1
    assert relay.abuse.sources[relay.abuse.key("198.51.100.7")].sessions == 0
    # A killed relay's journal knows the move too.
    relay.journal.write(s)
    restarted = make_relay(tmp_path)
    restarted._close_leftover_sessions()
    [after_restart] = records(tmp_path, "disconnect")
    assert after_restart["client"] == {"ip": "203.0.113.9", "port": 50000, "hostname": None}
    relay.close_session(link, s, "dead-peer", None)  # type: ignore[arg-type]
    relay.link_ended(link, 100.0, True)  # type: ignore[arg-type]
    [_, disconnect] = records(tmp_path, "disconnect")
    assert disconnect["client"] == {"ip": "203.0.113.9", "port": 50000, "hostname": None}
    assert disconnect["floats"] == [{k: moved[k] for k in ("time", "from", "to")}]
    assert records(tmp_path, "connect")[0]["client"]["port"] == 40000
    assert link.terminated is None
    # Moving into a banned network ends the session, as the ban would have.
    relay.abuse.add_ban("192.0.2.0/24", 600, "flood")
    other = FakeLink(40001)
    assert relay.admit(other.peer_ip) is None
    other.session = loop.run_until_complete(  # type: ignore[assignment]
        relay.open_session(other, "OpenVPN", {"name": "OpenVPN"})).session
    relay.handshake_done(other)
    link = other
    loop.run_until_complete(move("192.0.2.77", 1194))
    assert other.terminated == ("banned", "source banned: flood")
