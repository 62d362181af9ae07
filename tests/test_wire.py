"""The control plane's and workers' messages (relay.serve.wire, sans-IO) and their
asyncio end (relay.serve.rpc) over a real socket pair: framing, limits, what each
side may send, requests and replies, failures on either side."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import msgpack
import pytest

from relay.serve import wire
from relay.serve.rpc import Peer, PeerLost, RemoteError


def test_frames_survive_any_cut_and_come_out_in_order() -> None:
    frames = wire.encode({"t": "ready", "pid": 7}) + wire.encode(
        {"t": "admit", "id": 1, "ip": "198.51.100.7", "new_session": True, "steer": None})
    decoder = wire.Decoder(wire.WORKER)
    out: list[dict[str, Any]] = []
    for i in range(len(frames)):  # one byte at a time
        out += decoder.feed(frames[i:i + 1])
    assert [m["t"] for m in out] == ["ready", "admit"]
    assert out[1]["ip"] == "198.51.100.7" and out[1]["steer"] is None
    assert wire.Decoder(wire.WORKER).feed(frames) == out


def test_bytes_and_text_keep_their_types() -> None:
    msg = {"t": "cookie-put", "cookie": "c\u00e9", "client": {"mac": b"\x02\x00\xff"}}
    [back] = wire.Decoder(wire.WORKER).feed(wire.encode(msg))
    assert back == msg


def test_a_frame_over_the_limit_is_refused_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_FRAME_BYTES", 64)
    with pytest.raises(wire.WireError, match="over 64"):
        wire.encode({"t": "ready", "pid": "x" * 100})
    # A length past the limit is refused before its bytes are waited for.
    with pytest.raises(wire.WireError, match="frame of 65 bytes is over 64"):
        wire.Decoder(wire.WORKER).feed(wire.HEADER.pack(65))


@pytest.mark.parametrize(("frame", "why"), [
    (wire.HEADER.pack(2) + b"\xc1\xc1", "not msgpack"),
    (wire.HEADER.pack(1) + msgpack.packb(5), "not a message"),
    (wire.encode({"t": "hello"}), "no message of the worker"),  # the control plane's
    (wire.encode({"t": "launch"}), "no message of the worker"),
    (wire.encode({"t": "close", "session_id": "x"}), "close without reason, error"),
    (wire.encode({"t": "admit", "ip": "x", "new_session": True, "steer": None}),
     "admit without id"),
    (wire.encode({"t": "reply"}), "a reply without an id"),
])
def test_what_breaks_the_protocol_is_refused(frame: bytes, why: str) -> None:
    with pytest.raises(wire.WireError, match=why):
        wire.Decoder(wire.WORKER).feed(frame)


def test_every_message_is_documented() -> None:
    for name, spec in wire.MESSAGES.items():
        assert spec.sender in (wire.CONTROL, wire.WORKER), name
        assert len(spec.doc) > 20, name
        assert bool(spec.reply) <= spec.request, f"{name}: a reply of a notification"


# -- the asyncio end ---------------------------------------------------------------


async def _pair(control_handlers: dict[str, Any], worker_handlers: dict[str, Any]
                ) -> tuple[Peer, Peer, list[str]]:
    lost: list[str] = []
    a, b = socket.socketpair()
    control = Peer(wire.CONTROL, control_handlers, lambda exc: lost.append("control"))
    worker = Peer(wire.WORKER, worker_handlers, lambda exc: lost.append("worker"))
    await control.connect(a)
    await worker.connect(b)
    return control, worker, lost


def test_requests_get_their_replies_and_notifications_keep_their_order(
        loop: asyncio.AbstractEventLoop) -> None:
    seen: list[str] = []

    async def slow_open(msg: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"refused": f"full ({msg['protocol']})", "session": None, "lease": None}

    async def scenario() -> None:
        control, worker, _ = await _pair(
            {"admit": lambda m: {"refused": None if m["ip"] == "ok" else "banned"},
             "open": slow_open,
             "handshake-done": lambda m: seen.append(m["ip"])}, {})
        # Replies match their requests whatever order they finish in.
        opening = asyncio.ensure_future(worker.request(
            "open", protocol="SSL-VPN", peer=["x", 1], local_ip="y", hostname=None,
            software={}, mac=None, data_channel=None))
        assert (await worker.request("admit", ip="no", new_session=True, steer=None)) \
            ["refused"] == "banned"
        assert (await worker.request("admit", ip="ok", new_session=True, steer=None)) \
            ["refused"] is None
        for ip in ("a", "b", "c"):
            worker.send("handshake-done", ip=ip)
        assert (await opening)["refused"] == "full (SSL-VPN)"
        assert seen == ["a", "b", "c"]
        control.close()
        await worker.lost

    loop.run_until_complete(scenario())


def test_a_failing_handler_is_the_requesters_error_and_the_link_stays(
        loop: asyncio.AbstractEventLoop) -> None:
    def broken(msg: dict[str, Any]) -> None:
        raise ValueError("no such thing")

    async def scenario() -> None:
        control, worker, lost = await _pair({"cookie-take": broken}, {})
        with pytest.raises(RemoteError, match="ValueError: no such thing"):
            await worker.request("cookie-take", cookie="x")
        # A message nobody handles is an error reply too, and the peers carry on.
        with pytest.raises(RemoteError, match="no handler for admit"):
            await worker.request("admit", ip="x", new_session=True, steer=None)
        assert control.alive and worker.alive and lost == []

    loop.run_until_complete(scenario())


def test_a_request_to_a_peer_that_goes_ends_with_peer_lost(
        loop: asyncio.AbstractEventLoop) -> None:
    async def never(msg: dict[str, Any]) -> None:
        await asyncio.Event().wait()

    async def scenario() -> None:
        control, worker, lost = await _pair({"open": never}, {})
        pending = asyncio.ensure_future(worker.request(
            "open", protocol="p", peer=["x", 1], local_ip="y", hostname=None, software={},
            mac=None, data_channel=None))
        await asyncio.sleep(0.01)
        assert control.transport is not None
        control.transport.abort()  # as a killed process's socket closes
        with pytest.raises(PeerLost):
            await pending
        with pytest.raises(PeerLost):
            await worker.request("cookie-take", cookie="x")
        worker.send("ready", pid=1)  # dropped, not raised
        assert sorted(lost) == ["control", "worker"]

    loop.run_until_complete(scenario())


def test_a_peer_that_breaks_the_protocol_is_cut_off(loop: asyncio.AbstractEventLoop) -> None:
    async def scenario() -> None:
        a, b = socket.socketpair()
        lost: list[str] = []
        control = Peer(wire.CONTROL, {}, lambda exc: lost.append("control"))
        await control.connect(a)
        b.sendall(wire.HEADER.pack(3) + b"\xc1\xc1\xc1")
        await asyncio.wait_for(control.lost, 5)
        assert lost == ["control"]
        b.close()

    loop.run_until_complete(scenario())
