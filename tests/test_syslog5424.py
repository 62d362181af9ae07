"""RFC 5424 formatting and parsing, RFC 5425 framing: escaping, injection, limits."""

from __future__ import annotations

import contextlib
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.protocols import syslog5424 as s5
from relay.serve.hotpath_py import HOST_MAX, Destination
from relay.serve.sessions import Session

BASE = {
    "id": "0123456789abcdef01234567",
    "time": "2026-11-25T21:05:32.123Z",
    "action": "connect",
    "session_id": "abcd1234",
    "server": {"id": "relay-1", "ip": "192.0.2.1", "hostname": "relay1.example"},
    "client": {"ip": "198.51.100.7", "port": 51515, "hostname": None},
    "protocol": "cstp",
    "client_software": {"name": "OpenConnect", "version": "9.12", "id": "x"},
    "virtual_ip": "10.211.0.2",
}


def fmt(record: dict, **kw) -> bytes:
    return s5.format_record(record, hostname="relay-1", procid="42", **kw)


def with_client(name: str, hostname: str = "h") -> dict:
    return {**BASE, "client_software": {"name": name, "version": "1"},
            "client": {"ip": "198.51.100.7", "port": 1, "hostname": hostname}}


def test_header_fields() -> None:
    m = s5.parse_message(fmt(BASE))
    assert (m.facility, m.severity, m.version) == (16, 6, 1)
    assert m.timestamp == BASE["time"]
    assert (m.hostname, m.app_name, m.procid, m.msgid) == ("relay-1", "relay", "42", "connect")
    assert m.bom
    assert list(m.sd) == ["relay@32473"]
    assert m.sd["relay@32473"]["id"] == BASE["id"]
    assert m.sd["relay@32473"]["client_software.version"] == "9.12"
    assert "client.hostname" not in m.sd["relay@32473"]  # null: only in the JSON
    assert s5.relay_record(m) == BASE


def test_audit_actions_are_notice_and_facility_is_configurable() -> None:
    raw = fmt({**BASE, "action": "logging-off"}, facility=s5.facility_code("authpriv"))
    assert raw.startswith(b"<85>1 ")  # authpriv(10) * 8 + notice(5)
    assert s5.parse_message(raw).msgid == "logging-off"
    with pytest.raises(ValueError, match="unknown syslog facility"):
        s5.facility_code("local9")


def test_first_sd_param_is_the_record_id() -> None:
    sd = s5.structured_data(BASE)
    assert sd.startswith(f'[relay@32473 id="{BASE["id"]}" ')


@pytest.mark.parametrize("evil", [
    ']',
    '"',
    '\\',
    '\\"]',
    '"] [relay@32473 id="forged" action="ban"]',
    'x" id="forged',
    'a\nb',
    'line1\r\n<13>1 2026-01-01T00:00:00Z forged relay - - - injected',
    '\x00\x07\x1b[31m\x7f\x85\u2028\u2029',
    '\\x0a',
])
def test_injection_attempts_stay_inside_one_value(evil: str) -> None:
    rec = with_client(evil, hostname=evil)
    raw = fmt(rec)
    # No raw line break or control character anywhere: a receiver storing one
    # message per line cannot be handed a forged line.
    text = raw.decode("utf-8")
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", text)
    m = s5.parse_message(raw)
    assert list(m.sd) == ["relay@32473"]
    params = m.sd["relay@32473"]
    assert params["id"] == BASE["id"]
    assert params["action"] == "connect"
    shown = re.sub("[\x00-\x1f\x7f-\xff]",
                   lambda c: f"\\x{ord(c.group()):02x}"
                   if ord(c.group()) < 0x20 or 0x7f <= ord(c.group()) <= 0x9f else c.group(),
                   evil).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    assert params["client_software.name"] == shown
    assert params["client.hostname"] == shown
    assert s5.relay_record(m) == rec  # the JSON copy is exact


def test_sd_escapes_per_rfc5424_6_3_3() -> None:
    assert s5.sd_escape('a"b\\c]d') == 'a\\"b\\\\c\\]d'
    assert s5.sd_escape("[ok=") == "[ok="  # only ", \ and ] are escaped


def test_sd_names_restricted_to_sd_name_charset() -> None:
    rec = {**BASE, 'we ird="k]ey': "v", "x" * 50: "long"}
    m = s5.parse_message(fmt(rec))
    params = m.sd["relay@32473"]
    assert params["we_ird__k_ey"] == "v"
    assert params["x" * 32] == "long"
    for name in params:
        assert re.fullmatch(r'[\x21-\x7e]{1,32}', name) and not re.search(r'[= \]"]', name)


def test_non_utf8_client_strings() -> None:
    # Bytes that are not UTF-8, decoded with surrogateescape by a protocol parser.
    evil = b"caf\xe9 \xff\xfe".decode("utf-8", "surrogateescape")
    rec = with_client(evil)
    raw = fmt(rec)
    raw.decode("utf-8")  # strictly valid UTF-8
    m = s5.parse_message(raw)
    assert m.sd["relay@32473"]["client_software.name"] == "caf\\udce9 \\udcff\\udcfe"
    assert s5.relay_record(m) == rec


def test_parser_shows_invalid_utf8_instead_of_failing() -> None:
    m = s5.parse_message(b'<13>1 - host app - - [x@1 k="\xff\xfe"] caf\xe9')
    assert m.sd == {"x@1": {"k": "\\xff\\xfe"}}
    assert m.msg == "caf\\xe9"


def test_oversized_record_is_shrunk_below_rsyslog_default() -> None:
    rec = with_client("A" * 20000, hostname="B" * 20000)
    raw = fmt(rec)
    assert len(raw) <= s5.MAX_MESSAGE_SIZE
    m = s5.parse_message(raw)
    back = s5.relay_record(m)
    assert back is not None and back["truncated"] is True and back["id"] == BASE["id"]
    assert back["client_software"]["name"] == "A" * s5.JSON_STRING_SHRINK
    assert m.sd["relay@32473"]["client_software.name"] == "A" * s5.SD_VALUE_MAX + "..."


def test_bad_timestamp_becomes_nilvalue() -> None:
    m = s5.parse_message(fmt({**BASE, "time": "yesterday evening"}))
    assert m.timestamp is None
    assert s5.relay_record(m)["time"] == "yesterday evening"


def test_relay_record_rejects_mismatched_id_and_bad_json() -> None:
    raw = fmt(BASE).replace(BASE["id"].encode(), b"f" * 24, 1)  # the SD id only
    with pytest.raises(s5.SyslogError, match="does not match"):
        s5.relay_record(s5.parse_message(raw))
    bad = b'<134>1 - h relay - connect [relay@32473 id="a"] \xef\xbb\xbf{"id":"a"'
    with pytest.raises(s5.SyslogError, match="not JSON"):
        s5.relay_record(s5.parse_message(bad))
    assert s5.relay_record(s5.parse_message(b"<13>1 - h a - - - plain")) is None


@pytest.mark.parametrize("raw", [
    b"hello",
    b"<13> - h a - - - no version",
    b"<192>1 - h a - - - pri too big",
    b"<13>1 - h a - - [unterminated x=\"1\"",
    b"<13>1 - h a - - [ok@1 k=\"v\"]no-space",
    b"<13>1 - h a - - x",
])
def test_parse_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(s5.SyslogError):
        s5.parse_message(raw)


def test_parse_rsyslog_rewritten_message() -> None:
    # rsyslog's RSYSLOG_SyslogProtocol23Format: its own timestamp precision and
    # a trailing LF inside the frame.
    orig = s5.parse_message(fmt(BASE))
    raw = fmt(BASE).replace(b"2026-11-25T21:05:32.123Z", b"2026-11-25T21:05:32.123000+00:00",
                            1) + b"\n"
    m = s5.parse_message(raw)
    assert m.timestamp == "2026-11-25T21:05:32.123000+00:00"
    assert m.sd == orig.sd and s5.relay_record(m) == BASE


# -- framing --------------------------------------------------------------


def test_frame_is_octet_counted() -> None:
    assert s5.frame(b"<13>1 - - - - - -") == b"17 <13>1 - - - - - -"


msgs = st.lists(st.binary(min_size=1, max_size=300).map(lambda b: b"<1>" + b), max_size=20)


@settings(max_examples=200, deadline=None)
@given(msgs, st.lists(st.integers(min_value=1, max_value=64), max_size=50))
def test_framing_round_trip_any_split(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(s5.frame(m) for m in messages)
    parser = s5.FrameParser()
    out: list[bytes] = []
    pos = 0
    for size in cuts:
        out += parser.feed(stream[pos:pos + size])
        pos += size
    out += parser.feed(stream[pos:])
    assert out == messages
    assert parser.pending == 0


def test_lf_framing_from_plain_senders_mixed_with_octet_counting() -> None:
    parser = s5.FrameParser()
    stream = (b"<13>1 - a b - - - one\n" + s5.frame(b"<13>1 - a b - - - two\nlines")
              + b"<13>1 - a b - - - three\r\n\n<13>1 - a b - - - fo")
    assert parser.feed(stream) == [b"<13>1 - a b - - - one", b"<13>1 - a b - - - two\nlines",
                                   b"<13>1 - a b - - - three"]
    assert parser.feed(b"ur\n") == [b"<13>1 - a b - - - four"]


def test_limit_is_exact() -> None:
    parser = s5.FrameParser(max_size=4096)
    body = b"<" + b"x" * 4095
    assert parser.feed(s5.frame(body)) == [body]
    with pytest.raises(s5.FrameError, match="exceeds the limit of 4096"):
        s5.FrameParser(max_size=4096).feed(b"4097 ")


def test_limits_bound_the_buffer() -> None:
    with pytest.raises(s5.FrameError, match="digits"):
        s5.FrameParser().feed(b"12345678901")
    with pytest.raises(s5.FrameError, match="bad octet count"):
        s5.FrameParser().feed(b"012 ")
    with pytest.raises(s5.FrameError, match="bad octet count"):
        s5.FrameParser().feed(b"12x4 ")
    parser = s5.FrameParser(max_size=2048)
    assert parser.feed(b"<" + b"y" * 2047) == []
    with pytest.raises(s5.FrameError, match="without LF"):
        parser.feed(b"y")
    with pytest.raises(ValueError, match="2048"):
        s5.FrameParser(max_size=2047)


def test_default_limits_follow_the_rfc_and_rsyslog() -> None:
    assert s5.MAX_MESSAGE_SIZE == 8192 >= 2048
    assert s5.COLLECTOR_MAX_MESSAGE_SIZE >= s5.MAX_MESSAGE_SIZE


# -- property: any record survives the trip ---------------------------------

text = st.text(max_size=40)  # includes controls, quotes, brackets, surrogates
records = st.fixed_dictionaries({
    "id": st.text(alphabet="0123456789abcdef", min_size=24, max_size=24),
    "time": st.just("2026-11-25T21:05:32.123Z"),
    "action": st.sampled_from(["connect", "disconnect", "ban", "logging-off"]),
    "client_software": st.fixed_dictionaries({"name": text, "version": text, "id": text}),
    "client": st.fixed_dictionaries({"ip": text, "port": st.integers(0, 65535),
                                     "hostname": st.none() | text}),
    "packets": st.fixed_dictionaries({"in": st.integers(0, 2**63), "out": st.integers()}),
})


@settings(max_examples=300, deadline=None)
@given(records)
def test_any_record_round_trips(rec: dict) -> None:
    raw = fmt(rec)
    raw.decode("utf-8")
    assert b"\n" not in raw and b"\r" not in raw
    [back] = s5.FrameParser().feed(s5.frame(raw))
    m = s5.parse_message(back)
    assert list(m.sd) == ["relay@32473"]
    assert m.msgid == rec["action"]
    out = s5.relay_record(m)
    assert json.dumps(out, sort_keys=True) == json.dumps(rec, sort_keys=True)


# -- every record fits the collector's frame (issue 13 item 5) -------------------


def worst_case_disconnect() -> dict:
    """A disconnect record as relay.serve.core writes it, with every client-declared
    string at its cap in the widest characters and 256+ destinations of
    255-character hosts on IPv6 addresses: the largest record a session makes."""
    wide = "\u2028" * 256  # 1 character, 6 bytes once escaped (JSON and SD)
    s = Session("A" * 22, b"\x02" * 6, "10.211.0.2", "198.51.100.7", 51515, "SSL-VPN")
    for i in range(300):
        host = f"h{i:03d}-" + "x" * (HOST_MAX - 5 - len(".test")) + ".test"
        assert len(host) == HOST_MAX
        s.add_destination(Destination(host, f"2001:db8:ffff:ffff:ffff:ffff:ffff:{i:04x}",
                                      65535, "https"))
    return {
        "id": "0123456789abcdef01234567", "time": "2026-11-25T21:05:32.123Z",
        "action": "disconnect", "session_id": s.id,
        "server": {"id": "r" * 64, "ip": "2001:db8::1", "hostname": "h" * 255},
        "client": {"ip": "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "port": 65535,
                   "hostname": "c" * 253},
        "protocol": "SSL-VPN",
        "client_software": {k: wide for k in ("name", "version", "id", "platform",
                                              "hostname")},
        "virtual_ip": s.virtual_ip, "connect_time": "2026-11-25T21:05:32.123Z",
        **s.counters(), "duration_s": 1e12,
        "reason": "client-disconnect: " + wide, "error": wide,
    }


def test_worst_case_disconnect_record_fits_the_collector_frame() -> None:
    rec = worst_case_disconnect()
    assert len(rec["destinations"]) + rec["destinations_dropped"] == 300
    assert rec["destinations_dropped"] > 0  # the budget, not the count, bound them
    assert len(s5.dumps_json(rec).encode()) <= s5.RECORD_JSON_MAX
    framed = s5.frame(fmt(rec))
    assert len(framed) <= s5.COLLECTOR_MAX_MESSAGE_SIZE
    [raw] = s5.FrameParser(s5.COLLECTOR_MAX_MESSAGE_SIZE).feed(framed)
    assert s5.relay_record(s5.parse_message(raw)) == rec  # whole, not a stub


def test_any_record_fits_the_collector_frame() -> None:
    """The second line of defence: a record no relay writes (a tampered log)
    still makes a message within the frame, as a stub that names it."""
    huge = {**BASE, "server": {"id": "relay-1"}, "many": {f"k{i}": "\u2028" * 300
                                                          for i in range(500)},
            "list": ["y" * 1000] * 300}
    raw = fmt(huge, max_size=s5.COLLECTOR_MAX_MESSAGE_SIZE)
    assert len(s5.frame(raw)) <= s5.COLLECTOR_MAX_MESSAGE_SIZE
    m = s5.parse_message(raw)
    assert len(s5.structured_data(huge).encode()) <= s5.SD_MAX_BYTES
    assert s5.relay_record(m) == {
        "id": BASE["id"], "time": BASE["time"], "action": "connect",
        "session_id": BASE["session_id"], "server": {"id": "relay-1"}, "truncated": True,
        "omitted_bytes": len(s5.dumps_json({**s5._shrunk(huge), "truncated": True}).encode())}


def test_a_record_that_fits_is_not_marked_truncated() -> None:
    rec = {**BASE, "destinations": [{"host": "x" * 255, "ip": "192.0.2.1", "port": 80,
                                     "scheme": "http"}] * 40}
    raw = fmt(rec)
    assert len(raw) > s5.MAX_MESSAGE_SIZE  # above the soft target: nothing to cut
    assert s5.relay_record(s5.parse_message(raw)) == rec


# -- parsers never throw (issue 13 item 8) -----------------------------------------


@pytest.mark.parametrize("msg", [b"[" * 100_000, b'{"id":"a","x":' + b"[" * 100_000,
                                 b'{"id":"a","x":' + b"[" * 9 + b"]" * 9 + b"}"])
def test_deeply_nested_json_is_a_clean_refusal(msg: bytes) -> None:
    raw = b'<13>1 - h relay - - [relay@32473 id="a"] ' + s5.BOM + msg
    with pytest.raises(s5.SyslogError, match=r"not JSON|nested deeper"):
        s5.relay_record(s5.parse_message(raw))


def _consume(stream: bytes, cuts: list[int]) -> None:
    """Feed ``stream`` in pieces and parse whatever comes out: only SyslogError
    (FrameError included) may escape, the collector's contract."""
    parser = s5.FrameParser(s5.COLLECTOR_MAX_MESSAGE_SIZE)
    pos = 0
    with contextlib.suppress(s5.FrameError):
        for size in [*cuts, len(stream)]:
            for raw in parser.feed(stream[pos:pos + size]):
                with contextlib.suppress(s5.SyslogError):
                    s5.relay_record(s5.parse_message(raw))
            pos += size


_TOKENS = [b"<13>1 ", b"- ", b"[", b"]", b'"', b"\\", b"=", b" ", b"\n", b"relay@32473",
           b'id="a"', b"{", b"}", b"[" * 2000, b'{"id":"a"}', b'"x":' + b"[" * 2000, b",",
           s5.BOM, b"\xff", b"99 ", b"0 "]


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS) | st.binary(max_size=12), max_size=40),
       st.lists(st.integers(1, 64), max_size=8))
def test_fuzz_random_streams_raise_only_syslog_errors(parts: list[bytes],
                                                      cuts: list[int]) -> None:
    _consume(b"".join(parts), cuts)


_SEED = s5.format_record({**BASE, "destinations": [
    {"host": "a.test", "ip": "192.0.2.1", "port": 80, "scheme": "http"}]},
    hostname="relay-1", procid="7")


# Edits land anywhere, or just after a JSON or SD delimiter, where they change
# the structure rather than the content of a string.
_WHERE = st.integers(0, len(_SEED)) | st.sampled_from(
    [i + 1 for i, c in enumerate(_SEED) if c in b'{[,:="] '])


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(_WHERE, st.integers(0, 16),
                          st.sampled_from(_TOKENS) | st.binary(max_size=8)), max_size=6),
       st.booleans(), st.lists(st.integers(1, 64), max_size=8))
def test_fuzz_mutated_messages_raise_only_syslog_errors(
        edits: list[tuple[int, int, bytes]], framed_first: bool, cuts: list[int]) -> None:
    """A relay message edited in place, then framed (a well-framed hostile
    message), or framed and then edited (a broken stream)."""
    raw = bytearray(s5.frame(_SEED) if framed_first else _SEED)
    for at, cut, insert in edits:
        raw[at:at + cut] = insert
    _consume(bytes(raw) if framed_first else s5.frame(bytes(raw)), cuts)


def test_batch_marks_and_acks() -> None:
    framed = s5.batch_mark(42, hostname="relay-1", procid="7")
    [mark] = s5.FrameParser().feed(framed)
    assert s5.batch_seq(mark) == 42
    assert s5.parse_message(mark).sd == {s5.BATCH_SD_ID: {"seq": "42"}}  # RFC 5424 still
    # Only the mark itself: not a record, not a mark with a MSG or another SD-ID.
    record = s5.format_record({"id": "a" * 24, "action": "batch-end"}, hostname="relay-1")
    assert s5.batch_seq(record) is None
    assert s5.batch_seq(mark + b" text") is None
    assert s5.batch_seq(mark.replace(b"relay-batch@", b"relay-other@")) is None
    parser = s5.AckParser()
    assert parser.feed(s5.format_ack(1) + b"ack 2\nack") == [1, 2]
    assert parser.feed(b" 3\n") == [3]
    for bad in (b"nak 4\n", b"ack x\n", b"a" * s5.ACK_MAX):
        with pytest.raises(s5.FrameError):
            s5.AckParser().feed(bad)


def test_a_lean_sd_carries_the_id_only() -> None:
    rec = {"id": "b" * 24, "time": "2026-11-01T00:00:00.000Z", "action": "connect",
           "server": {"id": "relay-1"}}
    lean = s5.parse_message(s5.format_record(rec, hostname="relay-1", sd_fields=False))
    assert lean.sd == {s5.SD_ID: {"id": "b" * 24}}
    assert s5.relay_record(lean) == rec
