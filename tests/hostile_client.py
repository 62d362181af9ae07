"""Hostile clients for tests/test_e2e_hostile.py, run inside a client namespace:
``python hostile_client.py SCENARIO HOST PORT``. Prints one line: what happened."""

from __future__ import annotations

import re
import socket
import ssl
import sys
import time

# The never-reading client's receive buffer: small, so the relay's replies pile
# up on the relay's side rather than in this client's kernel.
NON_READER_RCVBUF = 4096
# DPD requests carry a payload the relay echoes; 1 KiB each fills its queue fast.
DPD_PAYLOAD = b"d" * 1024
# How long a stalling client waits for the relay to close on it: far past any
# deadline the tests configure, so a missed deadline shows as "still open".
STALL_WAIT_S = 30


def tls(host: str, port: int, rcvbuf: int | None = None) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the window scale follows it
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(10)
    raw.connect((host, port))
    return ctx.wrap_socket(raw)


def read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (OSError, ssl.SSLError):
        pass
    return out


def wait_for_close(s: socket.socket, started: float) -> str:
    """Read until the relay closes the connection or STALL_WAIT_S pass; say which,
    and after how long (from ``started``: the TCP connect)."""
    try:
        while s.recv(65536):
            pass
        outcome = "closed"
    except TimeoutError:
        outcome = "still open"
    except (OSError, ssl.SSLError):
        outcome = "closed"
    return f"{outcome} after {time.monotonic() - started:.2f} s"


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
        s = socket.create_connection((host, port), timeout=STALL_WAIT_S)
        return wait_for_close(s, time.monotonic())
    if scenario == "login-stall":  # TLS, then nothing: the login deadline
        started = time.monotonic()
        s = tls(host, port)
        s.settimeout(STALL_WAIT_S)
        return wait_for_close(s, started)
    if scenario == "half-hello":  # stop in the middle of the ClientHello
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        s.shutdown(socket.SHUT_WR)
        return f"closed after {len(read_all(s))} bytes"
    if scenario.startswith("dpd-flood"):  # dpd-flood:BYTES
        return dpd_flood(host, port, int(scenario.split(":")[1]))
    s = tls(host, port)
    if scenario == "wrong-path":
        s.sendall(b"GET /admin/config.php HTTP/1.1\r\nHost: relay\r\n\r\n")
    elif scenario == "non-ascii-target":
        s.sendall(b"GET /\xff HTTP/1.1\r\nHost: relay\r\n\r\n")
    elif scenario == "bad-authority":  # urlsplit: "Invalid IPv6 URL"
        s.sendall(b"GET //[x HTTP/1.1\r\nHost: relay\r\n\r\n")
    elif scenario == "hostile-strings":
        hostile_strings(s)
    elif scenario == "oversized-header":
        s.sendall(b"GET / HTTP/1.1\r\nX-Fill: " + b"a" * 70000 + b"\r\n\r\n")
    elif scenario == "truncated-header":
        s.sendall(b"POST /auth HTTP/1.1\r\nContent-Length: 500\r\n\r\n<config-auth")
        s.shutdown(socket.SHUT_WR)
    elif scenario == "bad-cstp":
        open_tunnel(s)
        s.sendall(b"STF\x01\x00\x10\x00\x00" + b"\x45" * 16 + b"JUNK\xff\xff\x00\x00")
    elif scenario == "bad-cookie":
        s.sendall(b"CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nCookie: webvpn=forged\r\n\r\n")
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    status = read_all(s).split(b"\r\n", 1)[0].decode(errors="replace")
    return f"closed, reply {status!r}"


def open_tunnel(s: ssl.SSLSocket, headers: str = "") -> None:
    cookie = login(s)
    s.sendall(f"CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nCookie: webvpn={cookie}\r\n{headers}\r\n"
              .encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200 CONNECTED"), head


def hostile_strings(s: ssl.SSLSocket) -> None:
    """A session whose client declares itself with control, bidi and other
    format characters, and leaves with a terminal escape and a fake line."""
    init = (b'<config-auth client="vpn" type="init"><version who="vpn">&#x202E;v9&#x2066;.1'
            b'</version><device-id unique-id="&#x200B;dev&#xFEFF;id">linux&#x202A;-64'
            b"</device-id></config-auth>")
    s.sendall(b"POST / HTTP/1.1\r\nUser-Agent: Evil\tAgent\r\nContent-Length: %d\r\n\r\n"
              % len(init) + init)
    reply = b""
    while b"</config-auth>" not in reply:
        reply += s.recv(65536)
    open_tunnel(s, "X-CSTP-Hostname: host\tname\r\n")
    reason = b"\xb0" + "bye\x1b[2J\u202eevil\r\nforged".encode()
    s.sendall(b"STF\x01" + len(reason).to_bytes(2, "big") + b"\x05\x00" + reason)


def dpd_flood(host: str, port: int, limit: int) -> str:
    """A tunnel, then DPD requests as fast as TCP takes them, never reading the
    answers, until the relay closes the connection or ``limit`` bytes are sent."""
    s = tls(host, port, rcvbuf=NON_READER_RCVBUF)
    open_tunnel(s)
    dpd = b"STF\x01" + len(DPD_PAYLOAD).to_bytes(2, "big") + b"\x03\x00" + DPD_PAYLOAD
    chunk = dpd * 64
    sent = 0
    try:
        while sent < limit:
            s.sendall(chunk)
            sent += len(chunk)
    except (OSError, ssl.SSLError) as exc:
        return f"closed after sending {sent} bytes ({type(exc).__name__})"
    return f"sent {sent} bytes, still open"


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2], int(sys.argv[3])), flush=True)
