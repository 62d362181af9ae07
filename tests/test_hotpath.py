"""The hot path (relay.serve.hotpath, C) and its twin (relay.serve.hotpath_py): unit tests of
every rule on both, and hypothesis differential tests C vs Python on random and
crafted packets (same bytes, same results), checksums checked from scratch."""

from __future__ import annotations

import base64
from array import array
from types import ModuleType

import pytest
from hotpath_packets import (
    DSTOPTS,
    FRAGMENT,
    HOPOPTS,
    ROUTING,
    SERVER_V4,
    SERVER_V6,
    TAG,
    client_hello,
    extension,
    http_request,
    ipv4,
    ipv6,
    tcp_checksum_ok,
    tcp_offsets,
    tcp_sum,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.serve import hotpath, hotpath_py
from relay.serve.hotpath import PLAIN, SKIPPED, Destination, Inspection

IMPLS = [hotpath, hotpath_py]


def run(packet: bytes, tag: bytes = TAG) -> tuple[Inspection, bytearray]:
    """Inspect copies with both implementations; they must agree on everything."""
    c_pkt, py_pkt = bytearray(packet), bytearray(packet)
    c_res = hotpath.inspect(c_pkt, tag)
    py_res = hotpath_py.inspect(py_pkt, tag)
    assert c_res == py_res
    assert c_pkt == py_pkt
    assert len(c_pkt) == len(packet)
    return c_res, c_pkt


def payload(packet: bytes) -> bytes:
    off, end, _ = tcp_offsets(packet)
    return bytes(packet[off + (packet[off + 12] >> 4) * 4 : end])


def stamped_ok(packet: bytes) -> tuple[Inspection, bytes]:
    """Run both, check the checksum from scratch and that seq/ack did not move."""
    res, out = run(packet)
    assert tcp_checksum_ok(out)
    off = tcp_offsets(packet)[0]
    assert out[off : off + 16] == packet[off : off + 16]  # ports, seq, ack, flags
    return res, payload(out)


# --- User-Agent stamp -------------------------------------------------------


@pytest.mark.parametrize("build", [ipv4, ipv6], ids=["v4", "v6"])
def test_stamps_ua_tail_and_fixes_checksum(build) -> None:
    pkt = build(http_request(ua="Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"))
    res, out = stamped_ok(pkt)
    assert b"\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Firef" + TAG + b"\r\n" in out
    assert res.stamped == 1 and res.ua_missed == 0 and res.is_http
    server = SERVER_V4 if build is ipv4 else SERVER_V6
    assert res.destination == Destination("example.com", server, 80, "http")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("user-agent", "curl/8.1.2", "cu" + TAG.decode()),
        ("USER-AGENT", "Wget/1.21.3", "Wge" + TAG.decode()),
        ("User-Agent", "12345678", TAG.decode()),
        ("User-Agent", "abc", TAG[:3].decode()),
        ("User-Agent", "x", TAG[:1].decode()),
        ("User-Agent", "  spaced   value \t ", "  spaced" + TAG.decode() + " \t "),
        ("User-Agent", "", ""),
        ("User-Agent", "   ", "   "),
    ],
)
def test_ua_value_rules(name: str, value: str, expected: str) -> None:
    pkt = ipv4(http_request(ua=value, ua_name=name))
    res, out = stamped_ok(pkt)
    assert f"\r\n{name}: {expected}\r\n".encode() in out
    assert res.stamped == (1 if value.strip() else 0)


def test_only_ua_headers_are_touched() -> None:
    req = http_request(
        headers=(
            ("X-User-Agent", "abcdefghijkl"),
            ("User-Agent-X", "abcdefghijkl"),
            ("Accept", "*/*"),
        ),
        ua=None,
    )
    res, out = stamped_ok(ipv4(req))
    assert out == req and res.stamped == 0


def test_name_with_space_before_colon_is_not_a_ua() -> None:
    req = b"GET / HTTP/1.1\r\nUser-Agent : abcdefghijkl\r\n\r\n"
    res, out = stamped_ok(ipv4(req))
    assert out == req and res.stamped == 0


def test_every_ua_header_of_a_request_is_stamped() -> None:
    req = b"GET / HTTP/1.1\r\nUser-Agent: first-agent\r\nuser-agent: second-agent\r\n\r\n"
    res, out = stamped_ok(ipv4(req))
    assert out == (
        b"GET / HTTP/1.1\r\nUser-Agent: fir" + TAG + b"\r\nuser-agent: seco" + TAG + b"\r\n\r\n"
    )
    assert res.stamped == 2


@pytest.mark.parametrize("port", [80, 8080, 443, 3128, 1])
def test_any_destination_port(port: int) -> None:
    res, out = stamped_ok(ipv4(http_request(), dport=port))
    assert out.endswith(b"cu" + TAG + b"\r\nAccept: */*\r\n\r\n")
    assert res.destination.port == port


@pytest.mark.parametrize(
    "method", ["POST", "PUT", "HEAD", "OPTIONS", "PATCH", "DELETE", "PROPFIND", "M-SEARCH", "X_Y"]
)
def test_methods(method: str) -> None:
    assert stamped_ok(ipv4(http_request(method)))[0].stamped == 1


@pytest.mark.parametrize(
    "line",
    [
        b"get / HTTP/1.1",  # lower-case method
        b"GET  / HTTP/1.1",  # double space
        b"GET / HTTP/2.0",
        b"GET / HTTP/1.x",
        b"GET /\x7f HTTP/1.1",
        b"GET / HTTP/1.1 ",
        b" GET / HTTP/1.1",
        b"ABCDEFGHIJKLMNOPQRSTU / HTTP/1.1",  # 21-character method
        b"GET / HTTP/1.1\n",  # bare LF
    ],
)
def test_not_a_request_line(line: bytes) -> None:
    req = line + b"\r\nUser-Agent: abcdefghijkl\r\n\r\n"
    res, out = stamped_ok(ipv4(req))
    assert out == req and res is PLAIN


def test_longest_method_and_http10() -> None:
    req = b"ABCDEFGHIJKLMNOPQRST * HTTP/1.0\r\nUser-Agent: abcdefghijkl\r\n\r\n"
    assert stamped_ok(ipv4(req))[0].stamped == 1


def test_pipelined_requests_with_bodies() -> None:
    body = b"User-Agent: inside-the-body\r\n\r\nGET /fake HTTP/1.1\r\n"
    reqs = [
        http_request("GET", "/a", ua="agent-number-one"),
        http_request("POST", "/b", ua="agent-number-two", body=body),
        http_request("GET", "/c", host="other.example", ua="three"),
    ]
    res, out = stamped_ok(ipv4(b"".join(reqs)))
    assert res.stamped == 3 and res.ua_missed == 0
    assert b"agent-nu" + TAG + b"\r\n" in out
    assert out.count(b"agent-number-") == 0 and out.count(TAG) == 2
    assert body in out  # the body is untouched
    assert out.endswith(b"User-Agent: " + TAG[:5] + b"\r\nAccept: */*\r\n\r\n")
    assert res.destination.host == "example.com"  # the first request's Host


@pytest.mark.parametrize(
    "headers",
    [
        (("Transfer-Encoding", "chunked"),),
        (("Content-Length", "abc"),),
        (("Content-Length", "5, 5"),),
        (("Content-Length", ""),),
        (("Content-Length", "0000000000"),),  # 10 digits
        (("Content-Length", "999"),),  # past the segment
    ],
)
def test_undelimited_body_stops_the_walk(headers) -> None:
    second = http_request(ua="must-not-be-stamped")
    req = http_request("POST", ua="first-agent", headers=headers)
    res, out = stamped_ok(ipv4(req + second))
    assert res.stamped == 1 and out.endswith(second)


def test_content_length_with_leading_zeros_and_ows() -> None:
    req = http_request("POST", headers=(("Content-Length", " \t000000003 "),)) + b"abc"
    res, out = stamped_ok(ipv4(req + http_request(ua="second-agent")))
    assert res.stamped == 2 and out.endswith(b"seco" + TAG + b"\r\nAccept: */*\r\n\r\n")


def test_garbage_after_a_request_stops_the_walk() -> None:
    tail = b"\x00\x01User-Agent: abcdefghijk\r\n\r\n"
    res, out = stamped_ok(ipv4(http_request() + tail))
    assert res.stamped == 1 and out.endswith(tail)


def test_second_request_line_cut_is_left_alone() -> None:
    res, out = stamped_ok(ipv4(http_request() + b"GET /next HTT"))
    assert res.stamped == 1 and res.ua_missed == 0 and out.endswith(b"GET /next HTT")


# --- The split rule --------------------------------------------------------------


def _cut(req: bytes, at: bytes) -> bytes:
    return req[: req.index(at) + len(at)]


@pytest.mark.parametrize(
    ("cut_after", "stamped", "missed"),
    [
        (b"User-Agent: curl/8.1", 0, 1),  # UA value cut: not stamped, counted
        (b"User-Agent:", 0, 1),
        (b"User-Ag", 0, 1),  # could be a User-Agent
        (b"\r\nU", 0, 1),
        (b"Host: example.com\r\n", 0, 1),  # cut at a line boundary, no UA yet
        (b"HTTP/1.1\r\n", 0, 1),  # request line only
        (b"curl/8.1.2\r\n", 1, 0),  # UA complete: stamped, block incomplete
        (b"curl/8.1.2\r\nAcc", 1, 0),  # cut line is not a UA
        (b"Host: exam", 0, 0),  # cut line is a Host
    ],
)
def test_split_rule(cut_after: bytes, stamped: int, missed: int) -> None:
    req = _cut(http_request(), cut_after)
    res, out = stamped_ok(ipv4(req))
    assert (res.stamped, res.ua_missed) == (stamped, missed)
    assert res.is_http
    if not stamped:
        assert out == req


def test_split_rule_next_segment_is_not_stamped() -> None:
    # The continuation of a cut request is not an HTTP request line.
    res, _out = stamped_ok(ipv4(b"t: curl/8.1.2\r\nAccept: */*\r\n\r\n"))
    assert res is PLAIN


def test_split_rule_in_a_pipelined_request() -> None:
    req = http_request(ua="agent-one") + _cut(http_request(ua="agent-two"), b"User-Agent: age")
    res, _ = stamped_ok(ipv4(req))
    assert (res.stamped, res.ua_missed) == (1, 1)


def test_empty_ua_counts_as_seen_for_the_split_rule() -> None:
    req = b"GET / HTTP/1.1\r\nUser-Agent:\r\n"
    res, _ = stamped_ok(ipv4(req))
    assert (res.stamped, res.ua_missed) == (0, 0)


# --- Destinations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com:8080", "example.com"),
        ("example.com:", "example.com"),
        ("  spaced.example \t", "spaced.example"),
        ("under_score.example", "under_score.example"),
        ("[2001:DB8::1]:443", "[2001:db8::1]"),
        ("[2001:db8::1]", "[2001:db8::1]"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("a" * 255, "a" * 255),
        ("a" * 256, ""),
        ("example.com:123456", ""),
        ("example.com:80x", ""),
        ("exa mple.com", ""),
        ("ex/ample", ""),
        ("caf\xe9.example", ""),
        ("[]", ""),
        ("[zz::1]", ""),
        ("[::1", ""),
        ("[::1]x", ""),
        (":80", ""),
        ("", ""),
    ],
)
def test_http_host(host: str, expected: str) -> None:
    res, _ = stamped_ok(ipv4(http_request(host=host)))
    assert res.destination == Destination(expected, SERVER_V4, 80, "http")


def test_http_without_host_and_first_host_wins() -> None:
    assert stamped_ok(ipv4(http_request(host=None)))[0].destination.host == ""
    req = http_request(host="first.example", headers=(("host", "second.example"),))
    assert stamped_ok(ipv4(req))[0].destination.host == "first.example"


@pytest.mark.parametrize("build", [ipv4, ipv6], ids=["v4", "v6"])
def test_tls_sni_and_payload_untouched(build) -> None:
    pkt = build(client_hello(b"WWW.Example.ORG"), dport=443)
    res, out = stamped_ok(pkt)
    assert out == payload(pkt)
    server = SERVER_V4 if build is ipv4 else SERVER_V6
    assert res == Inspection(True, 0, 0, Destination("www.example.org", server, 443, "https"))
    assert not res.is_http


def test_tls_sni_after_other_extensions_and_without_sni() -> None:
    hello = client_hello(
        b"sni.example",
        extensions_before=extension(10, b"\x00\x02\x00\x1d") + extension(0xFE0D, bytes(200)),
        extensions_after=extension(43, b"\x02\x03\x04"),
    )
    assert run(ipv4(hello, dport=443))[0].destination.host == "sni.example"
    assert run(ipv4(client_hello(None), dport=443))[0].destination == Destination(
        "", SERVER_V4, 443, "https"
    )


def test_tls_sni_in_a_segment_shorter_than_the_record() -> None:
    hello = client_hello(b"split.example", extensions_after=extension(21, bytes(3000)))
    assert run(ipv4(hello[:1400], dport=443))[0].destination.host == "split.example"
    # the SNI itself cut: no host, still a ClientHello
    cut = client_hello(b"split.example")[:-4]
    assert run(ipv4(cut, dport=443))[0].destination.host == ""


@pytest.mark.parametrize(
    "hello",
    [
        client_hello(b"bad name.example"),
        client_hello(b""),
        client_hello(b"a" * 256),
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x03",  # truncated handshake
        b"\x16\x03\x01\xff\xff\x01\xff\xff\xff" + bytes(34) + b"\xff",  # session id past the end
        b"\x16\x03\x01\x00\x04\x01",  # record shorter than the handshake header
    ],
)
def test_tls_bad_or_truncated_sni(hello: bytes) -> None:
    res, _out = run(ipv4(hello, dport=443))
    assert res.destination.host == "" and res.destination.scheme == "https"


@pytest.mark.parametrize(
    "data",
    [
        b"\x17\x03\x03\x00\x10" + bytes(16),  # TLS application data
        b"\x16\x03\x03\x00\x10\x02" + bytes(15),  # ServerHello
        b"\x16\x02\x00\x00\x10\x01" + bytes(15),  # SSL 2-ish
        b"\x16\x03\x01\x00\x00",  # 5 bytes only
        bytes(range(256)),
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n",  # a response (wrong direction)
    ],
)
def test_plain_payloads_are_untouched(data: bytes) -> None:
    res, out = run(ipv4(data))
    assert res is PLAIN and out == ipv4(data)


def test_empty_payload_is_the_fast_path() -> None:
    for impl in IMPLS:
        assert impl.inspect(ipv4(b""), TAG) is PLAIN
        assert impl.inspect(ipv6(b""), TAG) is PLAIN


# --- Which packets are inspected -----------------------------------------------------


def _set(pkt: bytearray, off: int, value: bytes) -> bytearray:
    pkt = bytearray(pkt)
    pkt[off : off + len(value)] = value
    return pkt


REQ = http_request()
MALFORMED = {
    "empty": bytearray(),
    "one byte": bytearray(b"\x45"),
    "v4 short": ipv4(REQ)[:19],
    "v4 ihl 4": _set(ipv4(REQ), 0, b"\x44"),
    "v4 ihl past total": _set(ipv4(b""), 0, b"\x4f"),
    "v4 total past buffer": ipv4(REQ)[:-1],
    "v4 total below header": _set(ipv4(REQ), 2, b"\x00\x13"),
    "v4 udp": _set(ipv4(REQ), 9, b"\x11"),
    "v4 later fragment": ipv4(REQ, frag=0x0010),
    "v4 later fragment, MF": ipv4(REQ, frag=0x2001),
    "tcp header past end": _set(ipv4(b""), 2, b"\x00\x27"),
    "doff 4": _set(ipv4(REQ), 32, b"\x40"),
    "doff past end": _set(ipv4(b"abc"), 32, b"\xf0"),
    "version 5": _set(ipv4(REQ), 0, b"\x55"),
    "v6 short": ipv6(REQ)[:39],
    "v6 payload past buffer": ipv6(REQ)[:-1],
    "v6 udp": _set(ipv6(REQ), 6, b"\x11"),
    "v6 unknown ext (AH)": ipv6(REQ, ext=(51,)),
    "v6 later fragment": ipv6(REQ, ext=(FRAGMENT,), frag_offset=1),
    "v6 ext chain too long": ipv6(REQ, ext=(DSTOPTS,) * 9),
    "v6 tcp past payload length": _set(ipv6(b""), 4, b"\x00\x00"),
    "v6 ext length past end": _set(ipv6(REQ, ext=(HOPOPTS,)), 41, b"\xff"),
    "v6 fragment header cut": _set(ipv6(b"", ext=(FRAGMENT,)), 4, b"\x00\x07"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_is_skipped_untouched(name: str) -> None:
    pkt = MALFORMED[name]
    res, out = run(pkt)
    assert res is SKIPPED and out == pkt


@pytest.mark.parametrize(
    "ext",
    [
        (HOPOPTS,),
        (DSTOPTS,),
        (ROUTING,),
        (FRAGMENT,),
        (HOPOPTS, ROUTING, FRAGMENT, DSTOPTS),
        (DSTOPTS,) * 8,
    ],
)
def test_v6_extension_headers_are_walked(ext: tuple[int, ...]) -> None:
    res, out = stamped_ok(ipv6(http_request(), ext=ext))
    assert res.stamped == 1 and out.endswith(TAG + b"\r\nAccept: */*\r\n\r\n")


def test_v4_options_tcp_options_and_trailer() -> None:
    pkt = ipv4(
        http_request(), ip_options=b"\x01\x01\x01\x00", tcp_options=b"\x01\x01\x08\x0a" + bytes(8)
    )
    assert stamped_ok(pkt)[0].stamped == 1
    trailer = b"User-Agent: abcdefghijkl\r\n"
    res, out = run(ipv4(http_request(), trailer=trailer))
    assert res.stamped == 1 and out.endswith(trailer) and tcp_checksum_ok(out)


def test_first_v4_fragment_is_inspected() -> None:
    res, out = run(ipv4(http_request(), frag=0x2000))
    assert res.stamped == 1 and tcp_checksum_ok(out)


def test_wrong_checksum_stays_exactly_as_wrong() -> None:
    pkt = ipv4(http_request())
    pkt[36] ^= 0x5A  # checksum high byte
    res, out = run(pkt)
    assert res.stamped == 1
    assert tcp_sum(out) == tcp_sum(pkt) != 0xFFFF


def test_checksum_that_becomes_zero() -> None:
    # 0x0000 and 0xFFFF both stand for zero in one's complement: choose two UA bytes
    # so that the stamped packet's checksum is 0x0000, the value a recomputation
    # gives, which a careless incremental update would turn into 0xFFFF.
    def build(word: int) -> bytearray:
        ua = "a" + chr(word >> 8) + chr(word & 0xFF) + "gt-12345678"
        return ipv4(http_request(ua=ua))

    base = build(0x4141)
    word_at = base.index(b"aAAg") + 1
    assert (word_at - 20) % 2 == 0  # aligned on a 16-bit word of the segment
    _, stamped = run(base)
    ck = int.from_bytes(stamped[36:38])
    target = next(
        w
        for w in range(0x10000)
        if not {w >> 8, w & 0xFF} & {10, 13}
        and (~ck & 0xFFFF) + (~0x4141 & 0xFFFF) + w in (0xFFFF, 0x1FFFE, 0x2FFFD)
    )
    res, out = run(build(target))
    assert res.stamped == 1 and out[36:38] == b"\0\0" and tcp_checksum_ok(out)


# --- API -----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS, ids=["c", "py"])
@pytest.mark.parametrize(
    "tag", [b"", b"short", b"toolong12", b"bad tag!", b"abc\r\nxyz"[:8], b"\xff" * 8]
)
def test_bad_tag_is_refused(impl: ModuleType, tag: bytes) -> None:
    with pytest.raises(ValueError, match="session tag"):
        impl.inspect(ipv4(b""), tag)
    with pytest.raises(ValueError, match="session tag"):
        impl.inspect_batch(bytearray(), array("I"), tag)


def test_c_refuses_read_only_buffers() -> None:
    with pytest.raises(BufferError):
        hotpath.inspect(bytes(ipv4(http_request())), TAG)  # type: ignore[arg-type]


def test_c_accepts_a_memoryview_slice() -> None:
    buf = bytearray(b"xx") + ipv4(http_request()) + bytearray(b"yy")
    res = hotpath.inspect(memoryview(buf)[2:-2], TAG)
    assert (
        res.stamped == 1
        and buf.startswith(b"xx")
        and buf.endswith(TAG + b"\r\nAccept: */*\r\n\r\nyy")
    )


def _batch(packets: list[bytes], extra_spans: tuple[int, ...] = ()) -> tuple[bytearray, array]:
    buf, spans = bytearray(), array("I")
    for p in packets:
        spans += array("I", [len(buf) + 3, len(p)])
        buf += b"pad" + p
    return buf, spans + array("I", extra_spans)


def test_batch_equals_per_packet() -> None:
    packets = [
        ipv4(b""),
        ipv4(http_request(ua="agent-number-one")),
        MALFORMED["v4 ihl 4"],
        ipv6(client_hello(b"tls.example"), dport=443),
        ipv4(bytes(100)),
        ipv6(_cut(http_request(), b"User-Ag")),
        ipv4(http_request(host="second.example") * 2),
    ]
    buf, spans = _batch(packets, (len(_batch(packets)[0]), 1, 0xFFFFFFFF, 0xFFFFFFFF, 0, 0))
    py_buf = bytearray(buf)
    c_res = hotpath.inspect_batch(buf, spans, TAG)
    assert c_res == hotpath_py.inspect_batch(py_buf, spans, TAG)
    assert buf == py_buf
    singles = [run(p)[0] for p in packets]
    assert c_res.skipped == 1 + 3  # the malformed packet, the three bad spans
    assert c_res.stamped == sum(r.stamped for r in singles) == 3
    assert c_res.ua_missed == 1
    assert c_res.destinations == [r.destination for r in singles if r.destination]
    assert [d.host for d in c_res.destinations] == [
        "example.com",
        "tls.example",
        "example.com",
        "second.example",
    ]


def test_results_are_hashable_for_dedup() -> None:
    a = run(ipv4(http_request()))[0].destination
    b = run(ipv4(http_request(ua="other")))[0].destination
    assert {a, b} == {a}


# --- Differential (hypothesis) -------------------------------------------------------

UA_NAMES = st.sampled_from(["User-Agent", "user-agent", "USER-AGENT", "uSeR-aGeNt", "User-Agent "])
TOKENS = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
HEADER = st.one_of(
    st.tuples(UA_NAMES, TOKENS),
    st.tuples(
        st.sampled_from(["Host", "host", "HOST"]), TOKENS | st.sampled_from(["a.b:1", "[::1]:2"])
    ),
    st.tuples(
        st.sampled_from(["Content-Length", "content-length"]),
        st.sampled_from(["0", "3", "x", "0001", ""]),
    ),
    st.tuples(st.sampled_from(["Transfer-Encoding", "Accept", "X"]), TOKENS),
)


@st.composite
def http_payloads(draw) -> bytes:
    """Mostly valid pipelined requests, with some invalid request lines, odd
    headers, bodies, and half the time cut at a random point."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from(["GET", "GET", "POST", "HEAD", "M-SEARCH", "get"]))
        target = draw(st.sampled_from(["/", "*", "/a?b=c", "http://x/"]))
        version = draw(st.sampled_from(["1.1", "1.1", "1.0", "2"]))
        headers = draw(st.lists(HEADER, max_size=5))
        if draw(st.integers(0, 3)):
            ua = draw(st.tuples(UA_NAMES, TOKENS))
            headers.insert(draw(st.integers(0, len(headers))), ua)
        body = draw(st.binary(max_size=8))
        head = f"{method} {target} HTTP/{version}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers
        )
        out += head.encode() + b"\r\n" + body
    if draw(st.booleans()):
        out = out[: draw(st.integers(0, len(out)))]
    return out


@st.composite
def tls_payloads(draw) -> bytes:
    """ClientHellos with valid, invalid or no SNI, sometimes cut."""
    sni = draw(
        st.one_of(
            st.none(),
            st.binary(max_size=20),
            st.from_regex(rb"[a-zA-Z0-9.-]{1,30}", fullmatch=True),
            st.from_regex(rb"[a-zA-Z0-9.-]{1,30}", fullmatch=True),
        )
    )
    before = draw(st.lists(st.tuples(st.integers(1, 65535), st.binary(max_size=20)), max_size=3))
    hello = client_hello(
        sni,
        session_id=draw(st.binary(max_size=32)),
        extensions_before=b"".join(extension(k, d) for k, d in before),
    )
    if draw(st.integers(0, 3)) == 0:
        hello = hello[: draw(st.integers(0, len(hello)))]
    return hello


PAYLOADS = st.one_of(http_payloads(), http_payloads(), tls_payloads(), st.binary(max_size=64))


@st.composite
def packets(draw) -> bytearray:
    data = draw(PAYLOADS)
    if draw(st.booleans()):
        return ipv4(data, dport=draw(st.sampled_from([80, 443, 8080])))
    ext = tuple(draw(st.lists(st.sampled_from([HOPOPTS, ROUTING, FRAGMENT, DSTOPTS]), max_size=3)))
    return ipv6(data, ext=ext)


FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(packets())
@example(ipv4(http_request()))
def test_differential_well_formed(pkt: bytearray) -> None:
    res, out = run(pkt)
    assert res.inspected
    assert tcp_checksum_ok(out)
    assert out[: tcp_offsets(pkt)[0] + 16] == pkt[: tcp_offsets(pkt)[0] + 16]
    changed = [i for i in range(len(pkt)) if out[i] != pkt[i]]
    assert bool(changed) <= bool(res.stamped)


@FUZZ
@given(
    packets(), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4)
)
def test_differential_mutated(pkt: bytearray, flips: list[tuple[int, int]]) -> None:
    for pos, value in flips:
        if pos < len(pkt):
            pkt[pos] = value
    run(pkt)


@FUZZ
@given(st.binary(max_size=120), st.sampled_from([b"\x45", b"\x46", b"\x4f", b"\x60", b""]))
def test_differential_random_bytes(data: bytes, first: bytes) -> None:
    run(first + data)


@FUZZ
@given(st.lists(packets(), max_size=5), st.lists(st.integers(0, 2**32 - 1), max_size=4))
def test_differential_batch(pkts: list[bytearray], junk: list[int]) -> None:
    buf, spans = _batch([bytes(p) for p in pkts], tuple(junk[: len(junk) // 2 * 2]))
    py_buf = bytearray(buf)
    assert hotpath.inspect_batch(buf, spans, TAG) == hotpath_py.inspect_batch(py_buf, spans, TAG)
    assert buf == py_buf


def test_batches_with_seen_report_each_destination_once() -> None:
    """A session's ``seen`` record: C and the twin report a destination the first
    time only, count every stamp, and stop remembering at SEEN_LOAD."""
    hosts = [f"h{i}.example" for i in range(hotpath.SEEN_LOAD + 40)]
    pkts = [ipv4(http_request(host=h)) for h in hosts] * 2
    results = []
    for impl in IMPLS:
        seen = impl.new_seen()
        first = [impl.inspect_batch(*_batch([bytes(p) for p in pkts[i:i + 64]], ()), TAG, seen)
                 for i in range(0, len(pkts), 64)]
        results.append(first)
        reported = [d.host for r in first for d in r.destinations]
        # Every host once while there is room, and the ones past SEEN_LOAD twice.
        assert len(reported) == len(hosts) + (len(hosts) - hotpath.SEEN_LOAD)
        assert sum(r.stamped for r in first) == len(pkts)
    assert results[0] == results[1]


def test_tag_alphabet_is_url_safe_base64() -> None:
    for raw in (bytes(6), b"\xff" * 6, b"\xfb\xef\xbe" * 2):
        tag = base64.urlsafe_b64encode(raw)
        for impl in IMPLS:
            assert impl.inspect(ipv4(http_request()), tag).stamped == 1
