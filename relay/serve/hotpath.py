"""The hot path of every client->internet packet (C, cext/hotpath.c): User-Agent
session stamp and destination extraction, in one bounded pass.

:func:`inspect` takes one IP packet (IPv4 or IPv6, no Ethernet header) as a writable
buffer and the session's tag (relay.sessionid), may modify the packet in place, and
returns an :class:`Inspection`. relay.serve.hotpath_py is its pure-Python twin, with the
same results, byte for byte.

Rules
-----
Which packets. Only TCP is inspected. IPv4: IHL >= 5, total length within the
buffer (bytes past it are ignored), not a fragment with a non-zero offset. IPv6: the
payload length within the buffer; the extension-header chain is walked through
hop-by-hop, routing, destination options and fragment headers (first fragment only),
at most 8 of them; any other header means not inspected. TCP: data offset >= 5 and
the header within the packet. Anything else, malformed or not TCP, is left untouched
and reported as ``inspected=False``.

HTTP. A payload that starts with a request line ``METHOD SP target SP HTTP/1.x
CRLF`` (METHOD: 1 to 20 of ``A-Z _ -``; target: visible ASCII) is an HTTP request,
on any port. Lines end with CRLF. In each header line whose name is ``User-Agent``
(any case, no space before the colon), the value, trimmed of spaces and tabs, has
its last 8 characters overwritten with the tag; a shorter value is replaced by as
many leading characters of the tag as fit; an empty value is left alone. The length
never changes, so neither do seq/ack; the TCP checksum is patched incrementally
(RFC 1624), so a correct checksum stays correct and a wrong one stays exactly as
wrong. Pipelining: after a header block's empty line, the body is skipped by its
Content-Length (1 to 9 digits; absent means no body) and, if another request line
follows, that request is processed too. A Transfer-Encoding header, an unusable
Content-Length, or a body that does not end in this segment stops the walk, so
bodies are never touched.

Split rule (no per-flow state). A header line is processed only when its CRLF is in
this segment, even if the header block (the empty line) is not. When the segment
ends inside a header block, the request counts one ``ua_missed`` if the cut line may
be a User-Agent header: its bytes are a case-insensitive prefix of, or start with,
``user-agent:``; or it is empty (the cut fell just after a CRLF) and no User-Agent
line of that request was seen. That metric is thus an upper bound of the requests
whose User-Agent crosses the relay unstamped. A continuation segment does not start
with a request line and is never stamped; a request line cut by the segment end is
not recognised at all.

Destinations. For an HTTP request: scheme ``http``, the first request's first
``Host`` value without its ``:port``, lower-cased, if it is a DNS-like name (1 to
255 of ``a-z 0-9 . - _``) or a bracketed IPv6 literal, else ``""``. For a TLS
ClientHello (record type 22, version 3.x, handshake type 1): scheme ``https``, the
first host_name of the server_name extension under the same name check, or ``""``.
Every TLS length is checked and clipped to the segment, so a ClientHello spanning
segments still yields its SNI when the extension is in the first one. IP and port
are the packet's destination.

Tags must be ``relay.sessionid.TAG_LEN`` URL-safe base64 characters (``is_tag``;
ValueError otherwise), so that a stamp can never inject bytes that change the
meaning of a header.

Thread safety: the C side keeps its result in a per-thread buffer.
"""

from __future__ import annotations

import socket
import struct
from array import array
from functools import partial
from typing import Any

from relay.cext import ffi, lib
from relay.serve.hotpath_py import (
    PLAIN,
    SEEN_LOAD,
    SEEN_SLOTS,
    SKIPPED,
    BatchInspection,
    Destination,
    Inspection,
    check_tag,
)

__all__ = [
    "PLAIN",
    "SEEN_LOAD",
    "SKIPPED",
    "BatchInspection",
    "Destination",
    "Inspection",
    "inspect",
    "inspect_batch",
    "new_seen",
]

_SCHEMES = {lib.RELAY_HP_SCHEME_HTTP: "http", lib.RELAY_HP_SCHEME_HTTPS: "https"}
_FAMILIES = {4: (socket.AF_INET, 4), 6: (socket.AF_INET6, 16)}
_PLAIN_RC = lib.RELAY_HP_PLAIN
_SKIPPED_RC = lib.RELAY_HP_SKIPPED
_BADTAG_RC = lib.RELAY_HP_BADTAG
_FIXED = lib.RELAY_HP_RESULT_FIXED
_c_inspect = lib.relay_hp_inspect
_c_scan = lib.relay_hp_scan
_c_scan_new = lib.relay_hp_scan_new
_thread_result = lib.relay_hp_thread_result
_from_buffer = ffi.from_buffer
_buffer = ffi.buffer
_U8 = ffi.typeof("uint8_t[]")
_U32 = ffi.typeof("uint32_t[]")
_new_totals = partial(ffi.new, "struct relay_hp_totals *")
_NULL = ffi.NULL  # the C side then uses its per-thread result buffer
# The C result's meaningful bytes (counts, port, scheme, family, ip, host) key a
# cache of the immutable Inspection objects: a session makes the same few
# requests over and over, and building objects costs more than the C pass.
_FIXED_LAYOUT = struct.Struct("=IIHHBB16s")
_CACHE_MAX = 4096  # bounded: cleared when full, so hostile traffic cannot grow it
_cache: dict[bytes, Inspection] = {}


def _found(length: int) -> Inspection:
    """The Inspection in the thread's C result, whose first ``length`` bytes matter."""
    key = _buffer(_thread_result(), length)[:]
    res = _cache.get(key)
    if res is None:
        stamped, missed, port, _, scheme, fam, ip = _FIXED_LAYOUT.unpack_from(key)
        family, size = _FAMILIES[fam]
        dest = Destination(
            key[_FIXED:].decode(), socket.inet_ntop(family, ip[:size]), port, _SCHEMES[scheme]
        )
        res = Inspection(True, stamped, missed, dest)
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[key] = res
    return res


def inspect(packet: bytearray, tag: bytes) -> Inspection:
    """Stamp and inspect one client->internet IP packet in place (see the module
    docstring). ``packet`` must be writable (bytearray, memoryview of one, ...).
    Returns the shared constants SKIPPED or PLAIN on the fast path."""
    buf = _from_buffer(_U8, packet, True)
    rc = _c_inspect(buf, len(buf), tag, len(tag), _NULL)
    if rc == _PLAIN_RC:
        return PLAIN
    if rc == _SKIPPED_RC:
        return SKIPPED
    if rc == _BADTAG_RC:
        check_tag(tag)  # raises with the message
    return _found(rc)


def new_seen() -> Any:
    """A session's record of the destinations :func:`inspect_batch` has reported
    (a zeroed hash table the C side owns the layout of)."""
    return ffi.new("uint64_t[]", SEEN_SLOTS + 1)


def inspect_batch(buf: bytearray, spans: array[int], tag: bytes,
                  seen: Any = None) -> BatchInspection:
    """:func:`inspect` every packet ``buf[spans[2i] : spans[2i] + spans[2i+1]]`` in
    place (``spans`` is an ``array("I")`` of offset, length pairs), with one call
    into C per HTTP request or ClientHello instead of one per packet. A span
    outside ``buf`` counts as skipped. With ``seen`` (from :func:`new_seen`, one
    per session), a destination already reported is not reported again (and costs
    no call back into Python), up to ``SEEN_LOAD`` remembered destinations."""
    n = len(spans) // 2
    cbuf = _from_buffer(_U8, buf, True)
    cspans = _from_buffer(_U32, spans)
    size = len(cbuf)
    ntag = len(tag)
    totals = _new_totals()
    destinations = []
    if seen is None:
        i = _c_scan(cbuf, size, cspans, n, 0, tag, ntag, totals)
        while 0 <= i < n:
            destinations.append(_found(totals.found_len).destination)
            i = _c_scan(cbuf, size, cspans, n, i + 1, tag, ntag, totals)
    else:
        i = _c_scan_new(cbuf, size, cspans, n, 0, tag, ntag, totals, seen, SEEN_SLOTS)
        while 0 <= i < n:
            destinations.append(_found(totals.found_len).destination)
            i = _c_scan_new(cbuf, size, cspans, n, i + 1, tag, ntag, totals, seen, SEEN_SLOTS)
    if i == _BADTAG_RC:
        check_tag(tag)  # raises with the message
    return BatchInspection(totals.skipped, totals.stamped, totals.ua_missed, destinations)
