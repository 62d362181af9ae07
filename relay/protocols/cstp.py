"""AnyConnect CSTP, server side, as the stock ``openconnect`` 9.x client speaks it.

A sans-IO state machine in the manner of h11: :meth:`CstpServer.receive_data`
takes bytes from the TLS stream and returns events; the replies the protocol
makes on its own (the login form, DPD answers) and those the application asks
for (:meth:`accept_login`, :meth:`open_tunnel`, ...) are queued and taken with
:meth:`data_to_send`. No sockets, no event loop: tests drive it with bytes.
Time only advances through the ``now`` arguments: the tunnel's liveness is the
machine's, as OpenVPN's is (:meth:`CstpServer.next_timeout`,
:meth:`CstpServer.handle_timeout`, the :class:`PeerDead` event).

The exchange::

    client                                         relay
    POST / <config-auth type="init">         ->
                                             <-    200 <config-auth type="auth-request"> form
    POST /auth <config-auth type="auth-reply">
          <username/><password/>             ->    Credentials event
                                             <-    200 Set-Cookie: webvpn=...  (accept_login)
    CONNECT /CSCOSSLC/tunnel  Cookie: webvpn ->    TunnelRequest event
                                             <-    200 CONNECTED  X-CSTP-*     (open_tunnel)
                                                   (+ X-DTLS-* when DTLS is offered)
    STF\\x01 LEN TYPE 0  payload ...          <->   Packets / DPD / keepalive / disconnect

DTLS: openconnect 9.x asks for a DTLS data channel with ``X-DTLS-CipherSuite:
PSK-NEGOTIATE...`` in its CONNECT (:attr:`TunnelRequest.dtls`); the relay accepts
with :class:`DtlsOffer` in :meth:`CstpServer.open_tunnel` (the X-DTLS-* headers
ocserv sends for it). The DTLS channel itself is :mod:`relay.protocols.dtls`.

The XML is read with bounded regular expressions over a bounded body, never with
an XML parser: nothing that parses the network may expand entities or fetch.

Nothing the peer sends makes :meth:`CstpServer.receive_data` raise, and every
buffer is capped: what breaks the protocol or exceeds a cap becomes a
:class:`ProtocolError` event (with an HTTP error queued where the peer awaits a
reply) and the machine closes. Client-declared text (User-Agent, platform, ...)
is kept as sent, bounded by the request head; the relay cleans it for the logs.
"""

from __future__ import annotations

import enum
import html
import re
import urllib.parse
from array import array
from dataclasses import dataclass, field

# --- Limits (every one bounds what a hostile peer can make us buffer) -------------

# Largest request head (request line + headers). h11's default
# max_incomplete_event_size is 16 KiB; node.js allows 16 KiB too (--max-http-header-size).
MAX_HEAD_BYTES = 16 * 1024
# Apache's LimitRequestFields default.
MAX_HEADER_COUNT = 100
# The XML auth bodies openconnect sends are under 2 KiB; ocserv caps them at
# 64 KiB (MAX_POST_SIZE): the same cap here.
MAX_BODY_BYTES = 64 * 1024
# An honest client needs 2 (init, auth-reply) + the CONNECT; a few more allow a
# retyped password. More is a client probing the listener.
MAX_REQUESTS = 8
# CSTP frame header: 'S' 'T' 'F' 0x01, length (16 bits, big endian), type, 0.
CSTP_HEADER_LEN = 8
CSTP_MAGIC = b"STF\x01"
# The largest frame: the length field is 16 bits. In the tunnel, what stays
# buffered between receives is at most one incomplete frame, so less than this.
MAX_FRAME_BYTES = CSTP_HEADER_LEN + 0xFFFF
# Bytes the peer may send while the application decides on its login or its
# tunnel (AWAIT_LOGIN, AWAIT_TUNNEL). openconnect sends nothing until it has the
# reply; this leaves a pipelining client one more whole request (head + body
# limits above) or one whole frame (MAX_FRAME_BYTES, smaller). h11 likewise stops
# parsing while it waits for the application and bounds what it holds.
MAX_PIPELINED_BYTES = MAX_HEAD_BYTES + MAX_BODY_BYTES
# Replies queued for data_to_send() that the caller has not taken (DPD answers,
# login forms). ocserv echoes each DPD request at once with cstp_send
# (worker-vpn.c, parse_data), which waits for the socket, so a client that never
# reads stalls its own worker and holds at most the kernel's socket send buffer
# (net.ipv4.tcp_wmem max, 4 MiB by default): the same bound. An honest client has
# a few small DPD answers outstanding at a time.
MAX_PENDING_OUTPUT = 4 * 1024 * 1024
# Longest XML value read from the auth bodies; a longer one is ignored (the logs
# keep at most relay.clienttext's 256 characters of any client text anyway).
MAX_XML_VALUE = 256
# Longest attribute list of an XML tag read from them (openconnect's longest,
# <config-auth ...>, is ~60 characters).
MAX_XML_ATTRS = 512
# A tunnel with nothing received for this many DPD intervals is dead: openconnect
# sends a DPD request after one idle interval, so three missed ones mean the
# path or the client is gone (ocserv uses the same factor).
DEAD_PEER_INTERVALS = 3
# Reason byte openconnect puts before the text of a DISCONNECT (cstp.c, cstp_bye).
DISCONNECT_REASON_CODE = 0xB0
# Lease announced to the client; the session ends with the TCP connection anyway.
# Two weeks, as ocserv's default cookie/lease handling allows.
LEASE_DURATION_S = 1209600

# The DTLS negotiation openconnect (gnutls-dtls.c, openssl-dtls.c) and ocserv
# (DTLS_PROTO_INDICATOR in vpn.h) share: a DTLS 1.2 PSK handshake keyed from the
# TLS session's exporter, the session found by the App-ID in the ClientHello.
PSK_NEGOTIATE = "PSK-NEGOTIATE"
# The App-ID's length: ocserv's (its 32-byte session id), the most a ClientHello's
# session_id field holds (RFC 5246 7.4.1.2), where openconnect puts it.
DTLS_APP_ID_LEN = 32
# What a tunnel packet costs over DTLS beyond its own bytes, at most: the
# AnyConnect header byte inside the record, the DTLS 1.2 record header (13 bytes,
# RFC 6347 4.1), AES-GCM's explicit nonce (8) and tag (16) (RFC 5288; ChaCha20-
# Poly1305 has no explicit nonce, RFC 7905).
DTLS_PACKET_OVERHEAD = 1 + 13 + 8 + 16
# The UDP and IP headers openconnect takes off X-CSTP-Base-MTU to size DTLS
# records (dtls_try_handshake subtracts 20 + 8, for either address family).
DTLS_PATH_OVERHEAD = 20 + 8

TUNNEL_PATH = "/CSCOSSLC/tunnel"
# Paths openconnect and AnyConnect use before the tunnel.
AUTH_PATHS = frozenset({"/", "/auth", "/+webvpn+/index.html", "/+CSCOE+/logon.html"})


class PacketType(enum.IntEnum):
    DATA = 0x00
    DPD_REQ = 0x03
    DPD_RESP = 0x04
    DISCONNECT = 0x05
    KEEPALIVE = 0x07
    COMPRESSED = 0x08
    TERMINATE = 0x09


class State(enum.Enum):
    HTTP = "http"  # reading requests before the tunnel
    AWAIT_LOGIN = "await-login"  # Credentials delivered; the application decides
    AWAIT_TUNNEL = "await-tunnel"  # TunnelRequest delivered; the application decides
    TUNNEL = "tunnel"
    CLOSED = "closed"


# --- Events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    cookie: str
    # The client offers a PSK-NEGOTIATE DTLS channel (openconnect's default).
    dtls: bool = False


@dataclass(frozen=True, slots=True)
class Packets:
    """The IP packets of the DATA frames that arrived together: packet i is
    ``data[spans[2i] : spans[2i] + spans[2i+1]]``. ``data`` is the relay's own
    copy, writable: the hot path stamps it in place, a batch per receive."""

    data: bytearray
    spans: array[int]

    def payloads(self) -> list[bytes]:
        return [bytes(self.data[self.spans[i]:self.spans[i] + self.spans[i + 1]])
                for i in range(0, len(self.spans), 2)]


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    reason: str


@dataclass(frozen=True, slots=True)
class PeerDead:
    """Nothing came from the client for DEAD_PEER_INTERVALS DPD intervals: the
    machine is closed, and so should the connection be."""

    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The peer broke the protocol, or exceeded a cap (``limit`` then names it,
    a metric label). Anything queued (an HTTP error) should be sent, then the
    connection closed."""

    message: str
    limit: str | None = None


Event = Credentials | TunnelRequest | Packets | PeerDisconnected | PeerDead | ProtocolError


@dataclass
class ClientInfo:
    """What the client says about itself, gathered across its requests, as it
    says it (bounded by the request head; cleaned by the relay for the logs)."""

    user_agent: str | None = None
    platform: str | None = None
    device_id: str | None = None
    version: str | None = None
    hostname: str | None = None

    def software(self) -> dict[str, str | None]:
        """{name, version, id, platform, hostname} for the connection log: all as
        the client declares them (``hostname`` is its X-CSTP-Hostname, not the
        reverse lookup of its address)."""
        name = version = None
        if self.user_agent:
            # "Open AnyConnect VPN Agent v9.01-3" -> name, "v9.01-3". Split at the
            # last white space, not with a regular expression: a backtracking one
            # took seconds over a 16 KiB User-Agent of spaces.
            parts = self.user_agent.rsplit(None, 1)
            if len(parts) == 2 and _VERSION.fullmatch(parts[1]):
                name, version = parts
            else:
                name = self.user_agent
        return {"name": name, "version": version or self.version, "id": self.device_id,
                "platform": self.platform, "hostname": self.hostname}


@dataclass(frozen=True, slots=True)
class DtlsOffer:
    """The DTLS channel the relay offers with the tunnel (X-DTLS-*)."""

    port: int  # the UDP port, the TLS listener's number
    app_id: bytes  # DTLS_APP_ID_LEN bytes the ClientHello will carry
    dpd_s: int
    keepalive_s: int


@dataclass(frozen=True, slots=True)
class TunnelParams:
    address: str
    netmask: str
    mtu: int
    dpd_s: int
    keepalive_s: int
    dns: tuple[str, ...] = ()
    session_id: str = ""
    dtls: DtlsOffer | None = None


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def path(self) -> str | None:
        """The target's path: origin-form (RFC 9112 3.2.1: "/auth?x") or
        absolute-form ("https://host/auth"); None when the target is neither
        (urlsplit raises on a malformed authority such as "http://[x")."""
        if self.target.startswith("/"):
            return self.target.partition("?")[0]
        try:
            parts = urllib.parse.urlsplit(self.target)
        except ValueError:
            return None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return None
        return parts.path or "/"


# --- Helpers -----------------------------------------------------------------------

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# The target is visible ASCII (RFC 9112 request-target; RFC 3986 percent-encodes
# anything else), so it always decodes.
_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) ([\x21-\x7e]{1,2048}) HTTP/1\.([01])")
# Header values: visible ASCII, space and tab (RFC 9110 field-value, no obs-text).
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e]*")
_VERSION = re.compile(r"v?\d[\w.+~-]*")


def offers_psk_negotiate(value: str) -> bool:
    """Whether an X-DTLS-CipherSuite (or X-DTLS12-CipherSuite) value offers
    PSK-NEGOTIATE: one of its colon-separated names, as ocserv reads it
    (worker-http.c, HEADER_DTLS_CIPHERSUITE)."""
    return PSK_NEGOTIATE in value.split(":")


def _xml_tag(body: str, tag: str) -> tuple[str, int] | None:
    """(attributes, end) of the first ``<tag ...>``; None when there is none or
    its attributes are longer than MAX_XML_ATTRS. Only the first counts:
    openconnect sends each tag once, and a body that repeats one thousands of
    times costs no more to read (patterns tried at every repeat took 60 ms over
    64 KiB of "<device-id ")."""
    m = re.search(rf"<{tag}[\s>]", body)
    if m is None:
        return None
    start = m.end() - 1
    close = body.find(">", start, start + MAX_XML_ATTRS + 2)
    return (body[start:close], close + 1) if close >= 0 else None


def _xml_text(body: str, tag: str) -> str | None:
    """The text of the first ``<tag ...>text</tag>``, entities decoded."""
    found = _xml_tag(body, tag)
    if found is None:
        return None
    end = found[1]
    stop = body.find("<", end, end + MAX_XML_VALUE + 1)
    if stop < 0 or not body.startswith(f"</{tag}>", stop):
        return None
    return html.unescape(body[end:stop]).strip()


def _xml_attr(body: str, tag: str, attr: str) -> str | None:
    """The value of ``attr="..."`` in the first ``<tag ...>``, entities decoded."""
    found = _xml_tag(body, tag)
    m = re.search(rf'\s{attr}="([^"]{{0,{MAX_XML_VALUE}}})"', found[0]) if found else None
    return html.unescape(m.group(1)).strip() if m else None


def frame(ptype: PacketType, payload: bytes = b"") -> bytes:
    n = len(payload)
    return b"STF\x01" + bytes((n >> 8, n & 0xFF, ptype, 0)) + payload


def data_header(length: int) -> bytes:
    """Header of a DATA frame, for the datapath to send header + packet without a copy."""
    return b"STF\x01" + bytes((length >> 8, length & 0xFF, 0, 0))


def _response(status: str, headers: list[tuple[str, str]], body: bytes = b"",
              close: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Server: relay", *(f"{k}: {v}" for k, v in headers)]
    if body or not status.startswith("200 CONNECTED"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close" if close else "Connection: Keep-Alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_XML_HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'
LOGIN_FORM = (
    _XML_HEAD
    + '<config-auth client="vpn" type="auth-request" aggregate-auth-version="2">\n'
    '<version who="sg">relay</version>\n'
    '<auth id="main">\n'
    "<message>Public relay: any user name and password are accepted.</message>\n"
    '<form method="post" action="/auth">\n'
    '<input type="text" name="username" label="Username:" />\n'
    '<input type="password" name="password" label="Password:" />\n'
    "</form></auth></config-auth>\n"
).encode()


def _login_ok(cookie: str) -> bytes:
    return (
        _XML_HEAD
        + '<config-auth client="vpn" type="complete" aggregate-auth-version="2">\n'
        '<version who="sg">relay</version>\n'
        f"<session-token>{html.escape(cookie)}</session-token>\n"
        '<auth id="success"><title>relay</title></auth></config-auth>\n'
    ).encode()


def _login_failed(message: str) -> bytes:
    return (
        _XML_HEAD
        + '<config-auth client="vpn" type="auth-request" aggregate-auth-version="2">\n'
        '<version who="sg">relay</version>\n'
        f'<auth id="main"><error id="88" param1="{html.escape(message)}" '
        'param2="">Login failed: %s</error>\n'
        '<form method="post" action="/auth">\n'
        '<input type="text" name="username" label="Username:" />\n'
        '<input type="password" name="password" label="Password:" />\n'
        "</form></auth></config-auth>\n"
    ).encode()


# --- The state machine -------------------------------------------------------------


class CstpServer:
    def __init__(self) -> None:
        self.state = State.HTTP
        self.client = ClientInfo()
        self._buf = bytearray()
        self._out = bytearray()
        self._requests = 0
        self._last_rx = 0.0  # when the peer last sent anything
        self._dead_after = 0.0  # seconds of silence that end the tunnel (set on opening it)

    @property
    def incomplete_request(self) -> int:
        """Bytes of a request not yet complete (0 in the tunnel)."""
        return len(self._buf) if self.state is State.HTTP else 0

    # -- output ---------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- application decisions -------------------------------------------------------

    def accept_login(self, cookie: str) -> list[Event]:
        if not self._expect(State.AWAIT_LOGIN):
            return []
        headers = [("Content-Type", "text/xml"), ("X-Transcend-Version", "1"),
                   ("Set-Cookie", f"webvpn={cookie}; Secure")]
        self._out += _response("200 OK", headers, _login_ok(cookie))
        self.state = State.HTTP
        return self._process()

    def reject_login(self, message: str) -> list[Event]:
        if not self._expect(State.AWAIT_LOGIN):
            return []
        headers = [("Content-Type", "text/xml"), ("X-Transcend-Version", "1")]
        self._out += _response("200 OK", headers, _login_failed(message))
        self.state = State.HTTP
        return self._process()

    def open_tunnel(self, p: TunnelParams) -> list[Event]:
        if not self._expect(State.AWAIT_TUNNEL):
            return []
        headers = [
            ("X-CSTP-Version", "1"),
            ("X-CSTP-Protocol", "Copyright (c) 2004 Cisco Systems, Inc."),
            ("X-CSTP-Address", p.address),
            ("X-CSTP-Netmask", p.netmask),
            *(("X-CSTP-DNS", d) for d in p.dns),
            ("X-CSTP-Lease-Duration", str(LEASE_DURATION_S)),
            ("X-CSTP-Session-Timeout", "none"),
            ("X-CSTP-Idle-Timeout", "none"),
            ("X-CSTP-Disconnected-Timeout", "none"),
            ("X-CSTP-Keep", "true"),
            ("X-CSTP-Tunnel-All-DNS", "false"),
            ("X-CSTP-Rekey-Method", "none"),
            ("X-CSTP-DPD", str(p.dpd_s)),
            ("X-CSTP-Keepalive", str(p.keepalive_s)),
            ("X-CSTP-MTU", str(p.mtu)),
            # openconnect sizes its DTLS packets from the base MTU: with DTLS, the
            # path MTU that carries a tunnel packet of p.mtu bytes, so a session
            # has one MTU whichever channel carries it.
            ("X-CSTP-Base-MTU", str(p.mtu + DTLS_PACKET_OVERHEAD + DTLS_PATH_OVERHEAD
                                    if p.dtls else p.mtu)),
        ]
        if p.session_id:
            headers.append(("X-CSTP-Session-ID", p.session_id))
        if p.dtls:
            # ocserv's set (worker-vpn.c, connect_handler) for PSK-NEGOTIATE.
            headers += [("X-DTLS-Port", str(p.dtls.port)),
                        ("X-DTLS-DPD", str(p.dtls.dpd_s)),
                        ("X-DTLS-Keepalive", str(p.dtls.keepalive_s)),
                        ("X-DTLS-App-ID", p.dtls.app_id.hex()),
                        ("X-DTLS-CipherSuite", PSK_NEGOTIATE)]
        self._out += _response("200 CONNECTED", headers)
        self.state = State.TUNNEL
        # The interval the client is told: it sends a DPD request after that long idle.
        self._dead_after = float(DEAD_PEER_INTERVALS * p.dpd_s)
        return self._process()

    def refuse_tunnel(self, status: str, reason: str) -> list[Event]:
        """``status`` like "401 Unauthorized" (openconnect then stops retrying) or
        "503 Service Unavailable" (it shows the X-Reason)."""
        if not self._expect(State.AWAIT_TUNNEL):
            return []
        self._out += _response(status, [("X-Reason", reason)], close=True)
        self._close()
        return []

    def disconnect(self, reason: str) -> None:
        """Tell a tunnel client that the relay ends the session (it then exits
        rather than reconnecting)."""
        if self.state is State.TUNNEL:
            text = reason.encode("ascii", "replace")[:200]
            self._out += frame(PacketType.DISCONNECT, bytes((DISCONNECT_REASON_CODE,)) + text)
        self._close()

    def _close(self) -> None:
        """Nothing more is read: what the peer sent beyond is dropped."""
        self.state = State.CLOSED
        self._buf.clear()

    def _expect(self, state: State) -> bool:
        """False when the peer closed the machine while the application decided
        (the decision is moot); a call in any other wrong state is a bug."""
        if self.state is State.CLOSED:
            return False
        if self.state is not state:
            raise RuntimeError(f"CSTP: called in state {self.state.value}, not {state.value}")
        return True

    # -- input ----------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        self._last_rx = now
        self._buf += data
        return self._process()

    def peer_active(self, now: float) -> None:
        """The client was heard from over its DTLS channel: as alive as over TLS."""
        if self.state is State.TUNNEL:
            self._last_rx = max(self._last_rx, now)

    # -- time -----------------------------------------------------------------------

    def next_timeout(self) -> float | None:
        """When :meth:`handle_timeout` is due: in the tunnel, the moment the peer
        will have been silent for DEAD_PEER_INTERVALS DPD intervals."""
        if self.state is not State.TUNNEL:
            return None
        return self._last_rx + self._dead_after

    def handle_timeout(self, now: float) -> list[Event]:
        """:class:`PeerDead` (and the machine closed) when the peer has been
        silent too long; nothing before its time."""
        if self.state is not State.TUNNEL:
            return []
        idle = now - self._last_rx
        if idle < self._dead_after:
            return []
        self._close()
        return [PeerDead(f"no data or DPD from the client for {idle:.0f} s")]

    def _process(self) -> list[Event]:
        events: list[Event] = []
        while self._buf:
            if self.state is State.TUNNEL:
                if not self._frames(events):
                    break
            elif self.state is State.HTTP:
                request = self._next_request(events)
                if request is None:
                    break
                self._route(request, events)
            else:  # waiting for the application, or closed
                break
        if self.state in (State.AWAIT_LOGIN, State.AWAIT_TUNNEL) \
                and len(self._buf) > MAX_PIPELINED_BYTES:
            what = "login" if self.state is State.AWAIT_LOGIN else "tunnel"
            self._fail(events, f"client sent {len(self._buf)} bytes while its {what} was "
                       f"being decided (at most {MAX_PIPELINED_BYTES})", limit="pipelined-input")
        return events

    def _fail(self, events: list[Event], message: str, status: str | None = None,
              limit: str | None = None) -> None:
        if limit:  # what is queued for a peer over a cap is not worth sending
            self._out.clear()
        if status:
            self._out += _response(status, [], close=True)
        self._close()
        events.append(ProtocolError(message, limit))

    def _next_request(self, events: list[Event]) -> Request | None:
        end = self._buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
        if end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                self._fail(events, f"request head over {MAX_HEAD_BYTES} bytes",
                           "431 Request Header Fields Too Large")
            elif self._buf[:1] == b"\x16" or (self._buf and not _TOKEN.match(self._buf[:1])):
                # A TLS record or binary junk inside the TLS stream: not HTTP.
                self._fail(events, "not an HTTP request", "400 Bad Request")
            return None
        head = bytes(self._buf[:end])
        lines = head.split(b"\r\n")
        m = _REQUEST_LINE.fullmatch(lines[0])
        if not m:
            self._fail(events, f"bad request line {lines[0][:80]!r}", "400 Bad Request")
            return None
        if len(lines) - 1 > MAX_HEADER_COUNT:
            self._fail(events, f"more than {MAX_HEADER_COUNT} header fields",
                       "431 Request Header Fields Too Large")
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
                self._fail(events, f"bad header line {line[:80]!r}", "400 Bad Request")
                return None
            headers[name.decode().lower()] = value.decode().strip()
        if "transfer-encoding" in headers:
            self._fail(events, "chunked bodies are not accepted", "411 Length Required")
            return None
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit() or int(length_text) > MAX_BODY_BYTES:
            self._fail(events, f"bad or oversized Content-Length {length_text[:20]!r}",
                       "413 Content Too Large")
            return None
        length = int(length_text)
        if len(self._buf) < end + 4 + length:
            return None  # body still arriving
        body = bytes(self._buf[end + 4:end + 4 + length])
        del self._buf[:end + 4 + length]
        self._requests += 1
        if self._requests > MAX_REQUESTS:
            self._fail(events, f"more than {MAX_REQUESTS} requests before the tunnel",
                       "429 Too Many Requests")
            return None
        # Both groups are ASCII by the pattern: decoding cannot fail.
        return Request(m.group(1).decode(), m.group(2).decode(), headers, body)

    def _learn(self, req: Request) -> None:
        h = req.headers
        c = self.client
        c.user_agent = h.get("user-agent") or c.user_agent
        c.platform = h.get("x-anyconnect-platform") or c.platform
        c.hostname = h.get("x-cstp-hostname") or c.hostname
        c.device_id = h.get("x-anyconnect-identifier-deviceid") or c.device_id

    def _route(self, req: Request, events: list[Event]) -> None:
        self._learn(req)
        if req.method == "CONNECT":
            if req.target != TUNNEL_PATH:
                self._fail(events, f"CONNECT to unknown path {req.target[:80]!r}",
                           "404 Not Found")
                return
            cookies = urllib.parse.parse_qs(
                req.headers.get("cookie", "").replace("; ", "&").replace(";", "&"))
            cookie = (cookies.get("webvpn") or [""])[0]
            if not cookie:
                self._fail(events, "CONNECT without a webvpn cookie", "401 Unauthorized")
                return
            self.state = State.AWAIT_TUNNEL
            h = req.headers
            events.append(TunnelRequest(cookie, dtls=any(
                offers_psk_negotiate(h.get(name, ""))
                for name in ("x-dtls-ciphersuite", "x-dtls12-ciphersuite"))))
            return
        path = req.path
        if path is None:
            self._fail(events, f"bad request target {req.target[:80]!r}", "400 Bad Request")
            return
        if path not in AUTH_PATHS:
            self._fail(events, f"{req.method} to unknown path {path[:80]!r}", "404 Not Found")
            return
        if req.method == "GET":
            self._out += _response("200 OK", [("Content-Type", "text/xml")], LOGIN_FORM)
            return
        if req.method != "POST":
            self._fail(events, f"method {req.method} not allowed", "405 Method Not Allowed")
            return
        creds = self._parse_login(req.body)
        if creds is None:
            # The XML "init" request (or an empty POST): answer with the form.
            self._out += _response("200 OK", [("Content-Type", "text/xml"),
                                              ("X-Transcend-Version", "1")], LOGIN_FORM)
            return
        self.state = State.AWAIT_LOGIN
        events.append(creds)

    def _parse_login(self, raw: bytes) -> Credentials | None:
        body = raw.decode("utf-8", "replace")
        if "<config-auth" in body:
            self.client.version = _xml_text(body, "version") or self.client.version
            self.client.platform = _xml_text(body, "device-id") or self.client.platform
            self.client.device_id = (_xml_attr(body, "device-id", "unique-id")
                                     or self.client.device_id)
            opening = _xml_tag(body, "config-auth")
            if opening is None or 'type="auth-reply"' not in opening[0]:
                return None
            user = _xml_text(body, "username")
            password = _xml_text(body, "password")
        else:
            form = urllib.parse.parse_qs(body)
            user = (form.get("username") or [None])[0]
            password = (form.get("password") or [None])[0]
        if user is None:
            return None
        return Credentials(user, password or "")

    def _frames(self, events: list[Event]) -> bool:
        """Parse whole CSTP frames; False when more bytes are needed. The DATA
        frames' packets become one Packets event, before whatever ends the parse."""
        buf = self._buf
        pos = 0
        n = len(buf)
        spans = array("I")

        def packets_so_far() -> None:
            if spans:
                last = spans[-2] + spans[-1]
                events.append(Packets(bytearray(buf[:last]), spans))

        try:
            while n - pos >= CSTP_HEADER_LEN:
                if buf[pos:pos + 4] != CSTP_MAGIC:
                    packets_so_far()
                    self._fail(events, f"bad CSTP magic {bytes(buf[pos:pos + 4])!r}")
                    return False
                length = (buf[pos + 4] << 8) | buf[pos + 5]
                end = pos + CSTP_HEADER_LEN + length
                if end > n:
                    break
                ptype = buf[pos + 6]
                start = pos + CSTP_HEADER_LEN
                pos = end
                if ptype == PacketType.DATA:
                    if length:
                        spans.append(start)
                        spans.append(length)
                elif ptype == PacketType.DPD_REQ:
                    self._out += frame(PacketType.DPD_RESP, bytes(buf[start:end]))
                    if len(self._out) > MAX_PENDING_OUTPUT:
                        packets_so_far()
                        self._fail(events, f"client does not read: {len(self._out)} bytes of "
                                   f"DPD replies queued (at most {MAX_PENDING_OUTPUT})",
                                   limit="client-not-reading")
                        return False
                elif ptype in (PacketType.DPD_RESP, PacketType.KEEPALIVE):
                    pass
                elif ptype in (PacketType.DISCONNECT, PacketType.TERMINATE):
                    packets_so_far()
                    reason = bytes(buf[start + 1:end]).decode("utf-8", "replace").strip()
                    self._close()
                    events.append(PeerDisconnected(reason or "client disconnected"))
                    return False
                elif ptype == PacketType.COMPRESSED:
                    packets_so_far()
                    self._fail(events, "compressed CSTP packet, but no compression was offered")
                    return False
                else:
                    packets_so_far()
                    self._fail(events, f"unknown CSTP packet type {ptype:#04x}")
                    return False
            packets_so_far()
            return False
        finally:
            if self.state is not State.CLOSED:
                del buf[:pos]
