"""Hostile clients for tests/test_e2e_hostile.py, run inside a client namespace:
``python hostile_client.py SCENARIO HOST PORT``. Prints one line: what happened."""

from __future__ import annotations

import re
import socket
import ssl
import sys
import time


def tls(host: str, port: int) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = ctx.wrap_socket(socket.create_connection((host, port), timeout=10))
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (OSError, ssl.SSLError):
        pass
    return out


def login(s: ssl.SSLSocket) -> str:
    body = (b'<config-auth client="vpn" type="auth-reply"><auth><username>x</username>'
            b"<password>y</password></auth></config-auth>")
    s.sendall(b"POST /auth HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    head = b""
    while b"</config-auth>" not in head:
        head += s.recv(65536)
    return re.search(rb"webvpn=([^;\r\n]+)", head).group(1).decode()


def main(scenario: str, host: str, port: int) -> str:
    if scenario == "tls-garbage":
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"\x16\x03\x01\x00\x05garbagegarbage" * 10)
        return f"closed after {len(read_all(s))} bytes"
    if scenario == "plain-http":
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        return f"closed after {len(read_all(s))} bytes"
    if scenario == "stall":  # TCP connect, then nothing: the handshake deadline
        s = socket.create_connection((host, port), timeout=30)
        started = time.monotonic()
        read_all(s)
        return f"closed after {time.monotonic() - started:.1f} s"
    if scenario == "half-hello":  # stop in the middle of the ClientHello
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        s.shutdown(socket.SHUT_WR)
        return f"closed after {len(read_all(s))} bytes"
    s = tls(host, port)
    if scenario == "wrong-path":
        s.sendall(b"GET /admin/config.php HTTP/1.1\r\nHost: relay\r\n\r\n")
    elif scenario == "oversized-header":
        s.sendall(b"GET / HTTP/1.1\r\nX-Fill: " + b"a" * 70000 + b"\r\n\r\n")
    elif scenario == "truncated-header":
        s.sendall(b"POST /auth HTTP/1.1\r\nContent-Length: 500\r\n\r\n<config-auth")
        s.shutdown(socket.SHUT_WR)
    elif scenario == "bad-cstp":
        cookie = login(s)
        s.sendall(f"CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nCookie: webvpn={cookie}\r\n\r\n"
                  .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 CONNECTED"), head
        s.sendall(b"STF\x01\x00\x10\x00\x00" + b"\x45" * 16 + b"JUNK\xff\xff\x00\x00")
    elif scenario == "bad-cookie":
        s.sendall(b"CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nCookie: webvpn=forged\r\n\r\n")
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    status = read_all(s).split(b"\r\n", 1)[0].decode(errors="replace")
    return f"closed, reply {status!r}"


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2], int(sys.argv[3])), flush=True)
