"""Byte-level tests of the sans-IO CSTP state machine (no sockets)."""

from __future__ import annotations

from array import array
from dataclasses import fields

import pytest

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

UA = "Open AnyConnect VPN Agent v9.01-3"
INIT = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<config-auth client="vpn" type="init">'
    '<version who="vpn">v9.01-3</version><device-id unique-id="abc123">linux-64</device-id>'
    "<group-access>https://198.18.1.1/</group-access></config-auth>"
)
REPLY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<config-auth client="vpn" type="auth-reply">'
    '<version who="vpn">v9.01-3</version><device-id>linux-64</device-id>'
    "<auth><username>al&lt;ice</username><password>s3cret</password></auth></config-auth>"
)
PARAMS = TunnelParams(address="10.211.0.2", netmask="255.255.0.0", mtu=1400, dpd_s=30,
                      keepalive_s=20, dns=("10.211.0.1",))


def post(path: str, body: str, extra: str = "") -> bytes:
    data = body.encode()
    return (f"POST {path} HTTP/1.1\r\nHost: relay\r\nUser-Agent: {UA}\r\n"
            f"X-AnyConnect-Platform: linux-64\r\n{extra}"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def connect(cookie: str = "tok") -> bytes:
    return (f"CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nHost: relay\r\nUser-Agent: {UA}\r\n"
            f"Cookie: webvpn={cookie}\r\nX-CSTP-Version: 1\r\nX-CSTP-Hostname: laptop\r\n"
            "X-CSTP-MTU: 1399\r\n\r\n").encode()


def tunnel() -> CstpServer:
    """A machine that has gone through login and CONNECT."""
    c = CstpServer()
    assert c.receive_data(post("/", INIT), 0.0) == []
    [creds] = c.receive_data(post("/auth", REPLY), 0.0)
    assert isinstance(creds, Credentials)
    assert c.accept_login("tok") == []
    [req] = c.receive_data(connect(), 0.0)
    assert req == TunnelRequest("tok")
    assert c.open_tunnel(PARAMS) == []
    c.data_to_send()
    return c


def test_login_form_then_credentials_then_cookie() -> None:
    c = CstpServer()
    assert c.receive_data(post("/", INIT), 0.0) == []
    out = c.data_to_send()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'type="auth-request"' in out and b'name="password"' in out
    head, _, body = out.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head

    events = c.receive_data(post("/auth", REPLY), 0.0)
    assert events == [Credentials("al<ice", "s3cret")]
    assert c.state is State.AWAIT_LOGIN
    c.accept_login("COOKIE-1")
    out = c.data_to_send()
    assert b"Set-Cookie: webvpn=COOKIE-1; Secure\r\n" in out
    assert b'<auth id="success">' in out
    assert c.state is State.HTTP
    assert c.client.software() == {"name": "Open AnyConnect VPN Agent", "version": "v9.01-3",
                                   "id": "abc123", "platform": "linux-64", "hostname": None}


def test_form_encoded_login_and_get() -> None:
    c = CstpServer()
    c.receive_data(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n", 0.0)
    assert b'type="auth-request"' in c.data_to_send()
    events = c.receive_data(
        b"POST /auth HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 27\r\n\r\nusername=bob&password=p%26w", 0.0)
    assert events == [Credentials("bob", "p&w")]


def test_rejected_login_shows_form_again() -> None:
    c = CstpServer()
    c.receive_data(post("/auth", REPLY), 0.0)
    c.reject_login("nope")
    out = c.data_to_send()
    assert b"<error" in out and b'name="username"' in out
    assert c.state is State.HTTP


def test_connect_response_has_what_openconnect_requires() -> None:
    c = CstpServer()
    [req] = c.receive_data(connect("abc"), 0.0)
    assert req == TunnelRequest("abc")
    c.open_tunnel(PARAMS)
    out = c.data_to_send()
    # openconnect compares the first 13 bytes literally and needs MTU and Address.
    assert out.startswith(b"HTTP/1.1 200 CONNECTED\r\n")
    for header in (b"X-CSTP-Address: 10.211.0.2", b"X-CSTP-Netmask: 255.255.0.0",
                   b"X-CSTP-MTU: 1400", b"X-CSTP-DPD: 30", b"X-CSTP-Keepalive: 20",
                   b"X-CSTP-DNS: 10.211.0.1"):
        assert header + b"\r\n" in out
    assert b"Content-Length" not in out
    assert c.client.hostname == "laptop"


def test_tunnel_frames_split_at_every_byte() -> None:
    c = tunnel()
    stream = (frame(PacketType.DATA, b"\x45" + b"x" * 39) + frame(PacketType.KEEPALIVE)
              + frame(PacketType.DPD_REQ, b"probe") + frame(PacketType.DATA, b"\x45" * 20))
    events = []
    for i in range(len(stream)):
        events += c.receive_data(stream[i:i + 1], 0.0)
    assert all(isinstance(e, Packets) for e in events)
    assert [p for e in events for p in e.payloads()] == [b"\x45" + b"x" * 39, b"\x45" * 20]
    # All at once: one batch for the two packets, control frames in between.
    c2 = tunnel()
    [batch] = c2.receive_data(stream, 0.0)
    assert isinstance(batch, Packets) and batch.payloads() == [b"\x45" + b"x" * 39, b"\x45" * 20]
    assert c.data_to_send() == frame(PacketType.DPD_RESP, b"probe")


# An IPv4/UDP packet of 28 bytes (0x1c), as any client sends in a DATA frame.
IP_PACKET = bytes.fromhex("4500001c00004000401100000ad300020a000001") + b"\x30\x39\x00\x35" \
    + b"\x00\x08\x00\x00"


def test_tunnel_frames_byte_for_byte_as_the_protocol_spells_them() -> None:
    """Frames written by hand, not with cstp.frame: the OpenConnect protocol
    (draft-mavrogiannopoulos-openconnect-03 section 2.2.2, and openconnect's
    cstp.c) puts "STF", version 1, the payload length as 16 bits big-endian, the
    type (0 data, 3 DPD request, 4 DPD response, 5 disconnect, 7 keepalive), a zero
    byte, then the payload."""
    c = tunnel()
    [batch] = c.receive_data(b"STF\x01\x00\x1c\x00\x00" + IP_PACKET
                             + b"STF\x01\x00\x00\x07\x00"
                             + b"STF\x01\x00\x05\x03\x00probe", 0.0)
    assert isinstance(batch, Packets) and batch.payloads() == [IP_PACKET]
    assert c.data_to_send() == b"STF\x01\x00\x05\x04\x00probe"  # the DPD answer echoes
    assert cstp.data_header(1400) == b"STF\x01\x05\x78\x00\x00"
    # The relay's disconnect: reason code 0xb0 then the text, as openconnect sends its own.
    c.disconnect("bye")
    assert c.data_to_send() == b"STF\x01\x00\x04\x05\x00\xb0bye"
    client_leaves = tunnel()
    assert client_leaves.receive_data(b"STF\x01\x00\x04\x05\x00\xb0bye", 0.0) == [
        PeerDisconnected("bye")]


def test_data_pipelined_right_after_connect_waits_for_the_decision() -> None:
    c = CstpServer()
    [req] = c.receive_data(connect() + frame(PacketType.DATA, b"early"), 0.0)
    assert isinstance(req, TunnelRequest)
    assert c.receive_data(frame(PacketType.DATA, b"later"), 0.0) == []  # buffered
    [batch] = c.open_tunnel(PARAMS)
    assert isinstance(batch, Packets) and batch.payloads() == [b"early", b"later"]


def test_client_disconnect_carries_reason() -> None:
    c = tunnel()
    events = c.receive_data(frame(PacketType.DISCONNECT, b"\xb0Client received SIGINT"), 0.0)
    assert events == [PeerDisconnected("Client received SIGINT")]
    assert c.state is State.CLOSED
    assert c.receive_data(frame(PacketType.DATA, b"after"), 0.0) == []


def test_server_disconnect_frame() -> None:
    c = tunnel()
    c.disconnect("relay shutting down")
    assert c.data_to_send() == frame(PacketType.DISCONNECT, b"\xb0relay shutting down")


def test_refused_tunnel_is_401_and_closes() -> None:
    c = CstpServer()
    c.receive_data(connect("stale"), 0.0)
    c.refuse_tunnel("401 Unauthorized", "unknown cookie")
    out = c.data_to_send()
    assert out.startswith(b"HTTP/1.1 401 Unauthorized\r\n") and b"X-Reason: unknown cookie" in out
    assert c.state is State.CLOSED


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"400", "not an HTTP request"),
        (b"GET /etc/passwd HTTP/1.1\r\n\r\n", b"404", "unknown path"),
        (b"CONNECT /elsewhere HTTP/1.1\r\n\r\n", b"404", "unknown path"),
        (b"CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\n\r\n", b"401", "without a webvpn cookie"),
        (b"DELETE / HTTP/1.1\r\n\r\n", b"405", "not allowed"),
        (b"GET / HTTP/2.0\r\n\r\n", b"400", "bad request line"),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", b"400", "bad header line"),
        (b"GET / HTTP/1.1\r\nX: \x00\r\n\r\n", b"400", "bad header line"),
        (b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", b"413", "Content-Length"),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"413", "Content-Length"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"411", "chunked"),
        (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", b"431", "header fields"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * (cstp.MAX_HEAD_BYTES + 10), b"431", "request head"),
        # Targets that raised out of the parser: bytes that are not ASCII (UTF-8
        # decoding), an authority urlsplit rejects ("Invalid IPv6 URL").
        (b"GET /\xff HTTP/1.1\r\n\r\n", b"400", "bad request line"),
        (b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n", b"400", "bad request line"),
        (b"GET //[x HTTP/1.1\r\n\r\n", b"404", "unknown path '//[x'"),
        (b"GET http://[x/ HTTP/1.1\r\n\r\n", b"400", "bad request target"),
        (b"POST ftp://relay/auth HTTP/1.1\r\n\r\n", b"400", "bad request target"),
        (b"GET *\x00 HTTP/1.1\r\n\r\n", b"400", "bad request line"),
        (b"GET / HTTP/1.1\r\nX-\xff: a\r\n\r\n", b"400", "bad header line"),
        (b"GET / HTTP/1.1\r\nUser-Agent: \xe2\x80\xae\r\n\r\n", b"400", "bad header line"),
    ],
)
def test_hostile_requests_fail_with_a_status_and_close(data: bytes, status: bytes,
                                                       message: str) -> None:
    c = CstpServer()
    events = c.receive_data(data, 0.0)
    assert len(events) == 1 and isinstance(events[0], ProtocolError)
    assert message in events[0].message
    assert c.data_to_send().startswith(b"HTTP/1.1 " + status)
    assert c.state is State.CLOSED
    assert c.receive_data(b"GET / HTTP/1.1\r\n\r\n", 0.0) == []


def test_too_many_requests_before_the_tunnel() -> None:
    c = CstpServer()
    events = c.receive_data(b"GET / HTTP/1.1\r\n\r\n" * (cstp.MAX_REQUESTS + 1), 0.0)
    assert isinstance(events[-1], ProtocolError) and "requests" in events[-1].message


def test_truncated_head_and_body_wait_for_more() -> None:
    c = CstpServer()
    whole = post("/auth", REPLY)
    assert c.receive_data(whole[:30], 0.0) == []
    assert c.receive_data(whole[30:-5], 0.0) == []
    assert c.receive_data(whole[-5:], 0.0) == [Credentials("al<ice", "s3cret")]


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"XXXX\x00\x04\x00\x00abcd", "bad CSTP magic"),
        (b"STF\x01\x00\x00\x42\x00", "unknown CSTP packet type"),
        (b"STF\x01\x00\x02\x08\x00ab", "compressed"),
    ],
)
def test_bad_cstp_frames(stream: bytes, message: str) -> None:
    c = tunnel()
    events = c.receive_data(frame(PacketType.DATA, b"ok") + stream, 0.0)
    assert isinstance(events[0], Packets) and events[0].payloads() == [b"ok"]
    assert isinstance(events[1], ProtocolError) and message in events[1].message
    assert c.state is State.CLOSED


def test_truncated_cstp_length_waits() -> None:
    c = tunnel()
    # Header says 1000 bytes, only 10 arrive: nothing yet, nothing lost.
    assert c.receive_data(b"STF\x01\x03\xe8\x00\x00" + b"y" * 10, 0.0) == []
    [batch] = c.receive_data(b"y" * 990, 0.0)
    assert batch.payloads() == [b"y" * 1000]


def test_absolute_form_target_is_routed_by_its_path() -> None:
    c = CstpServer()
    assert c.receive_data(b"GET https://relay/?x=1 HTTP/1.1\r\n\r\n", 0.0) == []
    assert b'type="auth-request"' in c.data_to_send()


def test_client_strings_are_kept_as_sent_for_the_relay_to_clean() -> None:
    c = CstpServer()
    c.receive_data(b"GET / HTTP/1.1\r\nUser-Agent: evil\tagent   v1\r\n\r\n", 0.0)
    assert c.client.software()["name"] == "evil\tagent" and c.client.software()["version"] == "v1"
    # An XML value longer than the module reads is ignored; an entity may name
    # any character (the relay cleans it).
    body = ('<config-auth client="vpn" type="init"><version who="vpn">' + "v" * 5000
            + '</version><device-id unique-id="&#x202E;id">linux&#x2066;</device-id>')
    c.receive_data(post("/", body), 0.0)
    assert c.client.version is None
    assert c.client.device_id == "\u202eid" and c.client.platform == "linux\u2066"
    # The name/version split is linear: a User-Agent of a head's worth of spaces
    # (which a backtracking pattern took seconds over) is split at once.
    c.client.user_agent = "a" + " " * cstp.MAX_HEAD_BYTES + "x"
    assert c.client.software()["name"] == c.client.user_agent
    c.client.user_agent = "a" + " " * cstp.MAX_HEAD_BYTES + "9.1"
    assert c.client.software()["name"] == "a" and c.client.software()["version"] == "9.1"


def test_only_the_first_xml_tag_counts() -> None:
    # A body repeating a tag thousands of times (which the patterns used to try
    # at every repeat, 60 ms per request) is read at its first one.
    c = CstpServer()
    body = ('<config-auth client="vpn" type="init">' + "<device-id " * 5000
            + '<device-id unique-id="late">linux</device-id><version>v1</version>')
    c.receive_data(post("/", body[:cstp.MAX_BODY_BYTES]), 0.0)
    assert c.client.platform == "linux-64"  # the header's, not the late "linux"
    assert c.client.device_id is None
    assert c.client.version == "v1"
    # Attributes longer than the cap hide the tag; a longer name is another tag.
    c = CstpServer()
    c.receive_data(post("/", '<config-auth type="init"><versionX>no</versionX><version a="'
                        + "x" * cstp.MAX_XML_ATTRS + '">v2</version>'), 0.0)
    assert c.client.version is None


@pytest.mark.parametrize("state", [State.AWAIT_LOGIN, State.AWAIT_TUNNEL])
def test_bytes_while_the_application_decides_are_capped(state: State) -> None:
    c = CstpServer()
    ask = post("/auth", REPLY) if state is State.AWAIT_LOGIN else connect()
    [decision] = c.receive_data(ask, 0.0)
    assert isinstance(decision, Credentials | TunnelRequest) and c.state is state
    # One whole pipelined request (or frame) is kept for when the decision comes...
    assert c.receive_data(b"x" * cstp.MAX_PIPELINED_BYTES, 0.0) == []
    # ...a byte more is a client that does not wait: it is closed, its bytes dropped.
    [error] = c.receive_data(b"x", 0.0)
    assert isinstance(error, ProtocolError) and error.limit == "pipelined-input"
    assert f"client sent {cstp.MAX_PIPELINED_BYTES + 1} bytes while its" in error.message
    assert c.state is State.CLOSED and c.data_to_send() == b""
    # The application's decision, when it comes, is moot (no exception, nothing sent).
    if state is State.AWAIT_LOGIN:
        assert c.accept_login("tok") == [] and c.reject_login("no") == []
    else:
        assert c.open_tunnel(PARAMS) == []
        assert c.refuse_tunnel("503 Service Unavailable", "full") == []
    assert c.data_to_send() == b""


def test_a_flood_in_one_receive_is_capped_too() -> None:
    c = CstpServer()
    events = c.receive_data(connect() + frame(PacketType.DATA, b"x" * 60000) * 1000, 0.0)
    assert isinstance(events[0], TunnelRequest)
    assert isinstance(events[1], ProtocolError) and events[1].limit == "pipelined-input"


def test_dpd_replies_nobody_takes_are_capped() -> None:
    c = tunnel()
    dpd = frame(PacketType.DPD_REQ, b"d" * 1024)
    n = cstp.MAX_PENDING_OUTPUT // len(dpd)  # replies are as long as the requests
    assert c.receive_data(dpd * n, 0.0) == []
    events = c.receive_data(frame(PacketType.DATA, b"\x45ok") + dpd * 2, 0.0)
    assert isinstance(events[0], Packets) and events[0].payloads() == [b"\x45ok"]
    assert isinstance(events[1], ProtocolError) and events[1].limit == "client-not-reading"
    assert events[1].message.startswith("client does not read: ")
    assert "bytes of DPD replies queued" in events[1].message
    assert c.state is State.CLOSED
    assert c.data_to_send() == b""  # what it would not read is not kept


def test_dpd_replies_taken_as_they_come_are_not_capped() -> None:
    c = tunnel()
    dpd = frame(PacketType.DPD_REQ, b"d" * 1024)
    for _ in range(8):
        assert c.receive_data(dpd * (cstp.MAX_PENDING_OUTPUT // len(dpd) // 2), 0.0) == []
        assert len(c.data_to_send()) == cstp.MAX_PENDING_OUTPUT // len(dpd) // 2 * len(dpd)
    assert c.state is State.TUNNEL


def test_silent_tunnel_is_dead_after_three_dpd_intervals() -> None:
    c = tunnel()  # its last input (the CONNECT) at 0.0; PARAMS.dpd_s is 30
    assert c.next_timeout() == cstp.DEAD_PEER_INTERVALS * 30 == 90.0
    assert c.handle_timeout(89.9) == []
    # Any input is life: a DPD request (answered) or a keepalive at 60 s.
    assert c.receive_data(frame(PacketType.DPD_REQ, b"p"), 50.0) == []
    assert c.receive_data(frame(PacketType.KEEPALIVE), 60.0) == []
    assert c.next_timeout() == 150.0
    assert c.handle_timeout(90.0) == [] and c.state is State.TUNNEL
    assert c.handle_timeout(150.0) == [PeerDead("no data or DPD from the client for 90 s")]
    assert c.state is State.CLOSED and c.next_timeout() is None
    assert c.handle_timeout(500.0) == []  # once
    assert c.receive_data(frame(PacketType.DATA, b"\x45late"), 501.0) == []


def test_a_late_timer_reports_the_whole_silence() -> None:
    c = tunnel()
    assert c.receive_data(frame(PacketType.DATA, b"\x45x"), 10.0) != []
    assert c.handle_timeout(130.4) == [PeerDead("no data or DPD from the client for 120 s")]


def test_no_liveness_deadline_before_the_tunnel() -> None:
    """The login deadline (the relay's) covers the time before the tunnel; the
    machine's own only starts with it, from the interval the client is told."""
    c = CstpServer()
    assert c.receive_data(connect(), 0.0) == [TunnelRequest("tok")]
    assert c.next_timeout() is None and c.handle_timeout(1e9) == []
    c.open_tunnel(TunnelParams(address="10.211.0.2", netmask="255.255.0.0", mtu=1400, dpd_s=5,
                               keepalive_s=20))
    assert c.next_timeout() == 15.0
    [dead] = c.handle_timeout(15.0)
    assert isinstance(dead, PeerDead)
    # Refused or closed tunnels have no deadline either.
    c = CstpServer()
    c.receive_data(connect(), 0.0)
    c.refuse_tunnel("503 Service Unavailable", "full")
    assert c.next_timeout() is None and c.handle_timeout(1e9) == []


def test_events_are_frozen_and_slotted() -> None:
    """One event style for both protocols: immutable, without a __dict__."""
    for event in (Credentials("a", "b"), TunnelRequest("t"), PeerDisconnected("r"),
                  PeerDead("r"), ProtocolError("m"), Packets(bytearray(), array("I"))):
        assert not hasattr(event, "__dict__")
        with pytest.raises(AttributeError):
            setattr(event, fields(event)[0].name, "changed")


def test_calls_in_the_wrong_state_are_bugs() -> None:
    c = CstpServer()
    with pytest.raises(RuntimeError):
        c.open_tunnel(PARAMS)
    with pytest.raises(RuntimeError):
        c.accept_login("x")
