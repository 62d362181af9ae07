"""The control plane (relay.serve.core.Relay) and a worker's side of it
(relay.serve.worker.WorkerHost) without devices or processes: the two talk over
a real socket pair with the real messages (relay.serve.wire), on one event
loop. Logins with any text, sessions refused when the relay is full (counted,
audited), tasks that fail end their connection, client text cleaned for every
protocol, the records byte for byte, the metrics summed over workers without
walking the sessions, operators' commands, floats, and a worker that dies. The
TAP device is a stand-in: these are unit tests of the bookkeeping; the
end-to-end tests run the real one, and tests/test_datapath.py the datapath."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from array import array
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import records

from relay import config
from relay.connlog import daylog, reader
from relay.errors import RelayError
from relay.protocols import cstp
from relay.serve import hotpath, wire
from relay.serve.abuse import Abuse
from relay.serve.core import WORKER_LOST, Relay, WorkerSlot, _load_users
from relay.serve.datapath import Datapath
from relay.serve.openvpn_link import client_software
from relay.serve.rpc import Peer, RemoteError
from relay.serve.sessions import AddressPool, Journal, Session, SessionRefused, SessionTable
from relay.serve.tap import Queue
from relay.serve.worker import Worker, WorkerHost

T = TypeVar("T")


class FakeTap:
    """Neighbour entries in a dict, frames into a pipe."""

    name = "fake0"
    mac = b"\x02\x00\x00\x00\x00\x01"

    def __init__(self) -> None:
        self.neighbours: dict[str, bytes] = {}
        self.fail = False
        self.frames, fd = os.pipe()
        os.set_blocking(self.frames, False)
        self.queues = [fd]

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
        self.session: Session | None = None
        self.terminated: tuple[str, str] | None = None
        self.hostname: str | None = None

    def __repr__(self) -> str:
        return f"{self.peer_ip}:{self.peer_port}"

    def client_hostname(self) -> str | None:
        return self.hostname

    def from_kernel_batch(self, buf: bytearray, spans: array[int]) -> None:
        pass

    def terminate(self, reason: str, message: str) -> None:
        self.terminated = (reason, message)


@dataclass
class Rig:
    """A control plane and one worker's host, joined by a socket pair."""

    loop: asyncio.AbstractEventLoop
    relay: Relay
    slot: WorkerSlot
    worker: Worker
    host: WorkerHost

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def sync(self) -> None:
        """Until the control plane has handled every message sent so far (it
        handles them in order; a request's answer comes after them)."""
        self.run(self.host.redeem_login("no such cookie"))

    def open(self, link: FakeLink, protocol: str = "SSL-VPN",
             software: dict[str, Any] | None = None, **kw: Any) -> Session:
        lease = self.run(self.host.open_session(link, protocol, software or {"name": "x"}, **kw))
        link.session = lease.session
        return lease.session

    def close(self, link: FakeLink, s: Session, reason: str = "client-disconnect") -> None:
        self.host.close_session(link, s, reason, None)
        self.sync()

    def control(self, **req: Any) -> dict[str, Any]:
        return self.run(self.relay._control(req))


def make_rig(loop: asyncio.AbstractEventLoop, data: Path, users: Path | None = None,
             **server: Any) -> Rig:
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
    tap = relay.tap = FakeTap()  # type: ignore[assignment]
    slot = WorkerSlot(0)
    relay.slots = [slot]
    ours, theirs = socket.socketpair()
    worker = Worker(0)

    async def connect() -> None:
        await relay.connect_worker(slot, ours)
        worker.peer = Peer(wire.WORKER, worker.handlers, lambda exc: None)
        await worker.peer.connect(theirs)
        worker.datapath = Datapath(Queue(tap.name, tap.queues[0], tap.mac))
        worker.host = WorkerHost(worker.peer, worker.datapath, cfg, relay.users)

    loop.run_until_complete(connect())
    assert worker.host is not None
    return Rig(loop, relay, slot, worker, worker.host)


@pytest.fixture
def rig(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> Iterator[Rig]:
    yield make_rig(loop, tmp_path)


def test_login_compares_any_text_in_constant_time(tmp_path: Path,
                                                  loop: asyncio.AbstractEventLoop,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    users = tmp_path / "users"
    users.write_text("alice:pässwörd\nbob:secret\n")
    host = make_rig(loop, tmp_path / "data", users).host
    link = FakeLink()
    assert host.check_login(link, "alice", "pässwörd")  # type: ignore[arg-type]
    # Non-ASCII against ASCII and the reverse raised TypeError from compare_digest.
    assert not host.check_login(link, "bob", "sécret")  # type: ignore[arg-type]
    assert not host.check_login(link, "alice", "password")  # type: ignore[arg-type]
    assert not host.check_login(link, "alice", "\udcff")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="relay"):
        assert not host.check_login(link, "\u202emallory\x1b[2J", "x")  # type: ignore[arg-type]
    assert "login refused for 'mallory[2J' from 198.51.100.7:40000" in caplog.text


def test_full_relay_refuses_counts_and_audits(rig: Rig) -> None:
    relay = make_rig(rig.loop, rig.relay.data_dir / "full", max_sessions=2)
    first, second, third = FakeLink(1), FakeLink(2), FakeLink(3, "203.0.113.9")
    for link in (first, second):
        relay.open(link)
    with pytest.raises(SessionRefused, match="the relay is full; try again later"):
        relay.open(third)
    with pytest.raises(SessionRefused, match="the relay is full"):
        relay.open(third)
    assert len(relay.relay.sessions) == 2
    assert relay.relay.abuse.refused_total["max-sessions"] == 2
    summary = relay.relay.abuse.summarise()
    assert summary is not None and summary["sources"] == {"203.0.113.9": {"max-sessions": 2}}
    [refusals] = [m for m in relay.relay._metrics() if m.name == "relay_refusals_total"]
    assert refusals.samples == [({"reason": "max-sessions"}, 2)]


def test_exhausted_pool_is_a_refusal_not_an_exception(rig: Rig) -> None:
    for port in range(5):  # a /29: five client addresses
        rig.open(FakeLink(port), "OpenVPN")
    with pytest.raises(SessionRefused, match=r"no free address in 10\.211\.0\.0/29"):
        rig.open(FakeLink(9), "OpenVPN")
    assert rig.relay.abuse.refused_total == {"pool-exhausted": 1}


def test_a_failed_open_leaves_nothing_behind(rig: Rig) -> None:
    rig.relay.tap.fail = True  # type: ignore[union-attr]
    with pytest.raises(RemoteError, match="netlink"):
        rig.open(FakeLink())
    rig.run(asyncio.sleep(0))  # the address is released by a task
    assert len(rig.relay.sessions) == 0 and rig.relay.sessions.pool.available() == 5
    assert rig.slot.sessions == {} and rig.host.sessions == {}
    assert records(rig.relay.data_dir) == []


def test_a_task_that_fails_ends_its_connection_with_a_log_line(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    link = FakeLink()
    unretrieved: list[dict[str, Any]] = []
    rig.loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))

    async def fails() -> None:
        raise RelayError("netlink: RTM_NEWNEIGH failed")

    async def run() -> None:
        rig.host.spawn(fails(), link)  # type: ignore[arg-type]
        rig.host.spawn(fails())
        await asyncio.sleep(0.01)

    with caplog.at_level(logging.ERROR, logger="relay"):
        rig.run(run())
    assert link.terminated == ("relay-error", "internal error in the relay")
    assert ("dropped 198.51.100.7:40000: internal error: RelayError: netlink: RTM_NEWNEIGH "
            "failed") in caplog.text
    assert "internal error: RelayError" in caplog.text
    assert "Traceback" not in caplog.text
    assert not rig.host.background
    gc.collect()
    assert unretrieved == []


def test_client_text_is_cleaned_for_every_protocol(rig: Rig) -> None:
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
        s = rig.open(link, protocol, software)
        rig.close(link, s, "client-disconnect: bye\x1b[2J\u202e\r\nforged")
    connects = records(rig.relay.data_dir, "connect")
    assert connects[0]["client_software"] == {
        "name": "Evil Client", "version": "v6.6", "id": "id", "platform": "linux-64",
        "hostname": "host name"}
    sw = connects[1]["client_software"]
    assert sw["version"] == "2.6.3[2J" and sw["platform"] == "linux" and sw["id"] is None
    assert sw["gui"] == ("gui " + "x" * 5000)[:256]
    for rec in records(rig.relay.data_dir, "disconnect"):
        assert rec["reason"] == "client-disconnect: bye[2J forged"


def test_metrics_sum_the_workers_without_walking_sessions(
        rig: Rig, tmp_path: Path) -> None:
    """A scrape asks each worker for its figures and adds them up (a second
    worker here: its own socket pair); the sessions are never walked."""
    links = [FakeLink(port) for port in range(3)]
    sessions = [rig.open(link, proto)
                for link, proto in zip(links, ("SSL-VPN", "SSL-VPN", "OpenVPN"), strict=True)]
    # Packets from the clients, counted where the datapath writes them to the TAP;
    # the first session's still count once it is closed.
    datapath = rig.worker.datapath
    assert datapath is not None
    for s in sessions[:2]:
        packet = bytearray(b"\x45" + bytes(11) + s.vip_bytes + bytes(4) + b"x" * 80)
        datapath.to_kernel_batch(s, packet + packet, array("I", (0, 100, 100, 100)))
    arp = (b"\xff" * 6 + sessions[2].mac + b"\x08\x06" + bytes(8) + sessions[2].mac
           + sessions[2].vip_bytes + bytes(10))
    datapath.to_kernel_frames(sessions[2], bytearray(arp), array("I", (0, len(arp))))
    rig.close(links[0], sessions[0])
    # Another worker with traffic of its own.
    other = WorkerSlot(1)
    rig.relay.slots.append(other)
    ours, theirs = socket.socketpair()
    worker = Worker(1)

    async def connect() -> None:
        await rig.relay.connect_worker(other, ours)
        worker.peer = Peer(wire.WORKER, worker.handlers, lambda exc: None)
        await worker.peer.connect(theirs)
        worker.datapath = Datapath(Queue("fake0", os.open(os.devnull, os.O_WRONLY),
                                         FakeTap.mac))
        worker.host = WorkerHost(worker.peer, worker.datapath, rig.relay.cfg, None)
        worker.datapath.traffic.packets_in, worker.datapath.traffic.bytes_in = 7, 700
        worker.datapath.traffic.dropped["spoofed-source"] = 2

    rig.run(connect())

    class NoWalking(dict):  # type: ignore[type-arg]
        def values(self) -> Any:
            raise AssertionError("the scrape walked the sessions")

        def __iter__(self) -> Any:
            raise AssertionError("the scrape walked the sessions")

    rig.relay.sessions.by_id = NoWalking(rig.relay.sessions.by_id)
    rig.run(rig.relay.refresh_stats())
    metrics = {m.name: m.samples for m in rig.relay._metrics()}
    assert metrics["relay_sessions_active"] == [({"protocol": "OpenVPN"}, 1),
                                                ({"protocol": "SSL-VPN"}, 1)]
    assert metrics["relay_sessions_total"] == [({"protocol": "OpenVPN"}, 1),
                                               ({"protocol": "SSL-VPN"}, 2)]
    assert metrics["relay_packets_total"] == [({"direction": "in"}, 5 + 7),
                                              ({"direction": "out"}, 0)]
    assert metrics["relay_bytes_total"] == [({"direction": "in"}, 428 + 700),
                                            ({"direction": "out"}, 0)]
    assert metrics["relay_dropped_packets_total"] == [({"reason": "spoofed-source"}, 2)]
    assert metrics["relay_worker_sessions"] == [({"worker": "0"}, 2), ({"worker": "1"}, 0)]
    assert [labels for labels, _ in metrics["relay_worker_resident_bytes"]] == [
        {"worker": "0"}, {"worker": "1"}]


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


def _session_with_traffic(rig: Rig, link: FakeLink) -> Session:
    rig.relay.hostname = "relay.test"
    assert rig.relay.connlog is not None
    rig.relay.connlog.clock = lambda: 1795640732.123  # 2026-11-25T21:05:32.123Z
    s = rig.open(link, "SSL-VPN", {"name": "Evil\tClient\x1b", "version": "v6.6", "id": None},
                 data_channel="DTLS")
    rig.relay.connlog.clock = lambda: 1795640742.123
    s.packets_in, s.packets_out, s.bytes_in, s.bytes_out = 3, 4, 300, 400
    s.add_destination(hotpath.Destination("example.com", "93.184.216.34", 80, "http"))
    return s


def test_connect_and_disconnect_records_are_byte_for_byte_the_format(
        rig: Rig, pinned_records: None) -> None:
    link = FakeLink()
    s = _session_with_traffic(rig, link)
    link.hostname = "later.example"  # the lookup answered meanwhile
    rig.close(link, s, "client-disconnect: bye\x1b[2J")
    assert _log_lines(rig.relay.data_dir, s.id) == [GOLDEN_CONNECT, GOLDEN_DISCONNECT]


def test_a_killed_relays_session_is_closed_at_restart_byte_for_byte(
        rig: Rig, pinned_records: None) -> None:
    s = _session_with_traffic(rig, FakeLink())
    rig.host.checkpoint()  # the worker's last checkpoint; then the relay is killed
    rig.sync()
    restarted = make_rig(rig.loop, rig.relay.data_dir)
    restarted.relay.connlog.clock = lambda: 1795640742.123  # type: ignore[union-attr]
    restarted.relay._close_leftover_sessions()
    assert _log_lines(rig.relay.data_dir, s.id) == [GOLDEN_CONNECT, GOLDEN_RESTART]
    assert list(restarted.relay.journal.dir.iterdir()) == []


def test_checkpoints_carry_only_sessions_whose_traffic_changed(rig: Rig) -> None:
    """An idle session costs its worker nothing at a checkpoint, and the journal
    keeps its last counters."""
    busy, idle = rig.open(FakeLink(1)), rig.open(FakeLink(2))
    sent: list[dict[str, Any]] = []
    send = rig.host.peer.send
    rig.host.peer.send = lambda t, **f: (sent.append({"t": t, **f}), send(t, **f))[1]  # type: ignore[method-assign]
    busy.packets_in, busy.bytes_in = 10, 1000
    rig.host.checkpoint()
    rig.sync()
    assert [[sid for sid, _ in m["sessions"]] for m in sent if m["t"] == "checkpoint"] == [
        [busy.id]]
    journal = {p.stem: p.read_text() for p in rig.relay.journal.dir.iterdir()}
    assert '"bytes": {"in": 1000' in journal[busy.id]
    assert '"bytes": {"in": 0' in journal[idle.id]
    sent.clear()
    rig.host.checkpoint()
    assert not [m for m in sent if m["t"] == "checkpoint"]


def test_operator_sessions_disconnect_and_status(rig: Rig) -> None:
    """The control socket's sessions, session-disconnect and status commands: the
    open sessions with their records, live counters and worker, an operator's
    disconnect ends the named ones (by ID or every session of an address) with its
    reason, and status reads the same samples as a metrics scrape."""
    from relay.metrics import render

    links = [FakeLink(1), FakeLink(2), FakeLink(3, "2001:db8::9")]
    sessions = [rig.open(link) for link in links]
    sessions[0].bytes_in, sessions[0].bytes_out = 1234, 5678
    links[0].hostname = "client.example"

    views = rig.control(cmd="sessions")["sessions"]
    assert [v["connect"]["session_id"] for v in views] == [s.id for s in sessions]
    first = views[0]
    assert first["connect"]["client"] == {"ip": "198.51.100.7", "port": 1,
                                          "hostname": "client.example"}
    assert first["counters"]["bytes"] == {"in": 1234, "out": 5678}
    assert first["connect"]["virtual_ip"] == sessions[0].virtual_ip
    assert {v["worker"] for v in views} == {0}

    ended = rig.control(cmd="session-disconnect", session=sessions[1].id, reason="abuse")
    assert ended == {"ok": True, "disconnected": [sessions[1].id]}
    assert links[1].terminated == ("operator-disconnect: abuse",
                                   "disconnected by the relay's operator: abuse")
    assert links[0].terminated is None and links[2].terminated is None
    by_ip = rig.control(cmd="session-disconnect", client_ip="2001:db8::9")
    assert by_ip["disconnected"] == [sessions[2].id]
    assert links[2].terminated == ("operator-disconnect", "disconnected by the relay's operator")
    assert rig.control(cmd="session-disconnect", session="nope")["disconnected"] == []

    status = rig.control(cmd="status")["status"]
    scrape = render(rig.relay._metrics())
    assert status["running"] and status["sessions"]["active"] == 3
    assert f'relay_sessions_active{{protocol="SSL-VPN"}} {3.0!r}' in scrape
    assert status["sessions"]["by_protocol"] == {"SSL-VPN": 3}
    # FakeLink.terminate ends nothing: the three are still open.
    assert status["workers"] == [{"worker": 0, "pid": None, "up": False, "sessions": 3,
                                  "restarts": 0}]
    assert status["bans"] == 0 and status["free_disk_bytes"] > 0
    assert status["capture"] is None and status["shipping"] is None


def test_a_client_that_moved_is_audited_and_named_at_its_last_address(rig: Rig) -> None:
    relay, host = rig.relay, rig.host
    link = FakeLink(40000)
    # As the UDP endpoint admits a proven peer.
    assert rig.run(host.admit(link.peer_ip)) is None
    s = rig.open(link, "OpenVPN", {"name": "OpenVPN"})
    host.handshake_done(link)  # type: ignore[arg-type]

    async def move(ip: str, port: int) -> None:  # as the worker asks, awaiting the answer
        old = (link.peer_ip, link.peer_port)
        link.peer_ip, link.peer_port = ip, port
        await host.client_moved(link, old)  # type: ignore[arg-type]

    rig.run(move("::ffff:203.0.113.9", 50000))
    rig.sync()
    [moved] = records(relay.data_dir, "client-float")
    assert (moved["session_id"], moved["from"], moved["to"]) == (
        s.id, {"ip": "198.51.100.7", "port": 40000}, {"ip": "203.0.113.9", "port": 50000})
    kept = relay.sessions.by_id[s.id]
    assert (kept.client_ip, kept.client_port) == ("203.0.113.9", 50000)
    # The session counts at its new address, so it ends where it is counted; and
    # its datagrams are steered to its worker there.
    assert relay.abuse.sources[relay.abuse.key("203.0.113.9")].sessions == 1
    assert relay.abuse.sources[relay.abuse.key("198.51.100.7")].sessions == 0
    assert relay.steered == {("openvpn", ("::ffff:203.0.113.9", 50000)): (rig.slot, 1)}
    # A killed relay's journal knows the move too.
    restarted = make_rig(rig.loop, relay.data_dir)
    restarted.relay._close_leftover_sessions()
    [after_restart] = records(relay.data_dir, "disconnect")
    assert after_restart["client"] == {"ip": "203.0.113.9", "port": 50000, "hostname": None}
    rig.close(link, s, "dead-peer")
    host.link_ended(link, 100.0, True)  # type: ignore[arg-type]
    rig.sync()
    [_, disconnect] = records(relay.data_dir, "disconnect")
    assert disconnect["client"] == {"ip": "203.0.113.9", "port": 50000, "hostname": None}
    assert disconnect["floats"] == [{k: moved[k] for k in ("time", "from", "to")}]
    assert records(relay.data_dir, "connect")[0]["client"]["port"] == 40000
    assert link.terminated is None and relay.steered == {}
    # Moving into a banned network ends the session, as the ban would have.
    relay.abuse.add_ban("192.0.2.0/24", 600, "flood")
    other = FakeLink(40001)
    assert rig.run(host.admit(other.peer_ip)) is None
    rig.open(other, "OpenVPN", {"name": "OpenVPN"})
    host.handshake_done(other)  # type: ignore[arg-type]
    link = other
    rig.run(move("192.0.2.77", 1194))
    rig.sync()
    rig.run(asyncio.sleep(0.05))  # the control plane asks the worker to end it
    assert other.terminated == ("banned", "source banned: flood")


def test_a_ban_reaches_the_workers_connections(rig: Rig) -> None:
    inside, outside = FakeLink(1, "203.0.113.9"), FakeLink(2)
    rig.host.all_links |= {inside, outside}  # type: ignore[arg-type]
    rig.relay.abuse.add_ban("::ffff:203.0.113.0/120", 600, "flood")
    rig.sync()
    rig.run(asyncio.sleep(0.05))
    assert inside.terminated == ("banned", "source banned: flood")
    assert outside.terminated is None


def test_a_login_cookie_is_redeemed_once_on_any_worker(rig: Rig) -> None:
    other = make_rig(rig.loop, rig.relay.data_dir / "other")
    client = {"user_agent": "Open AnyConnect VPN Agent v9.01-3", "platform": "linux-64",
              "device_id": None, "version": None, "hostname": "laptop"}
    rig.host.keep_login("cookie-1", client)
    assert rig.run(rig.host.redeem_login("cookie-1")) == client
    assert rig.run(rig.host.redeem_login("cookie-1")) is None
    # The control plane keeps the cookies, not the worker that issued one.
    second = WorkerSlot(1)
    ours, theirs = socket.socketpair()

    async def connect() -> Peer:
        await rig.relay.connect_worker(second, ours)
        peer = Peer(wire.WORKER, {}, lambda exc: None)
        await peer.connect(theirs)
        return peer

    peer = rig.run(connect())
    rig.host.keep_login("cookie-2", client)
    rig.sync()
    assert rig.run(peer.request("cookie-take", cookie="cookie-2"))["client"] == client
    assert rig.run(other.host.redeem_login("cookie-2")) is None


def test_a_worker_that_dies_has_its_sessions_closed_and_is_started_again(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its sessions get disconnect records (worker-lost, the counters of their
    last checkpoint), what it held of the abuse defences and the steering is
    released, its counters stay in the sums, and it is started again."""
    relay, host = rig.relay, rig.host
    links = [FakeLink(1), FakeLink(2, "203.0.113.9")]
    sessions = []
    for link in links:
        assert rig.run(host.admit(link.peer_ip)) is None
        sessions.append(rig.open(link))
        host.handshake_done(link)  # type: ignore[arg-type]
    assert rig.run(host.admit("198.51.100.99")) is None  # a handshake in progress
    assert rig.run(host.admit_handshake(("203.0.113.9", 5000))) is None  # a DTLS channel's
    sessions[0].packets_in, sessions[0].bytes_in = 9, 900
    host.checkpoint()
    sessions[0].packets_in, sessions[0].bytes_in = 20, 2000  # after the checkpoint: lost
    rig.worker.datapath.traffic.packets_in = 20  # type: ignore[union-attr]
    rig.run(relay.refresh_stats())
    assert relay.abuse.handshakes == 2
    started: list[int] = []

    async def start(slot: WorkerSlot) -> None:
        started.append(slot.index)

    monkeypatch.setattr(relay, "_start_worker", start)
    assert rig.worker.peer is not None and rig.worker.peer.transport is not None
    rig.worker.peer.transport.abort()  # as the kernel closes a killed worker's socket
    rig.run(asyncio.sleep(0.5))
    gone = records(relay.data_dir, "disconnect")
    assert {r["session_id"] for r in gone} == {s.id for s in sessions}
    for rec in gone:
        assert rec["reason"] == WORKER_LOST
        assert rec["error"] == ("worker 0 (pid None) closed its control socket; counters are "
                                "from the session's last checkpoint")
    first = next(r for r in gone if r["session_id"] == sessions[0].id)
    assert first["packets"]["in"] == 9 and first["bytes"]["in"] == 900
    assert len(relay.sessions) == 0 and relay.owner == {}
    assert relay.abuse.handshakes == 0
    assert all(src.sessions == 0 and src.handshakes == 0 for src in relay.abuse.sources.values())
    assert relay.steered == {} and not rig.slot.steers
    assert started == [0] and rig.slot.restarts == 1
    # Its counters stay in the sums after it is gone.
    metrics = {m.name: m.samples for m in relay._metrics()}
    assert ({"direction": "in"}, 20) in metrics["relay_packets_total"]
    assert metrics["relay_worker_up"] == [({"worker": "0"}, 0.0)]


def test_new_connections_go_to_the_serving_worker_with_the_fewest(rig: Rig) -> None:
    """The control plane names the worker new TCP connections go to: the fewest
    admitted connections among those that serve, the first of equals."""
    chosen: list[int] = []

    class Steering:
        def set_least(self, worker: int) -> None:
            chosen.append(worker)

    relay = rig.relay
    relay.steering = Steering()  # type: ignore[assignment]
    slots = [rig.slot, WorkerSlot(1), WorkerSlot(2)]
    relay.slots = slots
    theirs = []  # the workers' ends, open while the test runs
    for slot in slots[1:]:
        ours, end = socket.socketpair()
        theirs.append(end)
        rig.run(relay.connect_worker(slot, ours))
    for slot in slots:
        rig.run(relay._on_ready(slot, {"pid": 1}) or asyncio.sleep(0))  # type: ignore[func-returns-value]
    assert relay.least == 0
    for ip in ("192.0.2.1", "192.0.2.2"):
        relay._on_admit(slots[0], {"ip": ip, "new_session": True, "steer": None})
    relay._on_admit(slots[1], {"ip": "192.0.2.3", "new_session": True, "steer": None})
    assert relay.least == 2
    # A second channel's handshake is no new connection.
    relay._on_admit(slots[2], {"ip": "192.0.2.4", "new_session": False, "steer": None})
    assert relay.least == 2
    relay._on_admit(slots[2], {"ip": "192.0.2.5", "new_session": True, "steer": None})
    assert relay.least == 1
    relay._on_link_ended(slots[0], {"ip": "192.0.2.1", "lifetime_s": 30.0,
                                    "had_session": False})
    assert relay.least == 0
    # A worker that is not there takes none.
    assert slots[0].peer is not None and slots[0].peer.transport is not None
    slots[0].peer.transport.abort()
    rig.run(asyncio.sleep(0.01))
    assert relay.least == 1
    assert chosen == [0, 1, 2, 1, 0, 1]
    relay.stopping = True  # no restart
    for end in theirs:
        end.close()
    rig.run(asyncio.sleep(0.3))


def test_users_file_problems_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "users"
    bad.write_text("alice\n")
    with pytest.raises(config.ConfigError, match=r"\[server\] users: .*:1: expected name:password"):
        _load_users(str(bad))
