"""Floods for tests/test_e2e_abuse.py, run inside a client namespace.

``python flood_client.py cycles N HOST PORT``: N TLS connect/disconnect cycles;
prints JSON {"completed": handshakes done, "refused": connections reset or closed}.

``python flood_client.py stall N HOST PORT SRC...``: N TCP connections spread
over the source addresses, sending half a ClientHello and nothing more; holds them
until its standard input is closed; prints JSON {"opened": ..., "refused": ...,
"alive_after_hold": connections the relay had not closed by then}.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys


def cycles(n: int, host: str, port: int) -> dict[str, int]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    out = {"completed": 0, "refused": 0}
    for _ in range(n):
        try:
            with socket.create_connection((host, port), timeout=5) as raw, \
                    ctx.wrap_socket(raw) as s:
                s.sendall(b"GET / HTTP/1.1\r\n\r\n")
                s.recv(100)
            out["completed"] += 1
        except (OSError, ssl.SSLError):
            out["refused"] += 1
    return out


def stall(n: int, host: str, port: int, sources: list[str]) -> dict[str, int]:
    socks, refused = [], 0
    for i in range(n):
        s = socket.socket()
        s.settimeout(5)
        s.bind((sources[i % len(sources)], 0))
        try:
            s.connect((host, port))
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            socks.append(s)
        except OSError:
            refused += 1
            s.close()
    sys.stdin.read()  # held until the test closes our standard input
    # Connections the relay has closed meanwhile read EOF or fail.
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            alive += s.recv(1) == b"" and 0
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
        s.close()
    return {"opened": len(socks), "refused": refused, "alive_after_hold": alive}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "cycles":
        result = cycles(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        result = stall(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5:])
    print(json.dumps(result), flush=True)
