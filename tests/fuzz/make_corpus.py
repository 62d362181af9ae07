"""Write the seed corpora of the C fuzzers into tests/fuzz/corpus/TARGET/ (or
DIR/TARGET/).

hotpath: each seed is a mode byte (0: one packet for relay_hp_inspect, 1:
relay_hp_scan, see hotpath_fuzz.c) followed by the data. The seeds cover what
the issue lists: truncated headers, bogus IHL and data offsets, IPv6 extension
headers, zero-length payloads, pipelined HTTP, split User-Agent, TLS ClientHello
with SNI, and garbage.

blockcodec: a mode byte (0: an encoded block to decode, 1: records to encode,
see blockcodec_fuzz.c) followed by blocks the C encoder makes from synthetic
records (tests/packetlog_synth.py), cut, padded and with impossible counts, or
the records themselves.

ovpn: a mode byte (0: open a batch, 1: open a TCP stream, 2: UDP runs, 3: seal
and open again, see ovpn_fuzz.c), a count byte and the data: genuine data packets
the client seals with the harness's keys (both ciphers, data, ping, OCC exit, the
same one twice), cut, with a bad tag or of another key, framed for TCP with a
control frame between, and payloads to seal.

Deterministic: tests/test_cext_fuzz.py checks that the committed corpora are
what this script writes.

    python tests/fuzz/make_corpus.py [DIR]
"""

from __future__ import annotations

import random
import struct
import sys
from array import array
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hotpath_packets import (  # noqa: E402 - after the path set-up
    DSTOPTS,
    FRAGMENT,
    HOPOPTS,
    ROUTING,
    client_hello,
    extension,
    http_request,
    ipv4,
    ipv6,
)
from packetlog_synth import make_records, to_c  # noqa: E402

from relay.cext import ffi, lib  # noqa: E402
from relay.protocols.openvpn.datachannel import PyDataChannel  # noqa: E402
from relay.protocols.openvpn.keys import DataKeys  # noqa: E402
from relay.protocols.openvpn.wire import OCC_EXIT, OCC_MAGIC, PING_MAGIC  # noqa: E402

ONE, SCAN = b"\0", b"\1"


def _set(pkt: bytes, off: int, value: bytes) -> bytes:
    return pkt[:off] + value + pkt[off + len(value) :]


def packets() -> dict[str, bytes]:
    req = http_request(ua="Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0")
    body = b"User-Agent: in-body\r\n\r\nGET / HTTP/1.1\r\n"
    pipelined = (
        http_request("GET", "/a")
        + http_request("POST", "/b", body=body)
        + http_request("GET", "/c", ua_name="user-agent", ua="lower")
    )
    hello = client_hello(b"www.example.org")
    rng = random.Random(4)
    v4 = bytes(ipv4(req))
    return {
        "v4-http": v4,
        "v6-http": bytes(ipv6(req)),
        "v4-http-lowercase-ua": bytes(ipv4(http_request(ua_name="user-agent"))),
        "v4-http-short-ua": bytes(ipv4(http_request(ua="abc"))),
        "v4-http-empty-ua": bytes(ipv4(http_request(ua=""))),
        "v4-http-pipelined": bytes(ipv4(pipelined)),
        "v4-http-chunked": bytes(
            ipv4(http_request("POST", headers=(("Transfer-Encoding", "chunked"),)) + req)
        ),
        "v4-http-split-ua-value": bytes(ipv4(req[: req.index(b"Linux")])),
        "v4-http-split-ua-name": bytes(ipv4(req[: req.index(b"-Agent")])),
        "v4-http-split-at-crlf": bytes(ipv4(req[: req.index(b"User-Agent")])),
        "v4-http-split-request-line": bytes(ipv4(req[:9])),
        "v4-http-host-port": bytes(ipv4(http_request(host="Example.COM:8080"))),
        "v4-http-host-ipv6": bytes(ipv4(http_request(host="[2001:db8::1]:80"))),
        "v4-http-port-8080": bytes(ipv4(req, dport=8080)),
        "v4-tls-sni": bytes(ipv4(hello, dport=443)),
        "v6-tls-sni": bytes(ipv6(hello, dport=443)),
        "v4-tls-no-sni": bytes(ipv4(client_hello(None), dport=443)),
        "v4-tls-sni-after-padding": bytes(
            ipv4(client_hello(b"a.example", extensions_before=extension(21, bytes(300))))
        ),
        "v4-tls-truncated": bytes(ipv4(hello[:60], dport=443)),
        "v4-tls-bogus-lengths": bytes(ipv4(_set(hello, 3, b"\xff\xff"), dport=443)),
        "v4-empty-payload": bytes(ipv4(b"")),
        "v6-empty-payload": bytes(ipv6(b"")),
        "v4-truncated-10": v4[:10],
        "v4-truncated-19": v4[:19],
        "v4-truncated-39": v4[:39],
        "v4-ihl-0": _set(v4, 0, b"\x40"),
        "v4-ihl-4": _set(v4, 0, b"\x44"),
        "v4-ihl-15": _set(v4, 0, b"\x4f"),
        "v4-total-past-buffer": _set(v4, 2, b"\xff\xff"),
        "v4-doff-0": _set(v4, 32, b"\x00"),
        "v4-doff-4": _set(v4, 32, b"\x40"),
        "v4-doff-15": _set(v4, 32, b"\xf0"),
        "v4-fragment": bytes(ipv4(req, frag=0x2000)),
        "v4-later-fragment": bytes(ipv4(req, frag=0x0010)),
        "v6-hopopts": bytes(ipv6(req, ext=(HOPOPTS,))),
        "v6-ext-chain": bytes(ipv6(req, ext=(HOPOPTS, ROUTING, FRAGMENT, DSTOPTS))),
        "v6-ext-8": bytes(ipv6(req, ext=(DSTOPTS,) * 8)),
        "v6-ext-9": bytes(ipv6(req, ext=(DSTOPTS,) * 9)),
        "v6-ext-unknown": bytes(ipv6(req, ext=(51,))),
        "v6-later-fragment": bytes(ipv6(req, ext=(FRAGMENT,), frag_offset=3)),
        "v6-ext-length-past-end": _set(bytes(ipv6(req, ext=(HOPOPTS,))), 41, b"\xff"),
        "v6-truncated-39": bytes(ipv6(req))[:39],
        "garbage-random": bytes(rng.randrange(256) for _ in range(200)),
        "garbage-ff": b"\xff" * 64,
        "garbage-ssh": bytes(ipv4(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", dport=22)),
        "garbage-tls-appdata": bytes(ipv4(b"\x17\x03\x03\x00\x20" + bytes(32), dport=443)),
    }


def seeds() -> dict[str, bytes]:
    out = {name: ONE + data for name, data in packets().items()}
    a, b = packets()["v4-http-pipelined"], packets()["v6-tls-sni"]
    spans = struct.pack("=8I", 0, len(a), len(a), len(b), len(a) + len(b), 40, 0xFFFFFFFF, 1)
    out["scan-mixed"] = SCAN + b"\x04" + spans + a + b
    return out


def _block(n: int, sessions: int) -> bytes:
    recs = to_c(make_records(n, sessions=sessions)) if n else ffi.NULL
    cap = lib.relay_block_bound(n)
    buf = ffi.new("uint8_t[]", cap)
    size = lib.relay_block_encode(recs, n, buf, cap)
    assert size > 0
    return bytes(ffi.buffer(buf, size))


def block_seeds() -> dict[str, bytes]:
    decode, encode = b"\0", b"\1"
    web = _block(40, 4)  # IPv4 and IPv6 clients, several flows
    return {
        "block-empty": decode + _block(0, 1),
        "block-one": decode + _block(1, 1),
        "block-web": decode + web,
        "block-cut": decode + web[:len(web) // 2],
        "block-trailing-byte": decode + web + b"\0",
        "block-version-2": decode + b"\2" + web[1:],
        "block-count-huge": decode + b"\1\xff\xff\xff\xff\x0f" + web[2:],
        "records-web": encode + bytes(ffi.buffer(to_c(make_records(6, sessions=2)))),
    }


def ovpn_keys(cipher: str, send: int, recv: int) -> DataKeys:
    """ovpn_fuzz.c's key(): each byte repeated, the implicit IV the next byte."""
    return DataKeys(cipher, bytes([send]) * 32, bytes([send + 1]) * 8, bytes([recv]) * 32,
                    bytes([recv + 1]) * 8)


def ovpn_seeds() -> dict[str, bytes]:
    client = PyDataChannel()  # what the harness's server keys open
    client.install(0, ovpn_keys("AES-256-GCM", 0x11, 0x55))
    client.install(1, ovpn_keys("CHACHA20-POLY1305", 0x33, 0x77))

    def sealed(key_id: int, payload: bytes) -> bytes:
        out = client.seal(key_id, 7, payload, array("I", (0, len(payload))), tcp=False)
        return bytes(out.data[:out.size])

    ip = bytes(ipv4(http_request()))
    pkts = [sealed(0, ip), sealed(1, ip), sealed(0, PING_MAGIC),
            sealed(1, OCC_MAGIC + bytes([OCC_EXIT]))]
    bad_tag = bytearray(sealed(0, ip))
    bad_tag[10] ^= 1

    def batch(items: list[bytes]) -> bytes:
        spans, pos = b"", 0
        for p in items:
            spans += struct.pack("=2I", pos, len(p))
            pos += len(p)
        return bytes([len(items)]) + spans + b"".join(items)

    def framed(items: list[bytes]) -> bytes:
        return b"".join(struct.pack("!H", len(p)) + p for p in items)

    control = bytes([4 << 3]) + bytes(13)
    addrs = b"\x01\x02\x03\x04" * 3 + b"\x05\x06\x07\x08"
    runs = [pkts[0], pkts[2], control, pkts[1]]
    return {
        "open-genuine": b"\0" + batch(pkts),
        "open-replay-cut-forged": b"\0" + batch([pkts[0], pkts[0], pkts[1][:30],
                                                 bytes(bad_tag), bytes([9 << 3 | 5]) + ip]),
        "stream-genuine": b"\1\0" + framed([pkts[0], pkts[2], control, pkts[1]]),
        "stream-cut": b"\1\0" + framed(pkts)[:-7],
        "runs": b"\2" + batch(runs)[:1 + 8 * len(runs)] + addrs + b"".join(runs),
        "seal": b"\3\3\1" + struct.pack("=6I", 0, 40, 10, 0, 40, 100) + ip,
    }


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else HERE / "corpus"
    for target, corpus in (("hotpath", seeds()), ("blockcodec", block_seeds()),
                           ("ovpn", ovpn_seeds())):
        outdir = root / target
        outdir.mkdir(parents=True, exist_ok=True)
        for name, data in corpus.items():
            (outdir / name).write_bytes(data)


if __name__ == "__main__":
    main(sys.argv[1:])
