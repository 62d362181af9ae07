"""The relay directory's list: HTTPS list requests per second, ``relay directory``
against nginx serving the same CSV as a static file.

Both listen on loopback with the same certificate (EC P-256), answer one request
per connection (the directory always closes; nginx with ``keepalive_timeout 0``),
run one worker (the directory is one process), and log every request (nginx's
access log is buffered by the kernel; the directory writes and fdatasyncs an access
record each, as the issue asks). The list holds :data:`RELAYS` registered relays,
each row with its ``.ovpn`` inline. The load is ``wrk`` with ``Connection: close``,
so every request pays a TLS handshake on both sides.

    python -m bench.directory [--quick]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.common import Row
from relay.tlsconf import ensure_self_signed

NAME = "directory"
RELAYS = 50
WRK_CONNECTIONS = 8
FULL_SECONDS, QUICK_SECONDS = 10, 4
FULL_REPEATS, QUICK_REPEATS = 3, 1
# Out of the way of the measurement: the abuse defences are measured in bench/abuse.
UNLIMITED_RATE = "1000000000"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port}")


def _register(port: int, ca: Path, cert: Path, key: Path, i: int) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(cert, key)
    ovpn = (f"client\ndev tun\nproto udp\nremote 198.51.100.{i} 1194\nnobind\n<ca>\n"
            f"{cert.read_text().strip()}\n</ca>\n")
    body = json.dumps({
        "id": f"relay-{i}", "address": f"198.51.100.{i}",
        "ports": {"cstp": 443, "openvpn-udp": 1194, "openvpn-tcp": 1194},
        "uptime_s": 3600 * i, "sessions_active": i % 7, "sessions_total": 100 * i,
        "traffic_bytes": 10 ** 9 * i, "throughput_bps": 10 ** 7 * (i % 5 + 1),
        "operator": f"volunteer {i}", "message": "bench", "country": "JP",
        "country_name": "Japan", "log_policy": {"packet_log_searchable": "14d"},
        "ovpn": ovpn})
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    conn.request("POST", "/api/register", body, {"Content-Type": "application/json"})
    status = conn.getresponse().status
    conn.close()
    if status != 200:
        raise RuntimeError(f"registration of relay-{i} answered {status}")


def _wrk(url: str, seconds: int) -> float:
    out = subprocess.run(["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s",
                          "-H", "Connection: close", url],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk printed no rate: {out}")
    return float(m.group(1))


def run(quick: bool) -> list[Row]:
    if shutil.which("wrk") is None or shutil.which("nginx") is None:
        raise RuntimeError("wrk and nginx are needed: ./run.sh setup")
    seconds = QUICK_SECONDS if quick else FULL_SECONDS
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="bench-directory-") as tmp:
        work = Path(tmp)
        cert, key = ensure_self_signed(work / "dir", "localhost")
        relay_certs = [ensure_self_signed(work / f"relay-{i}", f"relay-{i}")
                       for i in range(1, RELAYS + 1)]
        # Each relay's self-signed certificate is its own CA.
        ca = work / "relays-ca.pem"
        ca.write_text("".join(c.read_text() for c, _ in relay_certs))
        dport, nport, mport = _free_port(), _free_port(), _free_port()
        try:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "relay.cli", "directory", "--listen",
                 f"127.0.0.1:{dport}", "--data-dir", str(work / "data"), "--cert", str(cert),
                 "--key", str(key), "--ca", str(ca), "--metrics-listen", f"127.0.0.1:{mport}",
                 "--rate-per-ip", UNLIMITED_RATE, "--burst-per-ip", UNLIMITED_RATE,
                 "--rate-total", UNLIMITED_RATE, "--burst-total", UNLIMITED_RATE],
                stdout=subprocess.DEVNULL, stderr=open(work / "directory.log", "wb")))  # noqa: SIM115
            _wait_port(dport, procs[-1], "relay directory")
            for i, (c, k) in enumerate(relay_certs, 1):
                _register(dport, cert, c, k, i)
            ctx = ssl.create_default_context(cafile=str(cert))
            ctx.check_hostname = False
            conn = http.client.HTTPSConnection("127.0.0.1", dport, context=ctx)
            conn.request("GET", "/api/iphone/")
            listing = conn.getresponse().read()
            conn.close()
            www = work / "www"
            www.mkdir()
            (www / "iphone.csv").write_bytes(listing)
            for p in (work, www, www / "iphone.csv"):
                p.chmod(0o755)
            conf = work / "nginx.conf"
            conf.write_text(f"""
daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    access_log {work}/access.log;
    keepalive_timeout 0;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{nport} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {www};
    }}
}}
""")
            procs.append(subprocess.Popen(["nginx", "-c", str(conf)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_port(nport, procs[-1], "nginx")
            medians = common.interleaved({
                "nginx": lambda: _wrk(f"https://127.0.0.1:{nport}/iphone.csv", seconds),
                "directory": lambda: _wrk(f"https://127.0.0.1:{dport}/api/iphone/", seconds),
            }, repeats)
            log = b"".join(p.read_bytes() for p in (work / "data" / "connlog").iterdir())
            records = log.count(b'"list-download"')
            metrics = http.client.HTTPConnection("127.0.0.1", mport, timeout=10)
            metrics.request("GET", "/metrics")
            refused = re.findall(r"^relay_directory_refusals_total\S* ([\d.]+)$",
                                 metrics.getresponse().read().decode(), re.M)
            if any(float(n) for n in refused):
                raise RuntimeError("the abuse defences refused connections: not a fair run")
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    size_kb = len(listing) / 1024
    rows = [Row(NAME, f"list requests/s, CSV of {RELAYS} relays ({size_kb:.0f} KiB), HTTPS, "
                      "a connection each", "requests/s", "nginx, static file", medians["nginx"],
                "relay directory", medians["directory"], repeats)]
    common.write(NAME, rows, {"relays": RELAYS, "csv_bytes": len(listing),
                              "seconds_per_run": seconds, "wrk_connections": WRK_CONNECTIONS,
                              "access_records_written": records})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    common.print_rows(run(ap.parse_args().quick))


if __name__ == "__main__":
    main()
