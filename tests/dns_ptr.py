"""A name server for the tests, run inside a test namespace:
``python dns_ptr.py BIND_IP IP=NAME...`` answers the reverse (PTR) query of each IP
with its NAME, and every other query with NXDOMAIN (RFC 1035 section 4)."""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys

DNS_PORT = 53
TYPE_PTR = 12
CLASS_IN = 1
TTL_S = 60
FLAGS_ANSWER = 0x8180  # response, recursion desired and available, no error
FLAGS_NXDOMAIN = 0x8183
POINTER_TO_QUESTION = 0xC00C  # the name at offset 12: the question's


def encode_name(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"


def answer(query: bytes, names: dict[str, str]) -> bytes:
    labels, pos = [], 12
    while query[pos]:
        labels.append(query[pos + 1:pos + 1 + query[pos]].decode("ascii"))
        pos += 1 + query[pos]
    question = query[12:pos + 5]  # the name, its type and class
    (qtype,) = struct.unpack_from("!H", query, pos + 1)
    name = names.get(".".join(labels).lower()) if qtype == TYPE_PTR else None
    if name is None:
        return query[:2] + struct.pack("!HHHHH", FLAGS_NXDOMAIN, 1, 0, 0, 0) + question
    rdata = encode_name(name)
    return (query[:2] + struct.pack("!HHHHH", FLAGS_ANSWER, 1, 1, 0, 0) + question
            + struct.pack("!HHHIH", POINTER_TO_QUESTION, TYPE_PTR, CLASS_IN, TTL_S, len(rdata))
            + rdata)


def main(bind: str, pairs: list[str]) -> None:
    names = {ipaddress.ip_address(ip).reverse_pointer: name
             for ip, name in (pair.split("=", 1) for pair in pairs)}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, DNS_PORT))
    print("listening", flush=True)
    while True:
        query, peer = sock.recvfrom(512)
        sock.sendto(answer(query, names), peer)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
