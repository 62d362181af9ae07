"""Helpers for the shipping tests and bench: certificates, processes, rsyslogd.

The forwarder and the collector run as real processes (``python -c``), so that
they can be SIGKILLed mid-stream; rsyslogd runs with its own config, pid file,
work directory and ports on 127.0.0.1, never the host's service.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.connlog import daylog, reader
from relay.connlog.forwarder import ship_status

RSYSLOGD = "/usr/sbin/rsyslogd"
GTLS_MODULE = "/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so"
# Ceiling for anything a test waits for (a process start, records arriving).
WAIT_S = 60.0


# ---------------------------------------------------------------------------
# Certificates


@dataclass
class Pki:
    ca: Path
    wrong_ca: Path
    server_cert: Path
    server_key: Path
    wrong_server_cert: Path
    wrong_server_key: Path
    client_cert: Path
    client_key: Path
    wrong_client_cert: Path
    wrong_client_key: Path
    other_relay_cert: Path  # CN=relay-2, from the right CA: a relay, but another one
    other_relay_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _ca(d: Path, cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    path = d / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, path


def _leaf(d: Path, stem: str, cn: str, ca: x509.Certificate,
          ca_key: ec.EllipticCurvePrivateKey, ips: tuple[str, ...] = ()) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([
        x509.DNSName(cn), x509.DNSName("localhost"),
        *(x509.IPAddress(__import__("ipaddress").ip_address(ip)) for ip in ("127.0.0.1", *ips))])
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                         False), critical=True)
            # Both uses: rsyslog presents the same certificate as a server (imtcp)
            # and as a client (omfwd).
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = d / f"{stem}.pem", d / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return cert_path, key_path


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key, ca_path = _ca(d, "test-ca")
    wca, wca_key, wca_path = _ca(d, "wrong-ca")
    sc, sk = _leaf(d, "server", "collector.test", ca, ca_key)
    wsc, wsk = _leaf(d, "wrong-server", "collector.test", wca, wca_key)
    cc, ck = _leaf(d, "client", "relay-1", ca, ca_key)
    wcc, wck = _leaf(d, "wrong-client", "relay-1", wca, wca_key)
    oc, ok = _leaf(d, "other-relay", "relay-2", ca, ca_key)
    return Pki(ca_path, wca_path, sc, sk, wsc, wsk, cc, ck, wcc, wck, oc, ok)


# ---------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], Any], timeout: float = WAIT_S, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or pred}")
        time.sleep(0.05)


def wait_shipped(relay: Path) -> dict[str, Any]:
    """The shipping status once the backlog is empty and the status names how the
    last batch was confirmed: the forwarder saves its position (the backlog reads 0)
    before it writes that status, so waiting on the backlog alone races under load."""
    return wait_until(lambda: (s := ship_status(relay))["backlog_records"] == 0
                      and "confirmation" in s and s, what="the backlog shipped and confirmed")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class Proc:
    """A child process with stderr in a file (read by the tests)."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as out:  # the child keeps its own copy
            self.p = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, sig)
        self.p.wait(timeout=WAIT_S)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


_COLLECTOR = """
import asyncio, logging, signal, sys, uvloop
from relay.central.collector import run_collector
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="relay: %(levelname)s: %(message)s")
a = {args!r}
async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await run_collector(**a, stop_event=stop)
uvloop.run(main())
"""

_FORWARDER = """
import asyncio, logging, signal, sys, types, uvloop
from relay.connlog.daylog import ConnectionLog
from relay.connlog.forwarder import make_forwarder, run_forwarder
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="relay: %(levelname)s: %(message)s")
cfg = types.SimpleNamespace(**{cfg!r})
log = ConnectionLog({data_dir!r})
def audit(record):  # as relay serve's Relay.audit does
    log.append({{**record, "server": {{"id": {server_id!r}}}}})
async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    fwd = make_forwarder(cfg, {data_dir!r}, {server_id!r}, audit, backoff_max={backoff_max!r})
    await run_forwarder(fwd, stop)
uvloop.run(main())
"""


def start_collector(tmp: Path, port: int, pki: Pki, *, cert: Path | None = None,
                    key: Path | None = None, accept_syslog: bool = False,
                    allow_no_client_cert: bool = False, plain_port: int | None = None,
                    data_dir: Path | None = None, keep_days: int = 90,
                    host: str = "127.0.0.1", quota: int | None = None) -> Proc:
    args: dict[str, Any] = {
        "listen": f"{host}:{port}", "data_dir": str(data_dir or tmp / "collector"),
        "ca": str(pki.ca), "cert": str(cert or pki.server_cert),
        "key": str(key or pki.server_key), "keep_days": keep_days,
        "accept_syslog": accept_syslog, "allow_no_client_cert": allow_no_client_cert,
        "plain_listen": f"127.0.0.1:{plain_port}" if plain_port else None,
    }
    if quota is not None:
        args["quota_bytes_per_day"] = quota
    proc = Proc([sys.executable, "-c", _COLLECTOR.format(args=args)], tmp / "collector.log")
    wait_until(lambda: port_open(port, host) or proc.p.poll() is not None,
               what="collector port")
    assert proc.p.poll() is None, proc.log()
    return proc


def start_forwarder(tmp: Path, data_dir: Path, port: int, pki: Pki, *,
                    host: str = "localhost", client_cert: bool = True,
                    server_id: str = "relay-1", backoff_max: float = 1.0,
                    cert: Path | None = None, key: Path | None = None,
                    log_name: str = "forwarder.log") -> Proc:
    """The forwarder of relay ``server_id`` (with its client certificate, CN=relay-1
    or ``cert``, unless ``client_cert`` is False)."""
    cfg = {"collector": f"{host}:{port}", "ca": str(pki.ca),
           "cert": str(cert or pki.client_cert) if client_cert else "",
           "key": str(key or pki.client_key) if client_cert else ""}
    src = _FORWARDER.format(cfg=cfg, data_dir=str(data_dir), server_id=server_id,
                            backoff_max=backoff_max)
    return Proc([sys.executable, "-c", src], tmp / log_name)


def require_rsyslog() -> None:
    # Missing tools fail loudly: the interop tests are the point.
    assert os.access(RSYSLOGD, os.X_OK), f"{RSYSLOGD} missing: apt-get install rsyslog"
    assert os.path.exists(GTLS_MODULE), \
        f"{GTLS_MODULE} missing: apt-get install rsyslog-gnutls"


def start_rsyslog(tmp: Path, body: str, wait_ports: list[int]) -> Proc:
    """rsyslogd in the foreground with ``body`` after a global TLS section."""
    require_rsyslog()
    work = tmp / "rsyslog-work"
    work.mkdir(exist_ok=True)
    conf = tmp / "rsyslog.conf"
    conf.write_text(body)
    proc = Proc([RSYSLOGD, "-n", "-f", str(conf), "-i", str(tmp / "rsyslog.pid")],
                tmp / "rsyslog.log")
    for port in wait_ports:
        wait_until(lambda p=port: port_open(p) or proc.p.poll() is not None,
                   what=f"rsyslogd port {port}")
        assert proc.p.poll() is None, proc.log()
    return proc


def rsyslog_global(tmp: Path, pki: Pki, relay_cert: bool = False) -> str:
    """rsyslogd's TLS: the collector.test certificate, or with ``relay_cert`` the
    relay's own (CN=relay-1), as an rsyslogd on the relay host that forwards the
    relay's records to relay collector presents (the collector files records
    under the certificate's CN)."""
    cert, key = (pki.client_cert, pki.client_key) if relay_cert \
        else (pki.server_cert, pki.server_key)
    return f"""
global(workDirectory="{tmp / 'rsyslog-work'}"
       maxMessageSize="64k"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{pki.ca}"
       defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
"""


# ---------------------------------------------------------------------------
# Records


def hostile_record(i: int) -> dict[str, Any]:
    """A connect/disconnect/audit record with client strings built to break logs."""
    action = ("connect", "disconnect", "ban")[i % 3]
    rec: dict[str, Any] = {
        "action": action,
        "session_id": f"s{i:08x}",
        "server": {"id": "relay-1", "ip": "192.0.2.1", "hostname": "relay1.example"},
        "client": {"ip": f"198.51.100.{i % 250}", "port": 40000 + i % 20000,
                   "hostname": f'evil"] [relay@32473 id="forged"]\n<13>1 fake {i}'},
        "protocol": "cstp",
        "client_software": {"name": "OpenConnect\\\r\n\x00\u2028ü", "version": f"9.{i}",
                            "id": "x" * 40},
        "virtual_ip": f"10.211.{i // 250 % 250}.{i % 250 + 2}",
    }
    if action == "disconnect":
        rec.update(packets={"in": i, "out": 2 * i}, bytes={"in": 100 * i, "out": 7 * i},
                   duration_s=i / 10, reason="client-closed", error=None)
    return rec


def write_records(data_dir: Path, n: int, start: int = 0) -> list[dict[str, Any]]:
    log = daylog.ConnectionLog(data_dir)
    try:
        return [log.append(hostile_record(start + i)) for i in range(n)]
    finally:
        log.close()


def read_day_dir(directory: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not directory.is_dir():
        return out
    for p in sorted(directory.iterdir()):
        if p.name.endswith(".jsonl"):
            data = p.read_bytes()
        elif p.name.endswith(".jsonl.zst"):
            data = reader.uncompressed(p)
        else:
            continue
        out += [json.loads(line) for line in data.splitlines() if line.strip()]
    return out


def stored_ids(directory: Path) -> list[str]:
    """Ids of the records in a collector's relay directory (duplicates kept)."""
    return [r["id"] for r in read_day_dir(directory)]


class Writer(threading.Thread):
    """Appends records in the background, as a busy relay does."""

    def __init__(self, data_dir: Path, n: int) -> None:
        super().__init__(daemon=True)
        self.data_dir, self.n = data_dir, n
        self.records: list[dict[str, Any]] = []

    def run(self) -> None:
        self.records = write_records(self.data_dir, self.n)
