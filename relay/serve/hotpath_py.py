"""Pure-Python twin of the C hot path (cext/hotpath.c).

Same signature and byte-identical results as :func:`relay.serve.hotpath.inspect`, whose
docstring states the rules. It is the reference for the differential tests and the
baseline of bench/hotpath.py; the datapath uses the C version. Keep the two in
step: every rule and limit here has its counterpart, with the same name, in C.
"""

from __future__ import annotations

import re
import socket
from array import array
from dataclasses import dataclass

# TAG_LEN is RELAY_HP_TAG_LEN in C; relay.cext checks that the two agree.
from relay.sessionid import TAG_LEN, is_tag

# A session's remembered destinations (see inspect_batch's ``seen``): room for the
# 256 a disconnect record lists (relay.serve.sessions.MAX_DESTINATIONS) at the C
# table's 3/4 load bound, 512 * 3 / 4 = 384.
SEEN_SLOTS = 512
SEEN_LOAD = SEEN_SLOTS * 3 // 4
HOST_MAX = 255  # a DNS name is at most 255 octets (RFC 1035 2.3.4)
IPV4_MIN_HDR = 20
IPV6_HDR = 40
TCP_MIN_HDR = 20
IPPROTO_TCP = 6
IP6_HOPOPTS, IP6_ROUTING, IP6_FRAGMENT, IP6_DSTOPTS = 0, 43, 44, 60
IP6_FRAG_HDR = 8
MAX_IPV6_EXT = 8  # longer extension-header chains are not inspected
METHOD_MAX = 20  # registered methods have at most 17 characters
CL_DIGITS_MAX = 9  # more digits cannot describe a body within a 64 KiB segment
PORT_DIGITS_MAX = 5
TLS_RECORD_HDR = 5
TLS_HANDSHAKE = 22
TLS_CLIENT_HELLO = 1
TLS_HS_HDR = 4
TLS_HELLO_FIXED = 34  # ClientHello version + random
TLS_EXT_SERVER_NAME = 0
TLS_SNI_HOST_NAME = 0
UA_COLON = b"user-agent:"

_REQUEST_LINE = re.compile(rb"[A-Z_-]{1,%d} [\x21-\x7e]+ HTTP/1\.[0-9]\r\n" % METHOD_MAX)
_METHOD_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")
_NAME = re.compile(rb"[a-z0-9._-]+")
_IP6_LITERAL = re.compile(rb"\[[0-9a-f:.]+\]")
_PORT = re.compile(rb"(:[0-9]{0,%d})?" % PORT_DIGITS_MAX)
_OWS = b" \t"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where an HTTP request or a TLS ClientHello went."""

    host: str  # lower-case Host name (without port) or SNI; "" when absent or invalid
    ip: str
    port: int
    scheme: str  # "http" or "https"


@dataclass(frozen=True, slots=True)
class Inspection:
    """What the hot path did to one packet."""

    inspected: bool  # a well-formed TCP segment (otherwise left untouched)
    stamped: int = 0  # User-Agent values overwritten with the tag
    ua_missed: int = 0  # requests whose User-Agent may lie past the segment end
    destination: Destination | None = None

    @property
    def is_http(self) -> bool:
        return self.destination is not None and self.destination.scheme == "http"


@dataclass(frozen=True, slots=True)
class BatchInspection:
    """What the hot path did to a batch of packets."""

    skipped: int  # packets not inspected
    stamped: int
    ua_missed: int
    destinations: list[Destination]  # one per HTTP request / ClientHello packet, in order


SKIPPED = Inspection(False)  # not a well-formed TCP segment
PLAIN = Inspection(True)  # TCP, but neither an HTTP request nor a ClientHello


def check_tag(tag: bytes) -> None:
    if not is_tag(tag):
        raise ValueError(f"session tag must be {TAG_LEN} URL-safe base64 characters: {tag!r}")


def _name(value: bytes) -> str:
    """The lower-cased DNS name, or "" if value is not a plausible one."""
    value = value.lower()
    if 0 < len(value) <= HOST_MAX and _NAME.fullmatch(value):
        return value.decode()
    return ""


def _http_host(value: bytes) -> str:
    """Host header value (trimmed): a name or [IPv6 literal], then optional ":port"."""
    if value[:1] == b"[":
        end = value.find(b"]") + 1
        if end == 0:
            return ""
        host = value[:end].lower()
        if not (len(host) <= HOST_MAX and _IP6_LITERAL.fullmatch(host)):
            return ""
    else:
        colon = value.find(b":")
        end = len(value) if colon < 0 else colon
        host = value[:end]
    if not _PORT.fullmatch(value, end):
        return ""
    return host.decode() if value[:1] == b"[" else _name(host)


class _Walk:
    """State of one packet's pass: the packet, the TCP offset and the counters."""

    __slots__ = ("end", "host", "p", "stamped", "tag", "tcp", "ua_missed")

    def __init__(self, p: bytearray, tcp: int, end: int, tag: bytes) -> None:
        self.p, self.tcp, self.end, self.tag = p, tcp, end, tag
        self.stamped = self.ua_missed = 0
        self.host = ""

    def _sum(self, a: int, b: int) -> int:
        s = 0
        for i in range(a, b):
            s += self.p[i] if (i - self.tcp) & 1 else self.p[i] << 8
        return _fold(s)

    def overwrite(self, at: int, n: int) -> None:
        """Write the tag's first n bytes at p[at:at+n]; patch the TCP checksum per
        RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m')."""
        ck = self.tcp + 16
        old = self._sum(at, at + n)
        self.p[at : at + n] = self.tag[:n]
        acc = (~int.from_bytes(self.p[ck : ck + 2]) & 0xFFFF) + (~old & 0xFFFF)
        acc += self._sum(at, at + n)
        self.p[ck : ck + 2] = (~_fold(acc) & 0xFFFF).to_bytes(2)

    def http(self, pos: int, rl: int) -> None:
        p, end = self.p, self.end
        first = True
        while True:
            pos += rl
            host_seen = ua_seen = body_unknown = False
            body = 0
            while True:  # header lines up to the empty line
                le = p.find(b"\r\n", pos, end)
                if le < 0:  # the split rule
                    cut = bytes(p[pos:end]).lower()
                    if (cut == b"" and not ua_seen) or (cut and UA_COLON.startswith(cut[:11])):
                        self.ua_missed += 1
                    return
                if le == pos:
                    pos += 2
                    break
                colon = p.find(b":", pos, le)
                if colon >= 0:
                    name = bytes(p[pos:colon]).lower()
                    vs, ve = colon + 1, le
                    while vs < ve and p[vs] in _OWS:
                        vs += 1
                    while ve > vs and p[ve - 1] in _OWS:
                        ve -= 1
                    if name == b"user-agent":
                        ua_seen = True
                        if ve > vs:
                            n = min(ve - vs, TAG_LEN)
                            self.overwrite(ve - n if n == TAG_LEN else vs, n)
                            self.stamped += 1
                    elif name == b"host":
                        if first and not host_seen:
                            self.host = _http_host(bytes(p[vs:ve]))
                        host_seen = True
                    elif name == b"content-length":
                        value = bytes(p[vs:ve])
                        if 0 < len(value) <= CL_DIGITS_MAX and value.isdigit():
                            body = int(value)
                        else:
                            body_unknown = True
                    elif name == b"transfer-encoding":
                        body_unknown = True
                pos = le + 2
            # Another request follows only if this body is delimited and complete.
            if body_unknown or body > end - pos:
                return
            pos += body
            m = _REQUEST_LINE.match(p, pos, end)
            if not m:
                return
            rl = m.end() - pos
            first = False

    def client_hello(self, pos: int) -> None:
        """SNI of the ClientHello at p[pos:end]; lengths are clipped to the segment."""
        p = self.p
        rec_end = min(pos + TLS_RECORD_HDR + int.from_bytes(p[pos + 3 : pos + 5]), self.end)
        hs = pos + TLS_RECORD_HDR
        if hs + TLS_HS_HDR > rec_end:
            return
        hs_end = min(hs + TLS_HS_HDR + int.from_bytes(p[hs + 1 : hs + 4]), rec_end)
        i = hs + TLS_HS_HDR + TLS_HELLO_FIXED
        if i + 1 > hs_end:
            return
        i += 1 + p[i]  # session id
        if i + 2 > hs_end:
            return
        i += 2 + int.from_bytes(p[i : i + 2])  # cipher suites
        if i + 1 > hs_end:
            return
        i += 1 + p[i]  # compression methods
        if i + 2 > hs_end:
            return
        ext_end = min(i + 2 + int.from_bytes(p[i : i + 2]), hs_end)
        i += 2
        while i + 4 <= ext_end:
            ext_type = int.from_bytes(p[i : i + 2])
            n = int.from_bytes(p[i + 2 : i + 4])
            i += 4
            if n > ext_end - i:
                return
            if ext_type != TLS_EXT_SERVER_NAME:
                i += n
                continue
            if n < 2:
                return
            list_end = min(i + 2 + int.from_bytes(p[i : i + 2]), i + n)
            j = i + 2
            while j + 3 <= list_end:
                name = int.from_bytes(p[j + 1 : j + 3])
                if name > list_end - j - 3:
                    return
                if p[j] == TLS_SNI_HOST_NAME:
                    self.host = _name(bytes(p[j + 3 : j + 3 + name]))
                    return
                j += 3 + name
            return


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _ipv6_tcp(p: bytearray, end: int) -> int:
    """Offset of the TCP header after the extension-header chain, or 0."""
    nxt, off = p[6], IPV6_HDR
    for k in range(MAX_IPV6_EXT + 1):
        if nxt == IPPROTO_TCP:
            return off
        if nxt in (IP6_HOPOPTS, IP6_ROUTING, IP6_DSTOPTS):
            if k == MAX_IPV6_EXT or off + 2 > end:
                return 0
            nxt, off = p[off], off + (p[off + 1] + 1) * 8
        elif nxt == IP6_FRAGMENT:  # only the first fragment holds the TCP header
            if k == MAX_IPV6_EXT or off + IP6_FRAG_HDR > end:
                return 0
            if (p[off + 2] << 8 | p[off + 3]) & 0xFFF8:  # fragment offset
                return 0
            nxt, off = p[off], off + IP6_FRAG_HDR
        else:
            return 0
    return 0


def inspect(packet: bytearray, tag: bytes) -> Inspection:
    """See relay.serve.hotpath.inspect."""
    check_tag(tag)
    p, n = packet, len(packet)
    if n >= IPV4_MIN_HDR and p[0] >> 4 == 4:
        tcp = (p[0] & 0x0F) * 4
        end = p[2] << 8 | p[3]
        if tcp < IPV4_MIN_HDR or not tcp <= end <= n or p[9] != IPPROTO_TCP:
            return SKIPPED
        if p[6] & 0x1F or p[7]:  # fragment offset: no TCP header here
            return SKIPPED
        family = socket.AF_INET
    elif n >= IPV6_HDR and p[0] >> 4 == 6:
        end = IPV6_HDR + (p[4] << 8 | p[5])
        if end > n:
            return SKIPPED
        tcp = _ipv6_tcp(p, end)
        if not tcp:
            return SKIPPED
        family = socket.AF_INET6
    else:
        return SKIPPED
    if tcp + TCP_MIN_HDR > end:
        return SKIPPED
    pay = tcp + (p[tcp + 12] >> 4) * 4
    if pay < tcp + TCP_MIN_HDR or pay > end:
        return SKIPPED

    walk = _Walk(packet, tcp, end, tag)
    m = _REQUEST_LINE.match(p, pay, end) if pay < end and p[pay] in _METHOD_START else None
    if m:
        scheme = "http"
        walk.http(pay, m.end() - pay)
    elif (
        end - pay > TLS_RECORD_HDR
        and p[pay] == TLS_HANDSHAKE
        and p[pay + 1] == 3
        and (p[pay + TLS_RECORD_HDR] == TLS_CLIENT_HELLO)
    ):
        scheme = "https"
        walk.client_hello(pay)
    else:
        return PLAIN
    port = p[tcp + 2] << 8 | p[tcp + 3]
    ip = bytes(p[16:20]) if family == socket.AF_INET else bytes(p[24:40])
    dest = Destination(walk.host, socket.inet_ntop(family, ip), port, scheme)
    return Inspection(True, walk.stamped, walk.ua_missed, dest)


def new_seen() -> set[Destination]:
    """A session's record of the destinations inspect_batch has reported."""
    return set()


def inspect_batch(buf: bytearray, spans: array[int], tag: bytes,
                  seen: set[Destination] | None = None) -> BatchInspection:
    """See relay.serve.hotpath.inspect_batch."""
    check_tag(tag)
    skipped = stamped = ua_missed = 0
    destinations = []
    for i in range(0, len(spans) // 2 * 2, 2):
        off, n = spans[i], spans[i + 1]
        if off + n > len(buf):
            skipped += 1
            continue
        packet = buf[off : off + n]
        result = inspect(packet, tag)
        if not result.inspected:
            skipped += 1
        elif result.destination is not None:
            if result.stamped:
                buf[off : off + n] = packet
            stamped += result.stamped
            ua_missed += result.ua_missed
            if seen is not None:
                if result.destination in seen:
                    continue
                if len(seen) < SEEN_LOAD:
                    seen.add(result.destination)
            destinations.append(result.destination)
    return BatchInspection(skipped, stamped, ua_missed, destinations)
