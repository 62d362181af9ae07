"""``relay directory``: relay registrations, the public server list, its access log.

Relays register and send heartbeats (``POST /api/register``, JSON) over mutual
TLS: the relay id is the client certificate's subject CN
(:func:`relay.tlsconf.identity_of_names`, the collector's rule), and a heartbeat
that claims another id is refused (403). A relay whose last heartbeat is older
than the window drops out of the list. Users download the list over HTTPS:

- ``GET /api/iphone/``: the VPN Gate CSV that existing VPN Gate list clients parse
  (``*vpn_servers``, the ``#HostName,...`` header, one row per relay with its
  ``.ovpn`` inline as base64, a closing ``*``; CRLF line ends);
- ``GET /api/servers.json``: the same rows as JSON, with every field the relay sent.

One listener serves both: client certificates are asked for, and only a
registration needs one.

**Score and order** (:func:`score`): what a new user can expect of a relay,
``share * stability * latency``, where ``share`` is the relay's measured
throughput (bit/s; :data:`DEFAULT_SPEED_BPS` when it has measured none) divided
by its active sessions + 1, ``stability`` is its uptime over
:data:`STABLE_UPTIME_S` (a week), capped at 1 and at least
:data:`MIN_STABILITY`, and ``latency`` is ``100 / (100 + ping_ms)`` with the
round-trip time the directory measured on the relay's last heartbeat
connection (TCP_INFO). VPN Gate ranks by the same three things (line speed
shared among the sessions, uptime, ping). Rows are sorted by score, highest
first, then by relay id.

**Partial lists** (``--partial N``): a network that publishes its whole list at
once is easy to block, so each requester may get only N relays: the N with the
highest HMAC-SHA256(secret, requester network | UTC day | relay id)
(rendezvous hashing), where the requester network is its /24 (IPv4) or /48
(IPv6). The subset is stable for a network for a day, differs between
networks, and cannot be computed without the secret
(``DATA_DIR/partial-list.key``, 0600).

**Access log.** Every request that passes admission is one record in
``DATA_DIR/connlog/`` (relay.connlog.daylog: fdatasync'ed, ``id``, RFC 3339 UTC
``time``), with the conventions of a connection record: ``list-download``
(``client`` {``ip``, ``port``}, ``user_agent``, ``request`` {``method``,
``path``}, ``format``, ``served`` {``count``, ``relays``, ``bytes``} or null,
``status``, ``reason``); ``relay-register`` when a relay (re)appears,
``relay-refused`` for a refused registration, ``relay-expire`` when one drops
out. Retention and shipping are the connection log's (relay.connlog.shipping).
Admission (relay.serve.abuse's policy, injected by the CLI: bans, per-address
and total rates, connections in progress) happens at accept, before any TLS
work: a refused connection is reset and counted in the ``refusals`` summary
record, never one record each (each record costs an fdatasync: a flood must not
turn into a disk-write flood).

The HTTP reading is sans-IO (:class:`RequestParser`, bytes in, a request or an
error out), modelled on relay.protocols.cstp's bounded head parser, whose limits
it shares.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

from relay.clienttext import clean
from relay.config import SERVER_ID_RULE, Config, parse_duration, parse_hostport
from relay.connlog import daylog
from relay.connlog.shipping import Shipping
from relay.errors import RelayError
from relay.fsutil import PRIVATE_FILE, listen_tcp, write_atomic
from relay.metrics import Metric, MetricsServer
from relay.netaddr import canonical_address, canonical_ip
from relay.protocols.cstp import (
    _FIELD_VALUE,
    _REQUEST_LINE,
    _TOKEN,
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    MAX_HEADER_COUNT,
    Request,
)
from relay.times import rfc3339_ms
from relay.tlsconf import peer_identity

log = logging.getLogger("relay.central.directory")

# --- Limits and timeouts (each bounds what a hostile peer can hold) -----------------

# Request head, header count and body caps are relay.protocols.cstp's, imported
# above (h11 and node.js allow 16 KiB of head, Apache 100 fields, ocserv a 64 KiB
# body). A registration is ~4 KiB with its .ovpn.

# A TLS handshake that takes longer is a stalled or hostile client: relay
# collector's deadline.
HANDSHAKE_TIMEOUT_S = 15.0
# From accept to a complete request (slowloris): a list client sends one short
# GET right after its handshake. nginx's client_header_timeout is 60 s; the
# metrics endpoint and Prometheus use 10 s.
REQUEST_TIMEOUT_S = 10.0
# Connections open at once, all sources: nginx's worker_connections default is
# 512 (Debian's nginx.conf: 768); [abuse] handshakes_total bounds the admitted
# ones further.
MAX_CONNECTIONS = 1024
# A registration's .ovpn: the relay's certificate and the tls-crypt key are
# ~2 KiB; OpenVPN's own options file parser stops at 256-character lines but not
# files, so this only keeps a registration within the body cap with room left.
MAX_OVPN_BYTES = 32 * 1024
# Relays listed at once. Each needs a certificate from the relays' CA, so this
# only bounds the memory a leaked CA key could make the directory spend (VPN Gate
# lists a few thousand relays).
MAX_RELAYS = 10_000
# Default window: three missed heartbeats of 60 s, as BFD declares a peer down
# after a detect multiplier of 3 (RFC 5880 section 6.8.4).
DEFAULT_WINDOW_S = 180.0
# How often relays past their window are dropped and the snapshot refreshed.
EXPIRE_INTERVAL_S = 1.0
# Score rules (see the module docstring).
DEFAULT_SPEED_BPS = 10_000_000  # what a relay with no measurement is assumed to forward
STABLE_UPTIME_S = 7 * 86400.0  # a week up counts as fully stable
MIN_STABILITY = 0.1  # a fresh relay still gets a tenth of its score
# Requester networks for partial lists: one subscriber's IPv4 /24 neighbourhood
# or IPv6 /48 site (RFC 6177's assignment to an end site).
PARTIAL_V4_PREFIX = 24
PARTIAL_V6_PREFIX = 48
PARTIAL_KEY_FILE = "partial-list.key"
# `relay directory list` reads this snapshot of the registered relays.
SNAPSHOT_FILE = "relays.json"
# After an accept error (out of file descriptors) wait before trying again.
ACCEPT_ERROR_PAUSE_S = 0.5
# struct tcp_info (linux/tcp.h): tcpi_rtt, in microseconds, is the 16th __u32
# after 8 bytes of __u8 fields; 104 bytes hold every field up to it.
TCP_INFO_RTT_OFFSET = 8 + 15 * 4
TCP_INFO_LEN = 104

CSV_PATH = "/api/iphone/"
JSON_PATH = "/api/servers.json"
REGISTER_PATH = "/api/register"
CSV_HEADER = ("#HostName,IP,Score,Ping,Speed,CountryLong,CountryShort,NumVpnSessions,Uptime,"
              "TotalUsers,TotalTraffic,LogType,Operator,Message,OpenVPN_ConfigData_Base64")
PROTOCOL_PORTS = ("cstp", "openvpn-udp", "openvpn-tcp")


# --- HTTP, sans-IO -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpError:
    """The request cannot be served: ``status`` is the HTTP answer, ``reason`` the
    metric label, ``message`` the detail for the log."""

    status: int
    reason: str
    message: str


class RequestParser:
    """One HTTP/1.x request from bytes: :meth:`feed` returns None until the
    request is complete, then the :class:`Request` or an :class:`HttpError`.
    Buffers at most one head and one body (relay.protocols.cstp's caps); never
    raises on what the peer sends."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.result: Request | HttpError | None = None

    def feed(self, data: bytes) -> Request | HttpError | None:
        if self.result is not None:
            return self.result
        self._buf += data
        self.result = self._parse()
        return self.result

    @property
    def pending(self) -> int:
        return len(self._buf)

    def _parse(self) -> Request | HttpError | None:
        end = self._buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
        if end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                return HttpError(431, "head-too-large",
                                 f"request head over {MAX_HEAD_BYTES} bytes")
            if self._buf and not _TOKEN.match(self._buf[:1]):
                return HttpError(400, "not-http", "not an HTTP request")
            return None
        lines = bytes(self._buf[:end]).split(b"\r\n")
        m = _REQUEST_LINE.fullmatch(lines[0])
        if not m:
            return HttpError(400, "bad-request", f"bad request line {lines[0][:80]!r}")
        if len(lines) - 1 > MAX_HEADER_COUNT:
            return HttpError(431, "too-many-headers", f"more than {MAX_HEADER_COUNT} fields")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
                return HttpError(400, "bad-request", f"bad header line {line[:80]!r}")
            headers[name.decode().lower()] = value.decode().strip()
        if "transfer-encoding" in headers:
            return HttpError(411, "chunked", "chunked bodies are not accepted")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit() or int(length_text) > MAX_BODY_BYTES:
            return HttpError(413, "body-too-large",
                             f"bad or oversized Content-Length {length_text[:20]!r}")
        length = int(length_text)
        if len(self._buf) < end + 4 + length:
            return None
        body = bytes(self._buf[end + 4:end + 4 + length])
        self._buf.clear()
        return Request(m.group(1).decode(), m.group(2).decode(), headers, body)


_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
            413: "Content Too Large", 429: "Too Many Requests",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def response(status: int, body: bytes, content_type: str = "application/json",
             head_only: bool = False) -> bytes:
    """One response; every connection carries one request (Connection: close)."""
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nServer: relay-directory\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n")
    return head.encode() + (b"" if head_only else body)


def _error_body(message: str) -> bytes:
    return (json.dumps({"error": message}) + "\n").encode()


# --- Registrations -------------------------------------------------------------------


class RegistrationError(ValueError):
    """A registration body the directory will not list (one line, shown to the relay)."""


@dataclass
class RelayEntry:
    id: str
    address: str  # as the relay advertises it (IP or host name)
    ip: str  # the IP column: the address if it is one, else the heartbeat's source
    ports: dict[str, int]
    uptime_s: float
    sessions_active: int
    sessions_total: int
    traffic_bytes: int
    throughput_bps: int | None
    operator: str
    message: str
    country: str
    country_name: str
    log_policy: dict[str, str]
    ovpn: str
    ping_ms: int | None = None
    registered: float = 0.0  # first heartbeat of this appearance
    last_heartbeat: float = 0.0
    heartbeats: int = 0

    def public(self) -> dict[str, Any]:
        """The JSON list's row (the partial-list secret and nothing private in it)."""
        d = asdict(self)
        d["score"] = score(self)
        d["log_type"] = log_type(self.log_policy)
        d["last_heartbeat"] = rfc3339_ms(self.last_heartbeat)
        d["registered"] = rfc3339_ms(self.registered)
        return d


def _int(body: dict[str, Any], key: str, lo: int = 0, hi: int = 1 << 62) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise RegistrationError(f"{key}: expected an integer in {lo}..{hi}")
    return value


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise RegistrationError(f"{key}: expected a string")
    return clean(value) or ""


def parse_registration(body: bytes, identity: str | None, peer_ip: str) -> RelayEntry:
    """A heartbeat's JSON body, checked; RegistrationError (one line) otherwise.
    ``identity`` is what the client certificate proves: the body must claim it."""
    if identity is None:
        raise RegistrationError("a registration needs a client certificate whose subject CN "
                                "is the relay id")
    try:
        data = json.loads(body)
    except ValueError:
        raise RegistrationError("the body is not JSON") from None
    if not isinstance(data, dict):
        raise RegistrationError("the body is not a JSON object")
    claimed = data.get("id")
    if not isinstance(claimed, str) or not re.fullmatch(SERVER_ID_RULE, claimed):
        raise RegistrationError("id: expected a relay id")
    if claimed != identity:
        raise RegistrationError(f"the certificate proves the relay id {identity!r}, "
                                f"not {claimed!r}")
    address = data.get("address")
    if not isinstance(address, str) or not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", address):
        raise RegistrationError("address: expected an IP address or host name")
    try:
        ip = canonical_ip(address)
    except ValueError:
        ip = canonical_ip(peer_ip)
    ports_in = data.get("ports")
    if not isinstance(ports_in, dict) or not ports_in:
        raise RegistrationError(f"ports: expected an object of {', '.join(PROTOCOL_PORTS)}")
    ports = {}
    for name in ports_in:
        if name not in PROTOCOL_PORTS:
            raise RegistrationError(f"ports: unknown protocol {str(name)[:32]!r}")
        ports[name] = _int(ports_in, name, 1, 65535)
    throughput = data.get("throughput_bps")
    policy = data.get("log_policy")
    if not isinstance(policy, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 64
            for k, v in policy.items()) or len(policy) > 8:
        raise RegistrationError("log_policy: expected an object of at most 8 short strings")
    ovpn = data.get("ovpn")
    if not isinstance(ovpn, str) or not ovpn.isascii() or len(ovpn) > MAX_OVPN_BYTES \
            or "\nremote " not in f"\n{ovpn}":
        raise RegistrationError(f"ovpn: expected an ASCII .ovpn with a remote line, at most "
                                f"{MAX_OVPN_BYTES} bytes")
    country = _text(data, "country")
    if country and not re.fullmatch(r"[A-Z]{2}", country):
        raise RegistrationError("country: expected an ISO 3166 code")
    return RelayEntry(
        id=claimed, address=address, ip=ip, ports=ports,
        uptime_s=float(_int(data, "uptime_s")),
        sessions_active=_int(data, "sessions_active"),
        sessions_total=_int(data, "sessions_total"),
        traffic_bytes=_int(data, "traffic_bytes"),
        throughput_bps=None if throughput is None else _int(data, "throughput_bps"),
        operator=_text(data, "operator"), message=_text(data, "message"),
        country=country, country_name=_text(data, "country_name"),
        log_policy={clean(k) or "": clean(v) or "" for k, v in policy.items()}, ovpn=ovpn)


def score(e: RelayEntry) -> int:
    """The list's Score (module docstring: share x stability x latency)."""
    share = (e.throughput_bps or DEFAULT_SPEED_BPS) / (e.sessions_active + 1)
    stability = max(MIN_STABILITY, min(1.0, e.uptime_s / STABLE_UPTIME_S))
    latency = 100.0 / (100.0 + (e.ping_ms or 0))
    return int(share * stability * latency)


def log_type(policy: dict[str, str]) -> str:
    """The LogType column: how long the relay keeps its packet log searchable
    (VPN Gate's relays say "2weeks")."""
    try:
        days = parse_duration(policy.get("packet_log_searchable", "")) // 86400
    except ValueError:
        return "unknown"
    return f"{days // 7}weeks" if days and days % 7 == 0 else f"{days}days"


def ordered(entries: list[RelayEntry]) -> list[RelayEntry]:
    return sorted(entries, key=lambda e: (-score(e), e.id))


def requester_network(ip: str) -> str:
    addr = canonical_address(ip)
    prefix = PARTIAL_V4_PREFIX if addr.version == 4 else PARTIAL_V6_PREFIX
    return str(ipaddress.ip_network((addr, prefix), strict=False))


def partial(entries: list[RelayEntry], requester_ip: str, day: str, secret: bytes,
            n: int) -> list[RelayEntry]:
    """The ``n`` relays this requester's network sees today (rendezvous hashing)."""
    network = requester_network(requester_ip)

    def weight(e: RelayEntry) -> bytes:
        return hmac.digest(secret, f"{network}|{day}|{e.id}".encode(), "sha256")

    return ordered(sorted(entries, key=weight, reverse=True)[:n])


def _csv_cell(value: object) -> str:
    """A cell that naive ``line.split(",")`` parsers read too: commas become ``_``,
    double quotes ``'`` (so no cell needs CSV quoting); text is already one line."""
    return str(value).replace(",", "_").replace('"', "'")


def render_csv(entries: list[RelayEntry]) -> bytes:
    rows = ["*vpn_servers", CSV_HEADER]
    for e in entries:
        rows.append(",".join(_csv_cell(v) for v in (
            e.id, e.ip, score(e), "" if e.ping_ms is None else e.ping_ms,
            e.throughput_bps or 0, e.country_name or "Unknown", e.country or "--",
            e.sessions_active, int(e.uptime_s * 1000), e.sessions_total, e.traffic_bytes,
            log_type(e.log_policy), e.operator, e.message,
            base64.b64encode(e.ovpn.encode()).decode())))
    rows.append("*")
    return ("\r\n".join(rows) + "\r\n").encode()


def render_json(entries: list[RelayEntry], now: float) -> bytes:
    return (json.dumps({"generated": rfc3339_ms(now),
                        "relays": [e.public() for e in entries]}) + "\n").encode()


# --- The directory (policy and state, no sockets) -------------------------------------


class Admission(Protocol):
    """What the directory needs of relay.serve.abuse.Abuse (injected by the CLI,
    which sits above both layers)."""

    refused_total: Counter[str]

    def admit(self, ip: str) -> str | None: ...
    def refuse(self, ip: str, reason: str) -> None: ...
    def connection_closed(self, ip: str, lifetime_s: float, had_session: bool) -> None: ...
    def expire(self) -> None: ...
    def summarise(self) -> dict[str, Any] | None: ...


@dataclass
class Stats:
    registrations: Counter[str] = field(default_factory=Counter)  # new, refused
    heartbeats: int = 0
    expired: int = 0
    downloads: Counter[tuple[str, str]] = field(default_factory=Counter)  # (format, status)
    closed: Counter[str] = field(default_factory=Counter)  # by reason


@dataclass
class Served:
    payload: bytes
    record: dict[str, Any] | None


class Directory:
    def __init__(self, data_dir: Path, server_id: str, *, window_s: float = DEFAULT_WINDOW_S,
                 partial_n: int = 0, clock: Callable[[], float] = time.time) -> None:
        self.data_dir = Path(data_dir)
        self.server = {"id": server_id, "hostname": socket.gethostname()}
        self.window_s = window_s
        self.partial_n = partial_n
        self.clock = clock
        self.relays: dict[str, RelayEntry] = {}
        self.stats = Stats()
        self.secret = _partial_secret(self.data_dir) if partial_n else b""
        self.dirty = True  # the snapshot for relay directory list is out of date
        # The whole list's bodies, rendered once per change of the relays (a JSON
        # list of a thousand relays costs tens of ms to render: not per request).
        self.version = 0
        self._rendered: dict[str, tuple[int, list[RelayEntry], bytes]] = {}

    def handle(self, req: Request | HttpError, client_ip: str, client_port: int,
               identity: str | None, rtt_ms: int | None) -> Served:
        """The answer to one request, and the record it leaves."""
        client = {"ip": canonical_ip(client_ip), "port": client_port}
        if isinstance(req, Request) and req.path == REGISTER_PATH:
            return self._register(req, client, identity, rtt_ms)
        return self._list(req, client)

    def _register(self, req: Request, client: dict[str, Any], identity: str | None,
                  rtt_ms: int | None) -> Served:
        if req.method != "POST":
            return self._refuse_registration(client, identity, 405, "use POST")
        now = self.clock()
        try:
            entry = parse_registration(req.body, identity, client["ip"])
        except RegistrationError as exc:
            return self._refuse_registration(client, identity, 403, str(exc))
        old = self.relays.get(entry.id)
        if old is None and len(self.relays) >= MAX_RELAYS:
            return self._refuse_registration(client, identity, 503,
                                             f"the directory lists {MAX_RELAYS} relays already")
        entry.ping_ms = rtt_ms
        entry.registered = old.registered if old else now
        entry.heartbeats = (old.heartbeats if old else 0) + 1
        entry.last_heartbeat = now
        self.relays[entry.id] = entry
        self.stats.heartbeats += 1
        self._changed()
        record = None
        if old is None:
            self.stats.registrations["new"] += 1
            log.info("relay %s registered from %s (%s)", entry.id, client["ip"], entry.address)
            record = {"action": "relay-register", "relay": {"id": entry.id,
                                                            "address": entry.address,
                                                            "ports": entry.ports},
                      "client": client, "status": 200}
        body = json.dumps({"ok": True, "id": entry.id, "window_s": self.window_s}).encode()
        return Served(response(200, body + b"\n"), record)

    def _refuse_registration(self, client: dict[str, Any], identity: str | None, status: int,
                             reason: str) -> Served:
        self.stats.registrations["refused"] += 1
        log.warning("%s:%d (%s): registration refused: %s", client["ip"], client["port"],
                    identity or "no relay certificate", reason)
        record = {"action": "relay-refused", "client": client, "certificate_id": identity,
                  "status": status, "reason": reason}
        return Served(response(status, _error_body(reason)), record)

    def _list(self, req: Request | HttpError, client: dict[str, Any]) -> Served:
        record: dict[str, Any] = {"action": "list-download", "client": client,
                                  "user_agent": None, "request": None, "format": None,
                                  "served": None}
        if isinstance(req, HttpError):
            status, reason, body = req.status, req.reason, _error_body(req.message)
        else:
            record["user_agent"] = clean(req.headers.get("user-agent"))
            record["request"] = {"method": req.method, "path": clean(req.path or req.target)}
            fmt = {CSV_PATH: "csv", JSON_PATH: "json"}.get(req.path or "")
            record["format"] = fmt
            if fmt is None:
                status, reason = 404, "not-found"
                body = _error_body(f"try {CSV_PATH} or {JSON_PATH}")
            elif req.method not in ("GET", "HEAD"):
                status, reason, body = 405, "method", _error_body("use GET")
            else:
                entries, body = self._body(fmt, client["ip"])
                status, reason = 200, None
                record["served"] = {"count": len(entries), "relays": [e.id for e in entries],
                                    "bytes": len(body)}
                content_type = "text/plain; charset=utf-8" if fmt == "csv" \
                    else "application/json"
                self.stats.downloads[(fmt, "200")] += 1
                record.update(status=200, reason=None)
                return Served(response(200, body, content_type, req.method == "HEAD"), record)
        self.stats.downloads[(record["format"] or "none", str(status))] += 1
        record.update(status=status, reason=reason)
        return Served(response(status, body), record)

    def _changed(self) -> None:
        self.dirty = True
        self.version += 1

    def _body(self, fmt: str, requester_ip: str) -> tuple[list[RelayEntry], bytes]:
        def render(entries: list[RelayEntry]) -> bytes:
            return render_csv(entries) if fmt == "csv" else render_json(entries, self.clock())

        if self.partial_n and len(self.relays) > self.partial_n:
            entries = self.listed(requester_ip)
            return entries, render(entries)
        cached = self._rendered.get(fmt)
        if cached is None or cached[0] != self.version:
            entries = self.listed(requester_ip)
            cached = self._rendered[fmt] = (self.version, entries, render(entries))
        return cached[1], cached[2]

    def listed(self, requester_ip: str) -> list[RelayEntry]:
        entries = list(self.relays.values())
        if self.partial_n and len(entries) > self.partial_n:
            day = datetime.fromtimestamp(self.clock(), UTC).date().isoformat()
            return partial(entries, requester_ip, day, self.secret, self.partial_n)
        return ordered(entries)

    def expire(self) -> list[dict[str, Any]]:
        """Drop relays past the window; their ``relay-expire`` records."""
        now = self.clock()
        gone = [e for e in self.relays.values() if now - e.last_heartbeat > self.window_s]
        records = []
        for e in gone:
            del self.relays[e.id]
            self.stats.expired += 1
            self._changed()
            log.info("relay %s dropped out: no heartbeat for %.0fs", e.id,
                     now - e.last_heartbeat)
            records.append({"action": "relay-expire", "relay": {"id": e.id,
                                                                "address": e.address},
                            "last_heartbeat": rfc3339_ms(e.last_heartbeat),
                            "window_s": self.window_s})
        return records

    def snapshot(self) -> bytes:
        now = self.clock()
        rows = [{**e.public(), "age_s": round(now - e.last_heartbeat, 3)}
                for e in ordered(list(self.relays.values()))]
        for row in rows:
            del row["ovpn"]
        return (json.dumps({"time": rfc3339_ms(now), "window_s": self.window_s,
                            "relays": rows}) + "\n").encode()

    def metrics(self) -> list[Metric]:
        st = self.stats
        downloads = Metric("relay_directory_list_downloads_total", "counter",
                           "List requests answered, by format and HTTP status.")
        for (fmt, status), n in sorted(st.downloads.items()):
            downloads.add(n, format=fmt, status=status)
        registrations = Metric("relay_directory_registrations_total", "counter",
                               "Registrations: new (a relay appeared) or refused.")
        for result in ("new", "refused"):
            registrations.add(st.registrations[result], result=result)
        closed = Metric("relay_directory_peer_closed_total", "counter",
                        "Connections closed without an answer, by reason.")
        for reason, n in sorted(st.closed.items()):
            closed.add(n, reason=reason)
        return [
            Metric("relay_directory_relays", "gauge", "Relays in the list.")
            .add(len(self.relays)),
            registrations,
            Metric("relay_directory_heartbeats_total", "counter", "Heartbeats accepted.")
            .add(st.heartbeats),
            Metric("relay_directory_expired_total", "counter",
                   "Relays dropped for missing heartbeats.").add(st.expired),
            downloads, closed,
        ]


def _partial_secret(data_dir: Path) -> bytes:
    path = data_dir / PARTIAL_KEY_FILE
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        secret = secrets.token_bytes(32)
        write_atomic(path, secret, mode=PRIVATE_FILE)
    if len(secret) < 16:
        raise RelayError(f"{path}: too short to be a key; remove it to have a new one made")
    return secret


# --- The network side -------------------------------------------------------------------


def tcp_rtt_ms(sock: socket.socket) -> int | None:
    """The kernel's smoothed round-trip time of a connection (TCP_INFO), in ms."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < TCP_INFO_RTT_OFFSET + 4:
        return None
    (rtt_us,) = struct.unpack_from("I", info, TCP_INFO_RTT_OFFSET)
    return round(rtt_us / 1000)


class Connection(asyncio.Protocol):
    """One client after its TLS handshake: one request, one answer, one record."""

    def __init__(self, server: DirectoryServer, ip: str, port: int, rtt_ms: int | None,
                 accepted: float) -> None:
        self.server = server
        self.ip, self.port = ip, port
        self.rtt_ms = rtt_ms
        self.accepted = accepted
        self.parser = RequestParser()
        self.transport: asyncio.Transport | None = None
        self.identity: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.identity = peer_identity(transport.get_extra_info("peercert"))
        remaining = REQUEST_TIMEOUT_S - (time.monotonic() - self.accepted)
        self.timer = asyncio.get_running_loop().call_later(max(0.0, remaining), self._timeout)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        result = self.parser.feed(data)
        if result is not None:
            self._answer(result)

    def _answer(self, result: Request | HttpError) -> None:
        assert self.transport is not None
        self.answered = True
        served = self.server.directory.handle(result, self.ip, self.port, self.identity,
                                              self.rtt_ms)
        if served.record is not None:
            self.server.audit(served.record)
        self.transport.write(served.payload)
        self.transport.close()

    def _timeout(self) -> None:
        if self.answered or self.transport is None:
            return
        if self.parser.pending:
            # Part of a request came: it is recorded, as every request is.
            self._answer(HttpError(408, "timeout",
                                   f"no complete request within {REQUEST_TIMEOUT_S:.0f}s"))
        else:
            self.server.directory.stats.closed["timeout"] += 1
            self.transport.abort()

    def eof_received(self) -> bool:
        if not self.answered and self.parser.pending:
            self._answer(HttpError(400, "incomplete", "connection closed mid-request"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.server.closed(self.ip, self.accepted)


class DirectoryServer:
    def __init__(self, directory: Directory, admission: Admission,
                 audit: Callable[[dict[str, Any]], None], ctx: ssl.SSLContext) -> None:
        self.directory = directory
        self.admission = admission
        # A record in the access log (the directory's connection log, shipped
        # like a relay's).
        self.audit = audit
        self.ctx = ctx
        self.open = 0
        self.pending: set[asyncio.Task[None]] = set()

    def closed(self, ip: str, accepted: float) -> None:
        self.open -= 1
        self.admission.connection_closed(ip, time.monotonic() - accepted, False)

    async def accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:
                log.error("accept failed: %s", exc.strerror)
                await asyncio.sleep(ACCEPT_ERROR_PAUSE_S)
                continue
            ip, port = peer[0], peer[1]
            if self.open >= MAX_CONNECTIONS:
                self.admission.refuse(ip, "connections-total")
                _reset(sock)
                continue
            refused = self.admission.admit(ip)
            if refused is not None:
                _reset(sock)  # before any TLS work; summarised in `refusals`
                continue
            self.open += 1
            task = asyncio.ensure_future(self._start(sock, ip, port))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def _start(self, sock: socket.socket, ip: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        accepted = time.monotonic()
        rtt = tcp_rtt_ms(sock)
        try:
            await loop.connect_accepted_socket(
                lambda: Connection(self, ip, port, rtt, accepted), sock, ssl=self.ctx,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except (OSError, TimeoutError, ConnectionError) as exc:
            reason = "tls-timeout" if isinstance(exc, TimeoutError) else "tls-failed"
            self.directory.stats.closed[reason] += 1
            log.debug("%s:%d: TLS handshake failed: %s", ip, port, exc)
            sock.close()
            self.closed(ip, accepted)


def _reset(sock: socket.socket) -> None:
    # SO_LINGER on with a zero timeout: close() sends RST and frees the socket.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def server_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2+; a client certificate from ``ca`` is asked for (a relay's) but only
    a registration needs one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key or None)
        ctx.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as exc:
        raise RelayError(f"directory certificate, key or CA: cannot load: {exc}") from None
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


async def run_directory(cfg: Config, listen: str, ca: str, cert: str, key: str,
                        make_admission: Callable[[Callable[[dict[str, Any]], None]], Admission],
                        *, window_s: float = DEFAULT_WINDOW_S,
                        partial_n: int = 0, stop_event: asyncio.Event | None = None) -> None:
    """Serve until ``stop_event`` is set. ``cfg`` carries what the directory shares
    with a relay: [server] id (in its records), [logs] (data directory, access-log
    retention), [forward] (shipping), [metrics] listen, [abuse] summary_interval.
    ``make_admission`` builds the abuse defences around the audit function."""
    try:
        host, port = parse_hostport(listen)
    except ValueError as exc:
        raise RelayError(f"directory: --listen: {exc}") from None
    ctx = server_context(ca, cert, key)
    data_dir = cfg.data_dir
    daylog.ensure_dir(data_dir)
    directory = Directory(data_dir, cfg.server.id, window_s=window_s, partial_n=partial_n)
    connlog = daylog.ConnectionLog(data_dir)

    def audit(record: dict[str, Any]) -> None:
        connlog.append({**record, "server": directory.server})

    admission = make_admission(audit)
    server = DirectoryServer(directory, admission, audit, ctx)
    shipping = Shipping(cfg, audit)
    shipping.start()
    metrics = MetricsServer([directory.metrics, shipping.metrics, lambda: _abuse_metrics(
        admission)])
    if cfg.metrics.listen:
        try:
            await metrics.start(*parse_hostport(cfg.metrics.listen))
        except OSError as exc:
            raise RelayError(f"directory: --metrics-listen: {exc.strerror}") from None
    listener = listen_tcp(host, port)
    log.info("listening on %s (HTTPS: %s, %s, %s), data in %s, window %.0fs%s", listen,
             CSV_PATH, JSON_PATH, REGISTER_PATH, data_dir, window_s,
             f", {partial_n} relays per requester" if partial_n else "")
    accepting = asyncio.ensure_future(server.accept_loop(listener))
    stop = stop_event or asyncio.Event()
    summary_every = cfg.abuse.seconds("summary_interval")
    next_summary = time.monotonic() + summary_every
    try:
        while not stop.is_set():
            for record in directory.expire():
                server.audit(record)
            if time.monotonic() >= next_summary:
                next_summary += summary_every
                admission.expire()
                summary = admission.summarise()
                if summary is not None:
                    server.audit(summary)
            if directory.dirty:
                directory.dirty = False
                await asyncio.to_thread(write_atomic, data_dir / SNAPSHOT_FILE,
                                        directory.snapshot())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), EXPIRE_INTERVAL_S)
    finally:
        accepting.cancel()
        listener.close()
        metrics.close()
        await shipping.close()
        connlog.close()
        (data_dir / SNAPSHOT_FILE).unlink(missing_ok=True)
        log.info("directory stopped")


def _abuse_metrics(admission: Admission) -> list[Metric]:
    refusals = Metric("relay_directory_refusals_total", "counter",
                      "Connections reset before TLS by the abuse defences, by reason.")
    for reason, n in sorted(admission.refused_total.items()):
        refusals.add(n, reason=reason)
    return [refusals]


def read_snapshot(data_dir: Path) -> dict[str, Any]:
    """What ``relay directory list`` shows: the running directory's snapshot."""
    path = Path(data_dir) / SNAPSHOT_FILE
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RelayError(f"{path}: no directory runs on this data directory") from None
    except ValueError:
        raise RelayError(f"{path}: not a snapshot (not JSON)") from None
    if not isinstance(data, dict) or not isinstance(data.get("relays"), list):
        raise RelayError(f"{path}: not a snapshot")
    return data
