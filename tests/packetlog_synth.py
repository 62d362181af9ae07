"""Synthetic but realistic TCP header records for the packet-log tests and the
drain benchmark: sessions opening connections that do a request and a download
of full-size segments with delayed ACKs, as web traffic through the relay does."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

from relay import sessionid
from relay.cext import ffi

SYN, ACK, FIN, PSH = 0x02, 0x10, 0x01, 0x08
MSS = 1448  # 1500-byte MTU minus IPv4, TCP and the timestamp option


def _addr(text: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(text)
    return ip.version, ip.packed.ljust(16, b"\0")


def make_records(count: int, sessions: int = 4, seed: int = 1,
                 start_ns: int = 1_700_000_000 * 10**9) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    sess = []
    for i in range(sessions):
        fam, cip = _addr(f"198.18.{i + 1}.2" if i % 2 == 0 else f"2001:db8:{i}::2")
        sess.append({"session_id": rnd.randbytes(sessionid.RAW_LEN), "client_family": fam,
                     "client_ip": cip, "client_port": 40000 + i, "virtual": f"10.211.0.{i + 2}"})
    out: list[dict[str, Any]] = []
    t = start_ns
    while len(out) < count:
        s = rnd.choice(sess)
        fam, vip = _addr(s["virtual"])
        _, rip = _addr(f"93.184.{rnd.randrange(256)}.{rnd.randrange(1, 255)}")
        cport, rport = rnd.randrange(32768, 61000), rnd.choice((80, 443))
        cseq, rseq = rnd.getrandbits(32), rnd.getrandbits(32)

        def rec(direction: int, flags: int, seq: int, ack: int, length: int,
                window: int, s: dict[str, Any] = s, vip: bytes = vip, rip: bytes = rip,
                cport: int = cport, rport: int = rport, fam: int = fam) -> None:
            nonlocal t
            t += rnd.randrange(1_000, 80_000)
            src, dst, sp, dp = (vip, rip, cport, rport) if direction == 0 else \
                (rip, vip, rport, cport)
            out.append({"time_ns": t, "session_id": s["session_id"], "rflags": 0,
                        "client_family": s["client_family"], "client_ip": s["client_ip"],
                        "client_port": s["client_port"], "direction": direction,
                        "family": fam, "src_ip": src, "dst_ip": dst, "src_port": sp,
                        "dst_port": dp, "tcp_flags": flags, "payload_len": length,
                        "window": window, "seq": seq & 0xFFFFFFFF, "ack": ack & 0xFFFFFFFF})

        rec(0, SYN, cseq, 0, 0, 64240)
        rec(1, SYN | ACK, rseq, cseq + 1, 0, 65160)
        cseq += 1
        rseq += 1
        rec(0, ACK, cseq, rseq, 0, 502)
        req = rnd.randrange(200, 600)
        rec(0, PSH | ACK, cseq, rseq, req, 502)
        cseq += req
        for k in range(rnd.randrange(2, 60)):
            rec(1, ACK, rseq, cseq, MSS, 509)
            rseq += MSS
            if k % 2:
                rec(0, ACK, cseq, rseq, 0, 502 + k)
        rec(0, FIN | ACK, cseq, rseq, 0, 502)
        rec(1, FIN | ACK, rseq, cseq + 1, 0, 509)
        rec(0, ACK, cseq + 1, rseq + 1, 0, 502)
    return out[:count]


def to_c(records: list[dict[str, Any]]) -> Any:
    arr = ffi.new("struct relay_record[]", len(records))
    for i, r in enumerate(records):
        c = arr[i]
        for k, v in r.items():
            setattr(c, k, v)
    return arr
