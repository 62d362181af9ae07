"""Fuzzing the sans-IO CSTP machine: random and mutated byte streams, split
anywhere, through every state, with the application deciding at random and
sometimes never taking the replies, time passing between the pieces (the
liveness deadline fires when due). Nothing may escape ``receive_data`` or
``handle_timeout`` but events, and no buffer may pass its cap."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.protocols import cstp
from relay.protocols.cstp import (
    Credentials,
    CstpServer,
    Packets,
    PacketType,
    PeerDead,
    PeerDisconnected,
    ProtocolError,
    State,
    TunnelParams,
    TunnelRequest,
    frame,
)

PARAMS = TunnelParams(address="10.211.0.2", netmask="255.255.0.0", mtu=1400, dpd_s=30,
                      keepalive_s=20)
INIT = (b'<config-auth client="vpn" type="init"><version who="vpn">v9</version>'
        b'<device-id unique-id="&#x202E;u">linux-64</device-id></config-auth>')
REPLY = (b'<config-auth client="vpn" type="auth-reply"><auth><username>\xc3\xa9</username>'
         b"<password>p\xff</password></auth></config-auth>")
# Smaller caps, so that short examples reach them.
SMALL_CAPS = {"MAX_PENDING_OUTPUT": 4096, "MAX_PIPELINED_BYTES": 2048}


def request(method: bytes, target: bytes, headers: bytes = b"", body: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return method + b" " + target + b" HTTP/1.1\r\n" + headers + length + b"\r\n" + body


LOGIN = (request(b"POST", b"/", b"User-Agent: Open AnyConnect VPN Agent v9.01\r\n", INIT)
         + request(b"POST", b"/auth", b"X-AnyConnect-Platform: linux-64\r\n", REPLY))
CONNECT = request(b"CONNECT", b"/CSCOSSLC/tunnel", b"Cookie: webvpn=tok\r\nX-CSTP-Hostname: h\r\n")
# Where a stream starts: most examples get past the login, many into the tunnel.
PREFIXES = [b"", LOGIN, LOGIN + CONNECT, CONNECT, CONNECT]
REQUESTS = [
    LOGIN, CONNECT, request(b"POST", b"/auth", b"", b"username=a%FF&password=%C3%28"),
    request(b"GET", b"/", b"Cookie: webvpn=x\r\n"),
    request(b"GET", b"//[x"), request(b"GET", b"/\xff"), request(b"GET", b"http://[::1/"),
    b"\r\n\r\n", b"\x16\x03\x01",
]
FRAMES = [
    frame(PacketType.DPD_REQ, b"d" * 700), frame(PacketType.DPD_REQ, b"d" * 2000),
    frame(PacketType.DPD_REQ), frame(PacketType.DPD_RESP), frame(PacketType.KEEPALIVE),
    frame(PacketType.DISCONNECT, b"\xb0bye \xe2\x80\xae\x1b[2J"),
    b"STF\x01\xff\xff\x00\x00", b"STF\x01\x00\x00\x08\x00", b"STF\x01\x00\x00\x42\x00",
]


def _mutate(data: bytearray, changes: list[tuple[int, int]]) -> bytearray:
    for pos, value in changes:
        data[pos % len(data)] = value
    return data


# A valid piece with a few bytes changed.
mutated = st.tuples(st.sampled_from(REQUESTS + FRAMES),
                    st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)),
                             min_size=1, max_size=4)) \
    .map(lambda pm: bytes(_mutate(bytearray(pm[0]), pm[1])))
# Runs of DATA frames, and of one other frame (a DPD flood reaches the caps),
# weighted over the junk.
data = st.builds(lambda n, k: frame(PacketType.DATA, b"\x45" * n) * k,
                 st.integers(1, 1500), st.integers(1, 8))
control = st.tuples(st.sampled_from(FRAMES), st.integers(1, 8)).map(lambda fk: fk[0] * fk[1])
chunks = st.tuples(
    st.sampled_from(PREFIXES),
    st.lists(st.one_of(data, data, data, control, control, st.sampled_from(REQUESTS),
                       st.binary(max_size=64), mutated), max_size=24),
).map(lambda pc: [pc[0], *pc[1]])


def check_bounds(c: CstpServer) -> None:
    buffered = len(c._buf)  # the invariant under test
    if c.state is State.HTTP:
        assert buffered < cstp.MAX_HEAD_BYTES + 4 + cstp.MAX_BODY_BYTES
    elif c.state in (State.AWAIT_LOGIN, State.AWAIT_TUNNEL):
        assert buffered <= cstp.MAX_PIPELINED_BYTES
    elif c.state is State.TUNNEL:
        assert buffered < cstp.MAX_FRAME_BYTES
    else:
        assert buffered == 0
    assert len(c._out) <= cstp.MAX_PENDING_OUTPUT + 4096  # + a form


@pytest.mark.parametrize("caps", ["default", "small"])
# Each cap, reached for sure: a DPD flood nobody drains, bytes while a decision waits.
@example(stream=[LOGIN + CONNECT, frame(PacketType.DPD_REQ, b"d" * 2000) * 2200],
         splits=[3000], decisions=[2] * 8, gaps=[0.0])
@example(stream=[CONNECT, frame(PacketType.DATA, b"\x45" * 1500) * 60], splits=[500],
         decisions=[3] * 8, gaps=[0.0])
# The tunnel dies of silence between two pieces (dpd_s 30: 90 s).
@example(stream=[CONNECT, frame(PacketType.DATA, b"\x45" * 100) * 3], splits=[100],
         decisions=[0] * 8, gaps=[1.0, 95.0])
@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(stream=chunks, splits=st.lists(st.integers(1, 3000), min_size=1, max_size=8),
       decisions=st.lists(st.integers(0, 3), min_size=8, max_size=8),
       gaps=st.lists(st.floats(0, 100), min_size=1, max_size=8))
def test_nothing_escapes_but_events(caps: str, stream: list[bytes], splits: list[int],
                                    decisions: list[int], gaps: list[float],
                                    monkeypatch_caps: None) -> None:
    data = b"".join(stream)
    c = CstpServer()
    pending: list[cstp.Event] = []
    pos = i = 0
    now = 0.0
    while pos < len(data):
        step = splits[i % len(splits)]
        now += gaps[i % len(gaps)]
        i += 1
        due = c.next_timeout()
        if due is not None and due <= now:
            pending += c.handle_timeout(now)
            assert c.state is State.CLOSED and c.next_timeout() is None
        events = c.receive_data(data[pos:pos + step], now)
        pos += step
        pending.extend(events)
        while pending:
            ev = pending.pop(0)
            assert isinstance(ev, Credentials | TunnelRequest | Packets | PeerDisconnected
                              | PeerDead | ProtocolError)
            # 0 (what hypothesis tries first): the honest course; 1: refuse;
            # 2: a caller that does not drain the replies; 3: decide later.
            choice = decisions[i % len(decisions)]
            if isinstance(ev, Credentials):
                pending += (c.reject_login("no") if choice == 1 else c.accept_login("tok"))
            elif isinstance(ev, TunnelRequest) and choice != 3:
                pending += (c.refuse_tunnel("503 Service Unavailable", "full") if choice == 1
                            else c.open_tunnel(PARAMS))
            elif isinstance(ev, Packets):
                assert all(ev.payloads())
        check_bounds(c)
        if decisions[i % len(decisions)] != 2:
            c.data_to_send()
        if c.state is State.AWAIT_TUNNEL and decisions[(i + 1) % len(decisions)] == 0:
            pending += c.open_tunnel(PARAMS)
    assert c.client.software().keys() == {"name", "version", "id", "platform", "hostname"}


@pytest.fixture
def monkeypatch_caps(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.callspec.params["caps"] == "small":
        for name, value in SMALL_CAPS.items():
            monkeypatch.setattr(cstp, name, value)
