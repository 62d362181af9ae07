"""Connection-log records as RFC 5424 syslog messages, RFC 5425 framing (sans-IO).

No sockets and no event loop here: :func:`format_record` turns one record into
message bytes, :func:`frame` adds the RFC 5425 octet count, :class:`FrameParser`
takes bytes from a stream and returns whole messages, :func:`parse_message`
splits a message back into its fields and :func:`relay_record` recovers the
record. The forwarder, the collector and the tests all use these.

A record travels twice in one message:

- as STRUCTURED-DATA ``[relay@32473 id="..." action="..." client.ip="..." ...]``,
  nested objects flattened with ``.``, so that a plain syslog server (rsyslog,
  a SIEM) can filter and index the fields without knowing JSON;
- as MSG: a UTF-8 BOM and the record's JSON, the exact copy that the collector
  stores. The SD values are a display copy (long values cut, control
  characters shown as ``\\xNN``); the JSON is authoritative.

The record ``id`` is always a parameter so that any receiver can remove the
duplicates that at-least-once delivery produces.

Client-supplied strings (client software, host names) are hostile: SD values
are escaped per RFC 5424 section 6.3.3 (``\\``, ``"``, ``]``), control
characters never appear raw anywhere in a message (SD values show them as
``\\xNN`` or ``\\uNNNN``, the JSON as ``\\uNNNN``), so a receiver that stores one
message per line cannot be fed a forged line; and the JSON is valid UTF-8 even
when a string carries undecodable bytes.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Private Enterprise Number in the SD-ID. 32473 is the PEN that RFC 5612
# reserves for use in documentation: a PLACEHOLDER until the project registers
# its own number with IANA (RFC 5424 section 7.2.2 requires name@<PEN>).
PEN = 32473
SD_ID = f"relay@{PEN}"
APP_NAME = "relay"
VERSION = 1

# RFC 5424 section 6.2.1, table 1.
FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13,
    "alert": 14, "clock": 15, "local0": 16, "local1": 17, "local2": 18, "local3": 19,
    "local4": 20, "local5": 21, "local6": 22, "local7": 23,
}
DEFAULT_FACILITY = "local0"
# RFC 5424 section 6.2.1, table 2: sessions coming and going are routine
# (informational); every other action is an audit event (logging switched off,
# a ban, retention deleting a day) that an operator should notice.
SEVERITY_INFO = 6
SEVERITY_NOTICE = 5
ROUTINE_ACTIONS = frozenset({"connect", "disconnect"})

BOM = b"\xef\xbb\xbf"
NILVALUE = "-"

# Largest message a receiver must accept is 2048 octets (RFC 5425 section
# 4.3.1: "MUST be able to process messages up to 2048 octets", SHOULD accept
# 8192); rsyslog's default maxMessageSize is 8k and it truncates beyond that.
# The relay shrinks what it sends towards 8 KiB so that a stock rsyslog stores it
# whole, and never sends more than the 64 KiB frame limit of relay collector,
# which is what a record with its destinations needs (RECORD_JSON_MAX).
MAX_MESSAGE_SIZE = 8192
COLLECTOR_MAX_MESSAGE_SIZE = 65536
# RFC 5424 section 6: HOSTNAME 1..255, APP-NAME 1..48, PROCID 1..128, MSGID
# 1..32 and SD-NAME 1..32 characters of PRINTUSASCII.
HOSTNAME_MAX = 255
PROCID_MAX = 128
MSGID_MAX = 32
SD_NAME_MAX = 32
# SD values are a display copy (the JSON in MSG is whole): cutting them keeps a
# record with hostile 1000-character client strings under MAX_MESSAGE_SIZE.
SD_VALUE_MAX = 256
# The whole STRUCTURED-DATA element is bounded too (a value of SD_VALUE_MAX
# characters escapes to up to 6 bytes each, and a record may have many): half of
# rsyslog's default 8 KiB message, leaving the other half for the JSON copy of an
# ordinary record. Parameters past the budget are left out (the JSON has them).
SD_MAX_BYTES = 4096
# The longest header format_record writes: PRI, VERSION and the six fields at their
# RFC 5424 maxima (TIMESTAMP as our pattern allows: 2026-11-25T21:05:32.123456+00:00).
TIMESTAMP_MAX = 32
HEADER_MAX_BYTES = (len("<191>1 ") + TIMESTAMP_MAX + 1 + HOSTNAME_MAX + 1 + len(APP_NAME) + 1
                    + PROCID_MAX + 1 + MSGID_MAX + 1)
# A record whose JSON is at most this long always travels whole within
# COLLECTOR_MAX_MESSAGE_SIZE: the frame limit minus the largest header, SD, the
# space before MSG and the BOM. Producers size what they put in a record by it
# (relay.serve.sessions: the destinations of a disconnect record).
RECORD_JSON_MAX = COLLECTOR_MAX_MESSAGE_SIZE - HEADER_MAX_BYTES - SD_MAX_BYTES - 1 - len(BOM)
# If a record is still too big, its JSON strings are cut to this many
# characters and the record gains "truncated": true (the relay's local log keeps
# the whole record).
JSON_STRING_SHRINK = 512
# A record that would not fit COLLECTOR_MAX_MESSAGE_SIZE even so (no record the
# relay writes is that big: this is the second line of defence) travels as a stub
# of the fields that identify it (and server.id, which the collector checks), each
# cut to SD_VALUE_MAX, with "truncated": true and the size left out.
STUB_FIELDS = ("id", "time", "action", "session_id")
# Nesting of a record's JSON: the relay's records nest three deep (a disconnect's
# destinations: record, list, object). Deeper input is refused before anything
# recurses over it (Python's json raises RecursionError near 1000 levels).
RECORD_DEPTH_MAX = 8
# RFC 5425 section 4.3: MSG-LEN is a decimal number; 10 digits exceed any size
# we accept, more is garbage rather than a length.
MSG_LEN_DIGITS_MAX = 10


class SyslogError(ValueError):
    """A message or a stream that does not follow RFC 5424 / RFC 5425."""


class FrameError(SyslogError):
    """The stream cannot be resynchronised: the connection must be closed."""


# ---------------------------------------------------------------------------
# Formatting

_NOT_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")
# SD-NAME = 1*32PRINTUSASCII except '=', SP, ']', '"' (RFC 5424 section 6.3).
_NOT_SD_NAME = re.compile(r'[^\x21-\x7e]|[= \]"]')
_SD_ESCAPE = re.compile(r'(["\\\]])')
# C0, DEL and C1 controls, and the Unicode line/paragraph separators: a raw one
# in a stored line could end it and forge the next.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# json.dumps already escapes C0; these remain raw in ensure_ascii=False output.
# An id that needs no SD escaping (what the connection log issues).
_PLAIN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029]")
# The same, and raw control characters, in UTF-8 bytes (a log line as written).
_LOGGED_UNSAFE = re.compile(rb"[\x00-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")
_TIMESTAMP = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$")


def facility_code(name: str) -> int:
    try:
        return FACILITIES[name]
    except KeyError:
        raise ValueError(f"unknown syslog facility {name!r} "
                         f"(known: {', '.join(FACILITIES)})") from None


def severity_of(action: str) -> int:
    return SEVERITY_INFO if action in ROUTINE_ACTIONS else SEVERITY_NOTICE


@functools.lru_cache(maxsize=1024)
def _header_field(value: str, limit: int) -> str:
    """A PRINTUSASCII token (RFC 5424 section 6.2), or NILVALUE when empty."""
    value = _NOT_PRINTUSASCII.sub("_", value)[:limit]
    return value or NILVALUE


def _valid_utf8(text: str) -> str:
    # A lone surrogate (bytes decoded with surrogateescape) cannot be encoded:
    # show it as \udcNN text instead of failing or sending invalid UTF-8.
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def sd_name(key: str) -> str:
    return _NOT_SD_NAME.sub("_", key)[:SD_NAME_MAX] or "_"


def sd_escape(value: str) -> str:
    """A PARAM-VALUE: valid UTF-8, no raw control character, RFC 5424 6.3.3 escapes."""
    value = _valid_utf8(value)
    if len(value) > SD_VALUE_MAX:
        value = value[:SD_VALUE_MAX] + "..."
    value = _SD_ESCAPE.sub(r"\\\1", value)
    # After the escapes so that the backslash of \xNN is not doubled: a reader
    # applying 6.3.3 sees \x as a literal backslash and 'x'.
    return _CONTROL.sub(_show_control, value)


def _show_control(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def flatten(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted name, text) for every non-null leaf; lists become JSON text."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, name + ".")
        elif value is not None:
            yield name, _scalar(value)


def dumps_json(record: dict[str, Any]) -> str:
    """Compact JSON on one line, with no raw control or line-separator character."""
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode()
    except UnicodeEncodeError:
        # Lone surrogates: let json escape them as \\udcNN (valid JSON, valid UTF-8).
        return json.dumps(record, separators=(",", ":"))
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def structured_data(record: dict[str, Any], fields: bool = True) -> str:
    """The SD element, at most SD_MAX_BYTES: ``id`` first, then (unless not
    ``fields``) the flattened fields in order while they fit."""
    rid = str(record.get("id", ""))
    out = f'[{SD_ID} id="{rid if _PLAIN_ID.fullmatch(rid) else sd_escape(rid)}"'
    if not fields:
        return out + "]"
    size = len(out.encode()) + 1  # the closing ']'
    for k, v in flatten(record):
        if k == "id":
            continue
        param = f' {sd_name(k)}="{sd_escape(v)}"'
        size += len(param.encode())
        if size > SD_MAX_BYTES:
            break
        out += param
    return out + "]"


def _shrunk(value: Any) -> Any:
    if isinstance(value, str):
        return value[:JSON_STRING_SHRINK]
    if isinstance(value, dict):
        return {k: _shrunk(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shrunk(v) for v in value]
    return value


def _stub(record: dict[str, Any], size: int) -> dict[str, Any]:
    def cut(value: Any) -> str | None:
        return value[:SD_VALUE_MAX] if isinstance(value, str) else None

    server = record.get("server")
    stub: dict[str, Any] = {k: cut(record.get(k)) for k in STUB_FIELDS}
    stub["server"] = {"id": cut(server.get("id") if isinstance(server, dict) else None)}
    return {**stub, "truncated": True, "omitted_bytes": size}


def format_record(
    record: dict[str, Any],
    *,
    hostname: str,
    procid: str = NILVALUE,
    facility: int = FACILITIES[DEFAULT_FACILITY],
    max_size: int = MAX_MESSAGE_SIZE,
    sd_fields: bool = True,
    as_logged: bytes | None = None,
) -> bytes:
    """One RFC 5424 message (without framing) for one connection-log record.

    Shrunk towards ``max_size`` (client strings cut, ``"truncated": true``) and
    never longer than COLLECTOR_MAX_MESSAGE_SIZE, whatever the record: the
    header and SD are bounded, and a JSON copy that would not fit becomes a stub.
    Without ``sd_fields`` the SD carries the ``id`` only (for relay collector,
    which reads the JSON: the flattened copy is for other receivers' templates).
    ``as_logged`` is the record's JSON as the connection log holds it: sent as
    it is when it has no character dumps_json would escape and fits (the
    forwarder's hot path: the record is not serialised again).
    """
    action = str(record.get("action", ""))
    pri = facility * 8 + severity_of(action)
    ts = str(record.get("time", ""))
    timestamp = ts if _TIMESTAMP.match(ts) else NILVALUE
    header = (f"<{pri}>{VERSION} {timestamp} {_header_field(hostname, HOSTNAME_MAX)} "
              f"{APP_NAME} {_header_field(procid, PROCID_MAX)} "
              f"{_header_field(action, MSGID_MAX)} ")
    head = (header + structured_data(record, sd_fields) + " ").encode() + BOM
    if as_logged is not None and len(head) + len(as_logged) <= max_size \
            and not _LOGGED_UNSAFE.search(as_logged):
        return head + as_logged
    body = dumps_json(record).encode()
    if len(head) + len(body) > max_size:
        small = _shrunk(record)
        if small != record:
            body = dumps_json({**small, "truncated": True}).encode()
    if len(head) + len(body) > COLLECTOR_MAX_MESSAGE_SIZE:
        body = dumps_json(_stub(record, len(body))).encode()
    return head + body


def frame(message: bytes) -> bytes:
    """RFC 5425 section 4.3 octet-counting: MSG-LEN SP SYSLOG-MSG."""
    return b"%d %b" % (len(message), message)


# ---------------------------------------------------------------------------
# Batch confirmations (ALPN x-relay-syslog-acks; relay/connlog/forwarder.py)
#
# RFC 5425 has no application acknowledgement. Under this private ALPN id the
# sender ends each batch with a mark, an RFC 5424 message of its own SD-ID
# carrying the batch's sequence number, and the receiver answers on the same
# connection, once every message before the mark is on disk, with one line
# "ack SEQ\n" (the receiver-to-sender direction is otherwise unused). Marks
# and acks go in order; a receiver that will not confirm closes the connection.

BATCH_SD_ID = f"relay-batch@{PEN}"
BATCH_MSGID = "batch-end"
_BATCH_MARK = re.compile(rb"<\d{1,3}>1 \S+ \S+ \S+ \S+ " + BATCH_MSGID.encode()
                         + rb" \[" + BATCH_SD_ID.encode() + rb' seq="(\d{1,18})"\]$')
# An ack is "ack " and at most 18 digits and LF: anything longer is not one.
ACK_MAX = len("ack ") + 18 + 1
_ACK = re.compile(rb"ack (\d{1,18})$")


def batch_mark(seq: int, *, hostname: str, procid: str = NILVALUE,
               facility: int = FACILITIES[DEFAULT_FACILITY]) -> bytes:
    """The framed mark that ends batch ``seq``."""
    pri = facility * 8 + SEVERITY_INFO
    return frame(f"<{pri}>{VERSION} - {_header_field(hostname, HOSTNAME_MAX)} {APP_NAME} "
                 f"{_header_field(procid, PROCID_MAX)} {BATCH_MSGID} "
                 f'[{BATCH_SD_ID} seq="{seq}"]'.encode())


def batch_seq(message: bytes) -> int | None:
    """The sequence number of a batch mark, None for any other message."""
    m = _BATCH_MARK.match(message) if BATCH_MSGID.encode() in message[:400] else None
    return int(m.group(1)) if m else None


def format_ack(seq: int) -> bytes:
    return b"ack %d\n" % seq


class AckParser:
    """The receiver's bytes in, confirmed sequence numbers out; FrameError for
    anything that is not an ack line."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[int]:
        *lines, self._buf = (self._buf + data).split(b"\n")
        if len(self._buf) >= ACK_MAX:
            raise FrameError(f"not an acknowledgement: {self._buf[:32]!r}")
        out = []
        for line in lines:
            m = _ACK.match(line)
            if not m:
                raise FrameError(f"not an acknowledgement: {line[:32]!r}")
            out.append(int(m.group(1)))
        return out


# ---------------------------------------------------------------------------
# Stream parsing


class FrameParser:
    """Bytes from a stream in, whole messages out.

    Takes RFC 5425 octet counting (a frame starts with a digit) and, from plain
    syslog senders, RFC 6587 section 3.4.2 non-transparent framing (a frame
    starts with '<' and ends at LF). Each frame decides for itself, as rsyslog
    does. A frame longer than ``max_size`` raises :class:`FrameError`: the
    stream cannot be trusted to resynchronise, and buffering it unbounded would
    let a sender exhaust memory.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        if max_size < 2048:
            raise ValueError("RFC 5425 section 4.3.1: receivers accept at least 2048 octets")
        self.max_size = max_size
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while pos < end:
            first = buf[pos]
            if 0x30 <= first <= 0x39:  # octet counting
                sp = buf.find(b" ", pos, min(end, pos + MSG_LEN_DIGITS_MAX + 1))
                if sp < 0:
                    if end - pos > MSG_LEN_DIGITS_MAX:
                        raise FrameError("octet count longer than "
                                         f"{MSG_LEN_DIGITS_MAX} digits or missing its space")
                    break
                digits = bytes(buf[pos:sp])
                if not digits.isdigit() or digits[0] == 0x30:
                    raise FrameError(f"bad octet count {digits[:16]!r}")
                size = int(digits)
                if size > self.max_size:
                    raise FrameError(f"message of {size} octets exceeds the limit of "
                                     f"{self.max_size}")
                if end - sp - 1 < size:
                    break
                out.append(bytes(buf[sp + 1:sp + 1 + size]))
                pos = sp + 1 + size
            elif first in (0x0A, 0x0D, 0x00):
                # Blank line between LF-framed messages, or a NUL trailer (some
                # senders end frames with NUL): nothing to deliver.
                pos += 1
            else:
                lf = buf.find(b"\n", pos, min(end, pos + self.max_size + 1))
                if lf < 0:
                    if end - pos > self.max_size:
                        raise FrameError(f"line longer than the limit of {self.max_size} "
                                         "octets without LF")
                    break
                line = bytes(buf[pos:lf])
                out.append(line[:-1] if line.endswith(b"\r") else line)
                pos = lf + 1
        del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back (a torn frame at EOF)."""
        return len(self._buf)


# ---------------------------------------------------------------------------
# Message parsing


@dataclass
class Message:
    facility: int
    severity: int
    version: int
    timestamp: str | None
    hostname: str | None
    app_name: str | None
    procid: str | None
    msgid: str | None
    sd: dict[str, dict[str, str]] = field(default_factory=dict)
    msg: str = ""
    bom: bool = False

    def header(self) -> dict[str, Any]:
        return {"facility": self.facility, "severity": self.severity, "version": self.version,
                "timestamp": self.timestamp, "hostname": self.hostname,
                "app_name": self.app_name, "procid": self.procid, "msgid": self.msgid}


_HEADER = re.compile(
    rb"<(\d{1,3})>([1-9]\d{0,2}) ([\x21-\x7e]+) ([\x21-\x7e]+) ([\x21-\x7e]+) "
    rb"([\x21-\x7e]+) ([\x21-\x7e]+) ")
_SD_ELEMENT = re.compile(rb'\[([^\x00-\x20=\]"]{1,32})((?: +[^\x00-\x20=\]"]{1,32}='
                         rb'"(?:[^"\\]|\\.)*")*) *\]', re.S)
_SD_PARAM = re.compile(rb'([^\x00-\x20=\]"]{1,32})="((?:[^"\\]|\\.)*)"', re.S)
_SD_UNESCAPE = re.compile(rb'\\(["\\\]])')


def _nil(token: bytes) -> str | None:
    return None if token == b"-" else token.decode("ascii")


def _text(raw: bytes) -> str:
    # RFC 5424 says UTF-8; a hostile or broken sender gets its bad bytes shown
    # as \xNN rather than the message refused.
    return raw.decode("utf-8", "backslashreplace")


def parse_message(data: bytes) -> Message:
    """Split one RFC 5424 message into header fields, SD elements and MSG."""
    m = _HEADER.match(data)
    if not m:
        raise SyslogError(f"not an RFC 5424 header: {data[:64]!r}")
    prival = int(m.group(1))
    if prival > 191:
        raise SyslogError(f"PRI {prival} out of range 0..191")
    pos = m.end()
    sd: dict[str, dict[str, str]] = {}
    if data[pos:pos + 1] == b"-":
        pos += 1
    else:
        while data[pos:pos + 1] == b"[":
            el = _SD_ELEMENT.match(data, pos)
            if not el:
                raise SyslogError(f"malformed STRUCTURED-DATA at {data[pos:pos + 64]!r}")
            # The collector's hot loop: one findall, and the unescape only
            # for the values that have a backslash.
            params = {
                name.decode("ascii", "backslashreplace"): (
                    _SD_UNESCAPE.sub(rb"\1", value) if b"\\" in value else value
                ).decode("utf-8", "backslashreplace")
                for name, value in _SD_PARAM.findall(el.group(2))}
            # RFC 5424 section 6.3.2: an SD-ID appears once; keep the first.
            sd.setdefault(_text(el.group(1)), params)
            pos = el.end()
        if not sd:
            raise SyslogError("STRUCTURED-DATA is neither '-' nor an element")
    rest = data[pos:]
    if rest and not rest.startswith(b" "):
        raise SyslogError(f"no space after STRUCTURED-DATA: {rest[:32]!r}")
    body = rest[1:]
    bom = body.startswith(BOM)
    if bom:
        body = body[len(BOM):]
    # Sender templates (rsyslog's RSYSLOG_SyslogProtocol23Format) end with LF
    # even inside an octet-counted frame; it is framing, not content.
    if body.endswith(b"\n"):
        body = body[:-1]
    return Message(
        facility=prival >> 3, severity=prival & 7, version=int(m.group(2)),
        timestamp=_nil(m.group(3)), hostname=_nil(m.group(4)), app_name=_nil(m.group(5)),
        procid=_nil(m.group(6)), msgid=_nil(m.group(7)), sd=sd, msg=_text(body), bom=bom)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_INNERMOST = re.compile(r"\{[^{}\[\]]*\}|\[[^{}\[\]]*\]")


def _too_deep(text: str) -> bool:
    """Whether valid JSON ``text`` nests deeper than RECORD_DEPTH_MAX: without
    walking the parsed value (the collector's hot path): with few enough
    brackets it cannot; else strings out, and innermost containers removed,
    one level per regex pass."""
    if text.count("{") + text.count("[") <= RECORD_DEPTH_MAX:
        return False
    rest = _JSON_STRING.sub("", text)
    for _ in range(RECORD_DEPTH_MAX):
        rest, n = _INNERMOST.subn("", rest)
        if not n:
            return False
    return "{" in rest or "[" in rest


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= RECORD_DEPTH_MAX:
                todo += [(v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                  else item)]
    return deepest


class _Ambiguous(ValueError):
    """JSON that parsers read differently."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        raise _Ambiguous("a key given twice")
    return record


def _no_constant(name: str) -> Any:
    raise _Ambiguous(f"{name} is not JSON")


def load_record(text: str | bytes) -> dict[str, Any]:
    """A record's JSON: an object nested at most RECORD_DEPTH_MAX deep, or
    :class:`SyslogError`. Refused too: JSON that other parsers read otherwise. A
    key given twice is the last one to Python and the first one to ClickHouse's
    JSONExtract (and to simdjson, RapidJSON): a sender could show the collector
    its own relay id and the store another's. NaN and Infinity are Python's,
    not JSON's (RFC 8259 section 6)."""
    try:
        record = json.loads(text, object_pairs_hook=_unique_keys,
                            parse_constant=_no_constant)
    except _Ambiguous as exc:
        raise SyslogError(f"ambiguous JSON: {exc}") from None
    except (ValueError, RecursionError):
        raise SyslogError("not JSON") from None
    if not isinstance(record, dict):
        raise SyslogError("not a JSON object")
    if _too_deep(text if isinstance(text, str) else text.decode("utf-8", "replace")):
        raise SyslogError(f"JSON nested deeper than {RECORD_DEPTH_MAX} levels")
    return record


# A relay record as the forwarder sends it to relay collector (format_record
# without sd_fields): the SD is its id alone, so the JSON starts right after it.
_LEAN_RELAY = re.compile(rb"<(\d{1,3})>[1-9]\d{0,2} [\x21-\x7e]+ [\x21-\x7e]+ [\x21-\x7e]+ "
                         rb"[\x21-\x7e]+ [\x21-\x7e]+ \[" + SD_ID.encode()
                         + rb' id="([0-9A-Za-z_-]{1,64})"\] (?:\xef\xbb\xbf)?')


def lean_relay_record(data: bytes) -> tuple[dict[str, Any], str] | None:
    """(record, its JSON text) of a message in the lean form when it is a valid
    relay record, else None: the caller then takes :func:`parse_message` and
    :func:`relay_record`, which decide the same for it (a fast path, not a rule)."""
    m = _LEAN_RELAY.match(data)
    if m is None or int(m.group(1)) > 191:
        return None
    body = data[m.end():]
    if body.endswith(b"\n"):
        body = body[:-1]
    try:
        text = body.decode()
        record = load_record(text)
    except (UnicodeDecodeError, SyslogError):
        return None
    if record.get("id") != m.group(2).decode():
        return None
    return record, text


def relay_record(message: Message) -> dict[str, Any] | None:
    """The connection-log record a relay sent, or None for any other message.

    Raises :class:`SyslogError` when the message claims to be a relay record
    (it has our SD-ID) but its JSON is broken or does not match the SD ``id``.
    """
    params = message.sd.get(SD_ID)
    if params is None:
        return None
    try:
        record = load_record(message.msg)
    except SyslogError as exc:
        raise SyslogError(f"relay message whose MSG is {exc}") from None
    rid = record.get("id")
    if not isinstance(rid, str) or not rid or rid != params.get("id"):
        raise SyslogError(f"relay record id {rid!r} does not match SD id {params.get('id')!r}")
    return record
