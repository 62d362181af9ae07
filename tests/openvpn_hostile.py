"""Hostile OpenVPN peers for tests/test_e2e_openvpn_hostile.py, run inside a test
namespace (forging needs raw sockets):

``python openvpn_hostile.py resets --dst IP:PORT --src CIDR|IP:PORT --count N [--sources M]
[--iface eth0] [--interval S] [--quiet S]``
    sends N ``P_CONTROL_HARD_RESET_CLIENT_V2`` datagrams, each with a new random
    session id, from forged sources (IP_HDRINCL): the first M addresses of CIDR (in
    turn, each with a port of its own), or the one IP:PORT. A packet socket on
    ``iface`` records every datagram between the forged sources and DST as it
    crosses the interface, until QUIET seconds pass without a reset either way.
    Prints one JSON object: ``requests`` and ``replies``, lists of [ip, port, UDP
    payload bytes, opcode].

``python openvpn_hostile.py dns-log --bind IP --out FILE``
    a name server that never answers: writes the name of every query to FILE.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import select
import socket
import struct
import time
from pathlib import Path

# Only an ETH_P_ALL packet socket sees the frames the host sends, not just those it
# receives (packet(7)).
ETH_P_ALL = 0x0003
ETHERTYPE_IPV4 = b"\x08\x00"
ETH_HLEN = 14
OPCODE_SHIFT = 3
HARD_RESET_CLIENT_V2 = 7
HARD_RESET_SERVER_V2 = 8
# A packet socket receive buffer big enough for a burst of replies.
CAPTURE_RCVBUF = 8 * 1024 * 1024


def reset(session_id: bytes) -> bytes:
    """opcode/key id 0, session id, no ACKs, packet id 0: the stock client's 14 bytes."""
    return bytes([HARD_RESET_CLIENT_V2 << OPCODE_SHIFT]) + session_id + b"\0" + bytes(4)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def datagram(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 header and a UDP header (with its checksum) around ``payload``."""
    s, d = socket.inet_aton(src[0]), socket.inet_aton(dst[0])
    udp_len = 8 + len(payload)
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
    udp = struct.pack("!HHHH", src[1], dst[1], udp_len, 0) + payload
    udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, random.randrange(65536), 0,
                     64, socket.IPPROTO_UDP, 0, s, d)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + udp


def parse(frame: bytes) -> tuple[tuple[str, int], tuple[str, int], bytes] | None:
    """(source, destination, UDP payload) of an IPv4 UDP frame, else None."""
    ip = frame[ETH_HLEN:]
    if (frame[12:14] != ETHERTYPE_IPV4 or len(ip) < 28 or ip[0] >> 4 != 4
            or ip[9] != socket.IPPROTO_UDP):
        return None
    ihl = (ip[0] & 0x0F) * 4
    sport, dport, length = struct.unpack_from("!HHH", ip, ihl)
    payload = ip[ihl + 8:ihl + length]
    return ((socket.inet_ntoa(ip[12:16]), sport), (socket.inet_ntoa(ip[16:20]), dport), payload)


def sources(spec: str, n: int) -> list[tuple[str, int]]:
    if "/" not in spec:
        ip, port = spec.rsplit(":", 1)
        return [(ip, int(port))]
    hosts = ipaddress.ip_network(spec).hosts()
    return [(str(next(hosts)), random.randrange(1024, 65536)) for _ in range(n)]


def resets(args: argparse.Namespace) -> dict[str, object]:
    dst_ip, dst_port = args.dst.rsplit(":", 1)
    dst = (dst_ip, int(dst_port))
    forged = sources(args.src, args.sources)
    forged_set = set(forged)
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    cap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CAPTURE_RCVBUF)
    cap.bind((args.iface, ETH_P_ALL))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    requests: list[list[object]] = []
    replies: list[list[object]] = []

    def drain(until: float) -> bool:
        """Record what crosses the interface until then; False if no reset did
        (a live client's own traffic does not keep the capture going)."""
        got = False
        while (left := until - time.monotonic()) > 0:
            if not select.select([cap], [], [], left)[0]:
                break
            parsed = parse(cap.recv(65536))
            if parsed is None:
                continue
            src, to, payload = parsed
            opcode = payload[0] >> OPCODE_SHIFT if payload else -1
            if src in forged_set and to == dst:
                requests.append([*src, len(payload), opcode])
            elif src == dst and to in forged_set:
                replies.append([*to, len(payload), opcode])
            else:
                continue
            got = got or opcode in (HARD_RESET_CLIENT_V2, HARD_RESET_SERVER_V2)
        return got

    for i in range(args.count):
        src = forged[i % len(forged)]
        raw.sendto(datagram(src, dst, reset(os.urandom(8))), (dst[0], 0))
        drain(time.monotonic() + args.interval)
    # Until QUIET seconds pass without a packet: longer than the relay's
    # retransmission timeout, so a retransmission would be seen.
    while drain(time.monotonic() + args.quiet):
        pass
    return {"requests": requests, "replies": replies}


def dns_log(args: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.bind, 53))
    with Path(args.out).open("a") as out:
        while True:
            query = sock.recv(512)
            labels, pos = [], 12
            while pos < len(query) and query[pos]:
                labels.append(query[pos + 1:pos + 1 + query[pos]].decode("ascii", "replace"))
                pos += 1 + query[pos]
            out.write(".".join(labels) + "\n")
            out.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("resets")
    p.add_argument("--dst", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--sources", type=int, default=1)
    p.add_argument("--iface", default="eth0")
    # Paced so that neither the relay's socket buffer nor ours overflows.
    p.add_argument("--interval", type=float, default=0.002)
    p.add_argument("--quiet", type=float, default=5.0)
    p = sub.add_parser("dns-log")
    p.add_argument("--bind", required=True)
    p.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.command == "resets":
        print(json.dumps(resets(args)))
    else:
        dns_log(args)


if __name__ == "__main__":
    main()
