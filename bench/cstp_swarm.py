"""A swarm of synthetic AnyConnect (CSTP) clients: thousands of real TLS sessions
held by one asyncio process, standing in for thousands of stock clients in
bench/scale.py.

Each session does over TLS what stock openconnect 9.x does with ``--no-dtls``
(its auth.c and cstp.c): POST the XML ``init``, answer the login form(s) with a
user name and password (sending back every cookie the server set, as ocserv's
``webvpncontext`` needs, and on a new connection when the server closes the old
one), CONNECT with the ``webvpn`` cookie, then hold the tunnel as openconnect's
``keepalive_action`` does: a DPD request after X-CSTP-DPD seconds with nothing
received, a keepalive after X-CSTP-Keepalive seconds with nothing sent, the
server's DPD requests answered. On command every session sends an ICMP echo
request through its tunnel and waits for the reply: the tunnel carries data both
ways.

Session i connects from source address ``--source`` + i // ``--per-source``: the
namespace routes the block to itself (``ip route add local ... dev lo``), so a
server's per-source limits see a crowd of households, not one address.

Run inside a client namespace; one command a line on stdin, one JSON line of
reply on stdout::

    open N     open N more sessions, at most --concurrency in set-up at once
    ping       one echo request through every open tunnel (retried), replies counted
    status     sessions open, sessions lost by reason, DPD and keepalive counts
    close      DISCONNECT and close every session

    python -m bench.cstp_swarm --host 198.18.1.1 --port 443 --source 198.18.128.1
"""

from __future__ import annotations

import argparse
import asyncio
import html
import ipaddress
import json
import re
import resource
import ssl
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import uvloop

from relay.fdlimit import FD_RESERVE, raise_nofile
from relay.protocols.cstp import (
    CSTP_HEADER_LEN,
    CSTP_MAGIC,
    DISCONNECT_REASON_CODE,
    TUNNEL_PATH,
    PacketType,
    frame,
)

# What the swarm says it is: openconnect's User-Agent, since servers pick their
# dialect by it (ocserv treats "Open AnyConnect" as openconnect), and its version
# and platform in the XML, as openconnect 9.01 on Linux sends them.
USER_AGENT = "Open AnyConnect VPN Agent v9.01-3"
CLIENT_VERSION = "v9.01-3"
PLATFORM = "linux-64"
# Login rounds before giving up: the relay asks once (name and password), ocserv's
# plain auth twice (name, then password); openconnect has no bound, a swarm does.
MAX_AUTH_ROUNDS = 4
# Largest HTTP response head and body the swarm reads: the login forms are ~1 KiB;
# relay.protocols.cstp caps what it reads at the same sizes.
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
# Seconds one session may take from TCP connect to an open tunnel: under a set-up
# burst on a loaded machine; the relay's own login deadline is 60 s.
SETUP_TIMEOUT_S = 60.0
# Attempts after a failed one, as a user retries: a server under a set-up burst
# may drop the odd login (ocserv did a few times in 5,000).
SETUP_RETRIES = 2
# The timers are checked this often (openconnect wakes at its next deadline; a
# second's resolution on 30 s and 20 s intervals changes nothing).
TICK_S = 1.0
# Echo requests per session before it counts as not carrying data, and how long
# each waits for its reply.
PING_TRIES = 3
PING_TIMEOUT_S = 5.0
# Sessions in set-up at once by default: below the relay's [abuse] handshakes_total
# (512), enough to keep a multi-process server's cores busy.
DEFAULT_CONCURRENCY = 64
# Sessions per source address by default: under every per-source cap of the
# relay's [abuse] defaults (burst_per_ip 20 connections, handshakes_per_ip 16,
# sessions_per_ip 32, strikes 20) even with a connection per login round.
DEFAULT_PER_SOURCE = 8
# IPv4 and ICMP for the echo probe (RFC 791, RFC 792).
IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
ICMP_ECHO = struct.Struct("!BBHHH")
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY, IPPROTO_ICMP = 8, 0, 1
PING_TTL = 64

_INPUT = re.compile(r"<input\b([^>]*)>")
_ATTR = re.compile(r'(\w+)="([^"]*)"')
_ACTION = re.compile(r'<form\b[^>]*\baction="([^"]*)"')
_OPAQUE = re.compile(r"<opaque\b.*?</opaque>", re.S)


class SwarmError(Exception):
    """A session failed to open; the message is its reason, counted."""


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def closes(self) -> bool:
        return (self.header("connection") or "").lower() == "close"


def parse_head(head: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise SwarmError(f"bad status line {lines[0][:60]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip().lower(), value.strip()))
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


def auth_reply(form: str, user: str, password: str) -> tuple[str, bytes]:
    """The form's action and openconnect's XML answer to it: text inputs get the
    user name, password inputs the password, hidden ones their value."""
    m = _ACTION.search(form)
    action = html.unescape(m.group(1)) if m else "/"
    fields = []
    for attrs_text in _INPUT.findall(form):
        attrs = dict(_ATTR.findall(attrs_text))
        name, kind = attrs.get("name"), attrs.get("type", "text")
        if not name:
            continue
        value = {"text": user, "password": password}.get(kind, attrs.get("value", ""))
        fields.append(f"<{name}>{html.escape(value)}</{name}>")
    opaque = _OPAQUE.search(form)
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<config-auth client="vpn" type="auth-reply" aggregate-auth-version="2">'
            f'<version who="vpn">{CLIENT_VERSION}</version><device-id>{PLATFORM}</device-id>'
            "<session-token/><session-id/>"
            f"{opaque.group(0) if opaque else ''}<auth>{''.join(fields)}</auth></config-auth>")
    return action, body.encode()


def init_body(url: str) -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<config-auth client="vpn" type="init" aggregate-auth-version="2">'
            f'<version who="vpn">{CLIENT_VERSION}</version><device-id>{PLATFORM}</device-id>'
            f"<group-access>{html.escape(url)}</group-access></config-auth>").encode()


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(src: str, dst: str, ident: int, seq: int) -> bytes:
    payload = b"cstp-swarm"
    icmp = ICMP_ECHO.pack(ICMP_ECHO_REQUEST, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    total = IPV4_HEADER.size + len(icmp)
    hdr = IPV4_HEADER.pack(0x45, 0, total, ident, 0, PING_TTL, IPPROTO_ICMP, 0,
                           ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + icmp


def echo_reply_ident(packet: bytes) -> int | None:
    """The identifier of an ICMP echo reply in an IPv4 packet, else None."""
    if len(packet) < IPV4_HEADER.size + ICMP_ECHO.size or packet[0] >> 4 != 4 \
            or packet[9] != IPPROTO_ICMP:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + ICMP_ECHO.size or packet[ihl] != ICMP_ECHO_REPLY:
        return None
    return int.from_bytes(packet[ihl + 4:ihl + 6], "big")


class Connection(asyncio.Protocol):
    """One TLS connection of a session: HTTP requests, then the tunnel."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[Response] | None = None
        self.tunnel = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self, method: str, target: str, headers: list[tuple[str, str]],
                body: bytes = b"") -> asyncio.Future[Response]:
        assert self.transport is not None
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.session.swarm.host}",
                 f"User-Agent: {USER_AGENT}", *(f"{k}: {v}" for k, v in headers)]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.tunnel:
            self.session.frames(self.buf)
        elif self.waiter is not None and not self.waiter.done():
            try:
                response = self._response()
            except SwarmError as exc:
                self.waiter.set_exception(exc)
                return
            if response is not None:
                self.waiter.set_result(response)

    def _response(self) -> Response | None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD_BYTES:
                raise SwarmError("response head too long")
            return None
        status, reason, headers = parse_head(bytes(self.buf[:end]))
        length = 0
        if not (status == 200 and reason.startswith("CONNECTED")):
            length_text = dict(headers).get("content-length", "0")
            if not length_text.isdigit() or int(length_text) > MAX_BODY_BYTES:
                raise SwarmError(f"bad Content-Length {length_text[:20]!r}")
            length = int(length_text)
        if len(self.buf) < end + 4 + length:
            return None
        body = bytes(self.buf[end + 4:end + 4 + length])
        del self.buf[:end + 4 + length]
        return Response(status, reason, headers, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(SwarmError("server closed the connection"))
        if self.tunnel:
            self.session.lost(f"connection-lost: {type(exc).__name__}" if exc
                              else "connection-closed")


@dataclass(eq=False)
class Session:
    swarm: Swarm
    index: int
    source: str
    conn: Connection | None = None
    address: str = ""
    dpd_s: float = 0.0
    keepalive_s: float = 0.0
    last_rx: float = 0.0
    last_tx: float = 0.0
    last_dpd: float = 0.0
    dpd_sent: float = 0.0  # when the DPD request now unanswered went, else 0
    cookies: dict[str, str] = field(default_factory=dict)
    pong: asyncio.Future[None] | None = None

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        swarm = self.swarm
        _, conn = await loop.create_connection(
            lambda: Connection(self), swarm.host, swarm.port, ssl=swarm.tls,
            local_addr=(self.source, 0), ssl_handshake_timeout=SETUP_TIMEOUT_S)
        swarm.stats["connections"] += 1
        self.conn = conn
        return conn

    async def _exchange(self, method: str, target: str, headers: list[tuple[str, str]],
                        body: bytes = b"") -> Response:
        """One request, on a new connection when the server closed the last one."""
        if self.conn is None or self.conn.closed:
            await self.connect()
        assert self.conn is not None
        if self.cookies:
            headers = [*headers, ("Cookie", "; ".join(f"{k}={v}" for k, v in
                                                       self.cookies.items()))]
        response = await self.conn.request(method, target, headers, body)
        for k, v in response.headers:
            if k == "set-cookie":
                name, _, value = v.split(";", 1)[0].partition("=")
                self.cookies[name.strip()] = value.strip()
        if response.closes:
            assert self.conn.transport is not None
            self.conn.transport.close()
            self.conn.closed = True
        return response

    async def open(self) -> None:
        swarm = self.swarm
        xml = [("X-Transcend-Version", "1"), ("X-Aggregate-Auth", "1"),
               ("X-AnyConnect-Platform", PLATFORM), ("X-Support-HTTP-Auth", "true"),
               ("Content-Type", "application/x-www-form-urlencoded")]
        response = await self._exchange("POST", "/", xml,
                                        init_body(f"https://{swarm.host}:{swarm.port}/"))
        for _ in range(MAX_AUTH_ROUNDS):
            if response.status != 200:
                raise SwarmError(f"HTTP {response.status} to a login request")
            text = response.body.decode("utf-8", "replace")
            if 'type="complete"' in text:
                break
            action, body = auth_reply(text, swarm.user, swarm.password)
            response = await self._exchange("POST", action, xml, body)
        else:
            raise SwarmError(f"no login after {MAX_AUTH_ROUNDS} rounds")
        if "webvpn" not in self.cookies:
            raise SwarmError("login without a webvpn cookie")
        response = await self._exchange("CONNECT", TUNNEL_PATH, [
            ("X-CSTP-Version", "1"), ("X-CSTP-Hostname", f"swarm-{self.index}"),
            ("X-CSTP-Base-MTU", "1400"), ("X-CSTP-Address-Type", "IPv4"),
            ("X-CSTP-MTU", "1400")])
        if response.status != 200 or not response.reason.startswith("CONNECTED"):
            raise SwarmError(f"HTTP {response.status} to CONNECT "
                             f"({response.header('x-reason') or response.reason})")
        self.address = response.header("x-cstp-address") or ""
        self.dpd_s = float(response.header("x-cstp-dpd") or 0)
        self.keepalive_s = float(response.header("x-cstp-keepalive") or 0)
        now = time.monotonic()
        self.last_rx = self.last_tx = self.last_dpd = now
        assert self.conn is not None
        self.conn.tunnel = True
        if self.conn.buf:
            self.frames(self.conn.buf)

    def send(self, ptype: PacketType, payload: bytes = b"") -> None:
        if self.conn is not None and self.conn.transport is not None \
                and not self.conn.transport.is_closing():
            self.conn.transport.write(frame(ptype, payload))
            self.last_tx = time.monotonic()

    def frames(self, buf: bytearray) -> None:
        self.last_rx = time.monotonic()
        pos = 0
        while len(buf) - pos >= CSTP_HEADER_LEN:
            if buf[pos:pos + 4] != CSTP_MAGIC:
                self.lost("bad-frame")
                if self.conn is not None and self.conn.transport is not None:
                    self.conn.transport.abort()
                return
            length = int.from_bytes(buf[pos + 4:pos + 6], "big")
            end = pos + CSTP_HEADER_LEN + length
            if end > len(buf):
                break
            ptype, payload = buf[pos + 6], bytes(buf[pos + CSTP_HEADER_LEN:end])
            pos = end
            if ptype == PacketType.DATA:
                self.swarm.stats[f"data-received-ipv{payload[0] >> 4 if payload else 0}"] += 1
                if echo_reply_ident(payload) == self.ident and self.pong is not None \
                        and not self.pong.done():
                    self.pong.set_result(None)
            elif ptype == PacketType.DPD_REQ:
                self.send(PacketType.DPD_RESP, payload)
                self.swarm.stats["server-dpd-answered"] += 1
            elif ptype == PacketType.DPD_RESP and self.dpd_sent:
                self.swarm.dpd_rtts.append(self.last_rx - self.dpd_sent)
                self.dpd_sent = 0.0
            elif ptype in (PacketType.DISCONNECT, PacketType.TERMINATE):
                self.lost("server-disconnect: " + payload[1:].decode("utf-8", "replace"))
        del buf[:pos]

    @property
    def ident(self) -> int:
        return self.index & 0xFFFF

    def tick(self, now: float) -> None:
        """openconnect's keepalive_action: DPD when nothing came for dpd seconds
        (once per interval), else a keepalive when nothing went for keepalive."""
        if self.dpd_s and now - self.last_rx >= self.dpd_s and now - self.last_dpd >= self.dpd_s:
            self.last_dpd = self.dpd_sent = now
            self.send(PacketType.DPD_REQ)
            self.swarm.stats["dpd-sent"] += 1
        elif self.keepalive_s and now - self.last_tx >= self.keepalive_s:
            self.send(PacketType.KEEPALIVE)
            self.swarm.stats["keepalives-sent"] += 1

    async def ping(self, target: str) -> bool:
        loop = asyncio.get_running_loop()
        for seq in range(PING_TRIES):
            self.pong = loop.create_future()
            self.send(PacketType.DATA, echo_request(self.address, target, self.ident, seq))
            try:
                await asyncio.wait_for(self.pong, PING_TIMEOUT_S)
                return True
            except TimeoutError:
                continue
        return False

    def lost(self, reason: str) -> None:
        if self.swarm.sessions.pop(self.index, None) is not None:
            self.swarm.lost[reason.split(":")[0]] += 1
            self.swarm.lost_detail.append(f"session {self.index}: {reason}"[:200])

    def close(self) -> None:
        self.swarm.sessions.pop(self.index, None)
        self.send(PacketType.DISCONNECT, bytes((DISCONNECT_REASON_CODE,)) + b"swarm closing")
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.close()


@dataclass(eq=False)
class Swarm:
    host: str
    port: int
    user: str
    password: str
    source: ipaddress.IPv4Address
    per_source: int
    concurrency: int
    target: str
    tls: ssl.SSLContext = field(init=False)
    sessions: dict[int, Session] = field(default_factory=dict)
    started: int = 0
    lost: Counter[str] = field(default_factory=Counter)
    lost_detail: list[str] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    dpd_rtts: list[float] = field(default_factory=list)  # since the last status

    def __post_init__(self) -> None:
        # The servers under test have throw-away self-signed certificates; the
        # swarm measures them, it does not guard a user's traffic.
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self.tls.check_hostname = False
        self.tls.verify_mode = ssl.CERT_NONE

    async def open(self, n: int) -> dict[str, object]:
        limit = asyncio.Semaphore(self.concurrency)
        failures: Counter[str] = Counter()
        retried: Counter[str] = Counter()

        async def one(index: int) -> None:
            source = str(self.source + index // self.per_source)
            async with limit:
                for attempt in range(1 + SETUP_RETRIES):
                    session = Session(self, index, source)
                    try:
                        await asyncio.wait_for(session.open(), SETUP_TIMEOUT_S)
                    except (SwarmError, OSError, TimeoutError) as exc:
                        reason = str(exc)[:80] if isinstance(exc, SwarmError) \
                            else type(exc).__name__
                        (retried if attempt < SETUP_RETRIES else failures)[reason] += 1
                        if session.conn is not None and session.conn.transport is not None:
                            session.conn.transport.abort()
                        continue
                    self.sessions[index] = session
                    return

        first = self.started
        self.started += n
        cpu0, t0 = cpu_seconds(), time.monotonic()
        await asyncio.gather(*(one(i) for i in range(first, first + n)))
        seconds = time.monotonic() - t0
        return {"opened": n - sum(failures.values()), "failed": dict(failures),
                "retried": dict(retried), "seconds": seconds,
                "swarm_cpu_seconds": cpu_seconds() - cpu0, "open": len(self.sessions)}

    async def ping(self) -> dict[str, object]:
        t0 = time.monotonic()
        sessions = list(self.sessions.values())
        results = await asyncio.gather(*(s.ping(self.target) for s in sessions))
        return {"sessions": len(sessions), "replied": sum(results),
                "seconds": time.monotonic() - t0}

    def status(self) -> dict[str, object]:
        """The counts, and how long the server took to answer the DPD requests
        sent since the last status: a server that stalls (a blocked event loop)
        shows there."""
        rtts, self.dpd_rtts = sorted(self.dpd_rtts), []
        quantiles = {f"dpd_rtt_ms_{name}": rtts[min(len(rtts) - 1, int(q * len(rtts)))] * 1e3
                     for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))} if rtts else {}
        return {"open": len(self.sessions), "lost": dict(self.lost),
                "lost_detail": self.lost_detail[-10:], "dpd_replies": len(rtts), **quantiles,
                **self.stats}

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                session.tick(now)

    def close(self) -> dict[str, object]:
        n = len(self.sessions)
        for session in list(self.sessions.values()):
            session.close()
        return {"closed": n}


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def serve(swarm: Swarm) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    ticker = asyncio.create_task(swarm.ticker())
    try:
        while line := (await reader.readline()).decode().split():
            cmd = line[0]
            reply: dict[str, object]
            if cmd == "open" and len(line) == 2 and line[1].isdigit():
                reply = await swarm.open(int(line[1]))
            elif cmd == "ping":
                reply = await swarm.ping()
            elif cmd == "status":
                reply = swarm.status()
            elif cmd == "close":
                reply = swarm.close()
                await asyncio.sleep(0)  # let the transports start closing
            else:
                reply = {"error": f"unknown command {' '.join(line)[:60]!r}"}
            print(json.dumps(reply), flush=True)
    finally:
        ticker.cancel()
        swarm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", required=True, help="the server's address")
    ap.add_argument("--port", type=int, default=443)
    ap.add_argument("--user", default="swarm")
    ap.add_argument("--password", default="swarm-password")
    ap.add_argument("--source", type=ipaddress.IPv4Address, required=True,
                    help="first source address (the namespace must route the block to itself)")
    ap.add_argument("--per-source", type=int, default=DEFAULT_PER_SOURCE,
                    help="sessions per source address")
    ap.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                    help="sessions in set-up at once")
    ap.add_argument("--max-sessions", type=int, default=0,
                    help="raise the open-files limit for this many sessions")
    ap.add_argument("--ping", default="", help="the address echo requests go to")
    args = ap.parse_args()
    problem = raise_nofile(args.max_sessions + FD_RESERVE)
    if problem:
        raise SystemExit(f"cstp_swarm: {problem}")
    swarm = Swarm(args.host, args.port, args.user, args.password, args.source,
                  args.per_source, args.concurrency, args.ping)
    uvloop.run(serve(swarm))


if __name__ == "__main__":
    main()
