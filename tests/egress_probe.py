"""Reachability probes for tests/test_e2e_egress.py, run inside a test namespace.

``python egress_probe.py listen LABEL PORT...``: accept TCP connections on every
address of the namespace on each port, answer each with ``LABEL`` and close.

``python egress_probe.py probe TIMEOUT TARGET...``: try every ``IP:PORT`` target at
once (TCP connect, then read the answer); prints JSON {target: the label that
answered, or "timeout", "refused", or the error}. A target ``udp:IP:PORT`` gets
one datagram (for addresses nothing can answer from, such as multicast groups);
its result is "sent".
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

# Bytes of a listener's answer read back; labels are short namespace names.
ANSWER_MAX = 64


def listen(label: str, ports: list[int]) -> None:
    def serve(port: int) -> None:
        with socket.create_server(("0.0.0.0", port)) as srv:
            while True:
                conn, _ = srv.accept()
                with conn:
                    conn.sendall(label.encode())

    threads = [threading.Thread(target=serve, args=(p,), daemon=True) for p in ports]
    for t in threads:
        t.start()
    print("listening", flush=True)
    for t in threads:
        t.join()


def probe_one(target: str, timeout: float) -> str:
    if target.startswith("udp:"):
        _, ip, port = target.split(":")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"egress probe", (ip, int(port)))
        return "sent"
    ip, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((ip, int(port)), timeout=timeout) as s:
            return s.recv(ANSWER_MAX).decode() or "closed"
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return exc.strerror or str(exc)


def main() -> None:
    if sys.argv[1] == "listen":
        listen(sys.argv[2], [int(p) for p in sys.argv[3:]])
    else:
        timeout, targets = float(sys.argv[2]), sys.argv[3:]
        with ThreadPoolExecutor(len(targets)) as pool:
            results = pool.map(lambda t: probe_one(t, timeout), targets)
            print(json.dumps(dict(zip(targets, results, strict=True))))


if __name__ == "__main__":
    main()
