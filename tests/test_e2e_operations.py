"""What an operator relies on, end to end against one running relay: the stock
clients with what ``relay client-config`` prints, the reverse-DNS name in the
records, ``[server] users`` for both protocols, the refusal when the disk is too
full to log (a small filesystem), packet-log rotation, archiving and deletion
(segments planted with old records), and ``verify``/``disclose`` on the relay's
own data directory."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import records, scrape
from packetlog_synth import make_records, to_c

from relay.errors import EXIT_INCOMPLETE
from relay.netns import INTERNET_IP, VPNC_SCRIPT, Topology, client_ip, relay_ip, run, wait_for
from relay.packetlog import segments
from relay.packetlog.retention import DAY, REFUSE_FREE_BYTES

pytestmark = pytest.mark.netns

RELAY = [sys.executable, "-m", "relay.cli"]
DNS = str(Path(__file__).with_name("dns_ptr.py"))
# The data directory is a filesystem of its own this small: above the size under
# which the relay refuses sessions, under the free space its disk guard keeps.
DISK_MB = 320
SEGMENT_S = 3
DELETE_AFTER_DAYS = 20
# Planted segments: name -> age of their newest record.
PLANTED = {"past delete_after": 25 * DAY, "past 14 days": 16 * DAY, "recent": 1 * DAY}
NAMES = {1: "client-one.example.test", 2: "client-two.example.test"}
USER, PASSWORD = "alice", "correct horse"


@dataclass
class Ops:
    topo: Topology
    data: Path
    conf: Path
    relay: subprocess.Popen[bytes]
    planted: dict[str, Path]
    started: float


def plant(data: Path) -> dict[str, Path]:
    """Closed, chained segments whose records are as old as PLANTED says, written
    by the relay's own writer with its clock set back."""
    now = time.time()
    clock = [now - 30 * DAY]
    rotated: list[dict[str, Any]] = []
    w = segments.PacketLogWriter(data, segment_seconds=3600, clock=lambda: clock[0],
                                  audit=rotated.append)
    w.open()
    for i, age in enumerate(PLANTED.values()):
        recs = make_records(50, seed=i, start_ns=int((now - age - 600) * 1e9))
        recs[-1]["time_ns"] = int((now - age) * 1e9)
        w.write(to_c(recs), len(recs))
        clock[0] += 3600
        w.tick()
    return {name: Path(r["file"]) for name, r in zip(PLANTED, rotated, strict=True)}


@pytest.fixture(scope="module")
def ops(make_module_topology: Callable[..., Topology]) -> Iterator[Ops]:
    topo = make_module_topology(2)
    data = topo.workdir / "data"
    data.mkdir(mode=0o700)
    run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0700", "relay-test", str(data)])
    try:
        planted = plant(data)
        topo.start_web()
        topo.spawn(topo.internet_ns, [sys.executable, DNS, INTERNET_IP,
                                      *(f"{client_ip(i)}={n}" for i, n in NAMES.items())],
                   "dns.log")
        wait_for(lambda: "listening" in topo.log("dns.log"), 10, "the name server")
        etc = Path("/etc/netns") / topo.relay_ns  # removed with the namespace
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {INTERNET_IP}\n")
        started = time.time()
        relay = topo.start_relay(data, logs_keys=f'packet_segment = "{SEGMENT_S}s"\n'
                                                 f'delete_after = "{DELETE_AFTER_DAYS}d"\n')
        yield Ops(topo, data, topo.workdir / "relay.toml", relay, planted, started)
    finally:
        topo.stop_all()
        run(["umount", "-l", str(data)], check=False)


def cli(*args: str, ns: str | None = None, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    return run([*RELAY, *args], ns, check=check, timeout=60)


def openconnect(ops: Ops, i: int, name: str, password: str = "anything",
                user: str = "anyone") -> subprocess.Popen[bytes]:
    """The stock openconnect with the command line ``relay client-config
    openconnect`` prints (plus what makes it run unattended); returns once the
    tunnel is up or the client has given up."""
    printed = cli("client-config", "openconnect", "--remote", relay_ip(i), "--config",
                  str(ops.conf)).stdout
    cmd = [*shlex.split(printed), "--user", user, "--passwd-on-stdin", "--non-inter",
           "--script", VPNC_SCRIPT, "--interface", "tun0"]
    proc = ops.topo.spawn(ops.topo.client_ns(i), cmd, f"{name}.log",
                          stdin=f"{password}\n".encode())
    wait_for(lambda: ops.topo.tunnel_up(i) or proc.poll() is not None, 30,
             f"openconnect {name} to connect or give up")
    return proc


def openvpn(ops: Ops, i: int, name: str, proto: str = "udp",
            credentials: tuple[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The stock openvpn with the file ``relay client-config openvpn -o`` writes;
    with a user list, the client reads ``credentials`` from a file (it would ask
    on the terminal). Returns once it is connected, refused or gone."""
    ovpn = ops.topo.workdir / f"{name}.ovpn"
    out = cli("client-config", "openvpn", "--proto", proto, "--dev", "tun", "--remote",
              relay_ip(i), "-o", str(ovpn), "--config", str(ops.conf))
    assert out.stdout == f"wrote {ovpn}\n"
    assert ovpn.stat().st_mode & 0o777 == 0o600
    if credentials is not None:
        secret = ops.topo.workdir / f"{name}.pass"
        secret.write_text("\n".join(credentials) + "\n")
        text = ovpn.read_text()
        assert "\nauth-user-pass\n" in text
        ovpn.write_text(text.replace("\nauth-user-pass\n", f"\nauth-user-pass {secret}\n"))
    log = f"{name}.log"
    proc = ops.topo.spawn(ops.topo.client_ns(i), ["openvpn", "--config", str(ovpn)], log)
    wait_for(lambda: any(m in ops.topo.log(log) for m in (
        "Initialization Sequence Completed", "AUTH_FAILED")) or proc.poll() is not None, 30,
        f"openvpn {name} to connect or be refused")
    return proc


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    proc.wait(15)


def session_of(data: Path, ip: str, known: set[str]) -> dict[str, Any]:
    [rec] = [r for r in records(data, "connect")
             if r["client"]["ip"] == ip and r["session_id"] not in known]
    return rec


def sessions(data: Path) -> set[str]:
    return {r["session_id"] for r in records(data, "connect")}


def test_client_config_output_connects_the_stock_clients_and_records_name_them(
        ops: Ops) -> None:
    topo, data = ops.topo, ops.data
    known = sessions(data)
    oc = openconnect(ops, 1, "openconnect-config")
    assert topo.tunnel_up(1), topo.log("openconnect-config.log")
    ov = openvpn(ops, 2, "openvpn-config")
    assert "Initialization Sequence Completed" in topo.log("openvpn-config.log")
    assert "hello" in topo.curl(1, "/?openconnect") and "hello" in topo.curl(2, "/?openvpn")
    first, second = session_of(data, client_ip(1), known), session_of(data, client_ip(2), known)
    assert (first["protocol"], second["protocol"]) == ("SSL-VPN", "OpenVPN")
    stop(oc, signal.SIGINT)
    stop(ov)
    wait_for(lambda: {first["session_id"], second["session_id"]}
             <= {r["session_id"] for r in records(data, "disconnect")}, 20,
             "both disconnect records")
    # The reverse lookup's answer (the test's name server) is the client's host name:
    # in the disconnect record always; in the connect record only if it was already
    # there, since the lookup never delays a session.
    for i, rec in ((1, first), (2, second)):
        [bye] = [r for r in records(data, "disconnect") if r["session_id"] == rec["session_id"]]
        assert bye["client"]["hostname"] == NAMES[i]
        assert rec["client"]["hostname"] in (NAMES[i], None)


def test_server_users_for_both_protocols(ops: Ops) -> None:
    topo, data = ops.topo, ops.data
    users = topo.workdir / "users"
    users.write_text(f"# name:password\n{USER}:{PASSWORD}\n")
    anonymous = ops.conf.read_text()
    ops.conf.write_text(anonymous.replace("[server]\n", f'[server]\nusers = "{users}"\n', 1))
    try:
        assert cli("reload", "--config", str(ops.conf), ns=topo.relay_ns).stdout.strip() \
            == "config reloaded"
        known = sessions(data)
        wrong = openconnect(ops, 1, "openconnect-wrong", password="wrong horse", user=USER)
        assert wrong.wait(15) != 0 and not topo.tunnel_up(1)
        assert "unknown user or wrong password" in topo.log("openconnect-wrong.log")
        right = openconnect(ops, 1, "openconnect-right", password=PASSWORD, user=USER)
        assert topo.tunnel_up(1), topo.log("openconnect-right.log")
        assert "hello" in topo.curl(1, "/?user")
        stop(right, signal.SIGINT)

        wrong = openvpn(ops, 2, "openvpn-wrong", credentials=(USER, "wrong horse"))
        assert "AUTH_FAILED" in topo.log("openvpn-wrong.log")
        stop(wrong)
        right = openvpn(ops, 2, "openvpn-right", credentials=(USER, PASSWORD))
        assert "Initialization Sequence Completed" in topo.log("openvpn-right.log")
        assert "hello" in topo.curl(2, "/?user")
        stop(right)
        # One session per right password, none for the wrong ones, each refusal logged.
        assert sorted(r["protocol"] for r in records(data, "connect")
                      if r["session_id"] not in known) == ["OpenVPN", "SSL-VPN"]
        assert topo.log("relay.log").count(f"login refused for '{USER}' from") == 2
    finally:
        ops.conf.write_text(anonymous)
        cli("reload", "--config", str(ops.conf), ns=topo.relay_ns)


def test_a_disk_too_full_to_log_refuses_sessions_with_the_reason(ops: Ops) -> None:
    topo, data = ops.topo, ops.data
    filler = data / "filler"
    with filler.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0,
                           shutil.disk_usage(data).free - REFUSE_FREE_BYTES + (4 << 20))
    try:
        reason = "the packet log's disk has"
        refused = openconnect(ops, 1, "openconnect-full")
        assert refused.wait(15) != 0 and not topo.tunnel_up(1)
        assert f"VPN service unavailable; reason: {reason}" in topo.log("openconnect-full.log")
        ov = openvpn(ops, 2, "openvpn-full", proto="tcp")
        assert f"AUTH_FAILED,TEMP:{reason}" in topo.log("openvpn-full.log")
        stop(ov)
        assert "rather than run unlogged" in topo.log("relay.log")
        assert scrape(topo)[("relay_refusals_total", (("reason", "disk-full"),))] == 2
    finally:
        filler.unlink()
    # Space again: sessions again.
    client = openconnect(ops, 1, "openconnect-space")
    assert "hello" in topo.curl(1, "/?space-again")
    stop(client, signal.SIGINT)


def test_packet_log_rotates_archives_and_deletes_in_the_running_relay(ops: Ops) -> None:
    topo, data = ops.topo, ops.data
    # At start, the retention pass: every planted file past 14 days archived; the
    # one past delete_after deleted; the next, on this small disk, deleted by the
    # free-space guard (oldest archive first); the recent one untouched.
    audits = [r for r in records(data) if r["action"].startswith("packetlog-")]
    archived = {r["file"]: r for r in audits if r["action"] == "packetlog-archive"}
    assert set(archived) == {str(ops.planted["past delete_after"]),
                             str(ops.planted["past 14 days"])}
    assert all(r["records"] == 50 for r in archived.values())
    deleted = {r["file"]: r["reason"] for r in audits if r["action"] == "packetlog-delete"}
    assert deleted == {archived[str(ops.planted["past delete_after"])]["archive"]:
                       "older than delete_after",
                       archived[str(ops.planted["past 14 days"])]["archive"]: "disk guard"}
    assert ops.planted["recent"].exists()

    # Rotation every SEGMENT_S: a request, its segment closed at the period's end,
    # a second request in the next; each segment closed, chained and audited.
    client = openconnect(ops, 1, "openconnect-rotation")
    session = records(data, "connect")[-1]
    rotated_before = {r["file"] for r in records(data, "packetlog-rotate")}

    def new_rotations() -> list[dict[str, Any]]:
        return [r for r in records(data, "packetlog-rotate")
                if r["file"] not in rotated_before and r["records"] > 0]

    for n, request in enumerate(("/?first-segment", "/?second-segment"), 1):
        topo.curl(1, request)
        wait_for(lambda n=n: len(new_rotations()) >= n, 6 * SEGMENT_S,
                 f"the segment of request {n} to be closed")
    stop(client, signal.SIGINT)
    files = [Path(r["file"]) for r in new_rotations()]
    assert all(p.exists() and p.suffix == segments.SEGMENT_SUFFIX for p in files)
    chained = {json.loads(line)["file"] for line in
               (data / "chain" / "packets.jsonl").read_text().splitlines()}
    assert {p.name for p in files} <= chained
    out = cli("logs", "packets", "--json", "--session", session["session_id"], "--data-dir",
              str(data)).stdout
    assert len({json.loads(line)["time"][:19] for line in out.splitlines()}) > 1


def test_verify_and_disclose_on_the_relays_own_data_directory(ops: Ops) -> None:
    """Last in the module: it stops the relay."""
    topo, data = ops.topo, ops.data
    ops.relay.send_signal(signal.SIGTERM)
    ops.relay.wait(30)
    verified = cli("logs", "verify", "--json", "--data-dir", str(data), check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert report["problems"] == [], report

    bundle = topo.workdir / "case.tar"
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ops.started - 60))
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
    disclosed = cli("logs", "disclose", "--from", since, "--to", until, "--client-ip",
                    client_ip(1), "--data-dir", str(data), "-o", str(bundle), check=False)
    assert disclosed.returncode == 0, disclosed.stderr
    checked = cli("logs", "verify-bundle", str(bundle), "--json", "--data-dir", str(data),
                  check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    counts = json.loads(checked.stdout)["checked"]
    assert counts["packet records"] > 0 and counts["connection-log records"] >= 2 * len(
        [r for r in records(data, "connect") if r["client"]["ip"] == client_ip(1)])

    # verify can fail on this directory: one byte of a closed segment changed.
    copy = topo.workdir / "copy"
    shutil.copytree(data, copy)
    segment = sorted((copy / "packets").glob("*" + segments.SEGMENT_SUFFIX))[-1]
    raw = bytearray(segment.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    segment.write_bytes(bytes(raw))
    tampered = cli("logs", "verify", "--json", "--data-dir", str(copy), check=False)
    assert tampered.returncode == EXIT_INCOMPLETE  # problems found: results incomplete
    assert ("modified", segment.name) in {(p["kind"], p["file"]) for p in
                                          json.loads(tampered.stdout)["problems"]}
