"""The packet log end to end: stock openconnect sessions through relay serve, the
same traffic captured by tshark on relay0, compared packet by packet; the
netlink toggle and its audit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REAP_TIMEOUT_S

from relay.connlog import reader
from relay.netns import INTERNET_IP, Topology, client_ip, run, wait_for
from relay.packetlog import segments

pytestmark = pytest.mark.netns

SCRIPTED = (
    "import socket\n"
    f"s = socket.create_connection(('{INTERNET_IP}', 80), timeout=10)\n"
    "for i in range(20):\n"
    "    s.sendall(b'GET /?n=%d HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' % i)\n"
    "    s.recv(65536)\n"
    "s.close()\n"
)
Key = tuple[str, int, str, int, int, int, str, int]


# A capture that never sees the traffic end stops by itself after this long.
TSHARK_MAX_SECONDS = 120
# The canary's port: connection attempts through the tunnel to it, repeated until
# tshark shows one, prove the capture is live; both sides leave the port out.
CANARY_PORT = 9
CANARY = (
    "import socket, sys, time\n"
    "while True:\n"
    "    try:\n"
    f"        socket.create_connection(('{INTERNET_IP}', {CANARY_PORT}), timeout=1).close()\n"
    "    except OSError:\n"
    "        pass\n"
    "    time.sleep(0.2)\n"
)
SUMMARY = re.compile(r"^\s*\d+ +\d+\.\d+ ", re.M)
CANARY_LINE = re.compile(rf"\b{CANARY_PORT} (?:→|->)|(?:→|->) {CANARY_PORT}\b")


def tshark_start(topo: Topology, pcap: Path) -> subprocess.Popen[bytes]:
    """tshark on relay0, printing each packet it has written (-P -l) to tshark.log;
    returns once a canary packet shows, so the capture is live."""
    # A large kernel buffer (-B, MiB): tshark must not drop, or the comparison
    # would measure tshark's losses (which it has at full speed without it).
    proc = topo.spawn(topo.relay_ns, ["tshark", "-P", "-l", "-B", "64", "-a",
                                      f"duration:{TSHARK_MAX_SECONDS}", "-i", "relay0", "-f",
                                      "tcp", "-w", str(pcap)], "tshark.log")
    canary = topo.spawn(topo.client_ns(1), [sys.executable, "-c", CANARY], "canary.log")
    try:
        wait_for(lambda: CANARY_LINE.search(topo.log("tshark.log")), 30,
                 "tshark to capture a canary packet")
    finally:
        os.killpg(canary.pid, signal.SIGKILL)
        canary.wait()
    return proc


def tshark_printed(topo: Topology) -> int:
    """Packets tshark has written (its summary lines), the canary's left out."""
    return sum(1 for line in topo.log("tshark.log").splitlines()
               if SUMMARY.match(line) and not CANARY_LINE.search(line))


def tshark_stop(topo: Topology, proc: subprocess.Popen[bytes], expected: int) -> None:
    """Stop tshark once it has written ``expected`` packets (so nothing is left in
    its buffers)."""
    wait_for(lambda: tshark_printed(topo) >= expected, 60,
             f"tshark to have written {expected} packets (it has {tshark_printed(topo)})")
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(30)


def tshark_packets(pcap: Path) -> list[Key]:
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-T", "fields", "-E", "separator=,", "-e", "ip.src",
         "-e", "tcp.srcport", "-e", "ip.dst", "-e", "tcp.dstport", "-e", "tcp.seq_raw",
         "-e", "tcp.ack_raw", "-e", "tcp.flags", "-e", "tcp.len"],
        capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        src, sport, dst, dport, seq, ack, flags, length = line.split(",")
        rows.append((src, int(sport), dst, int(dport), int(seq), int(ack),
                     segments.flags_str(int(flags, 16)), int(length)))
    return rows


def logged(data: Path) -> list[dict]:
    return list(segments.iter_records(data))


def not_canary(r: dict) -> bool:
    return CANARY_PORT not in (r["src_port"], r["dst_port"])


def key(r: dict) -> Key:
    return (r["src_ip"], r["src_port"], r["dst_ip"], r["dst_port"], r["seq"], r["ack"],
            r["flags"], r["len"])


def sessions(data: Path) -> dict[str, dict]:
    """virtual IP -> connect record."""
    return {r["virtual_ip"]: r for r in reader.iter_records(data) if r["action"] == "connect"}


def test_packet_log_matches_tshark_with_two_sessions(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(2)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    topo.connect_openconnect(1, data)
    topo.connect_openconnect(2, data)
    pcap = topo.workdir / "relay0.pcap"
    shark = tshark_start(topo, pcap)

    downloads = [subprocess.Popen(["ip", "netns", "exec", topo.client_ns(i), "curl", "-sS",
                                   "--limit-rate", "8M", "-o", "/dev/null",
                                   f"http://{INTERNET_IP}/big.bin"])
                 for i in (1, 2)]
    run([sys.executable, "-c", SCRIPTED], topo.client_ns(1))
    assert all(d.wait(60) == 0 for d in downloads)
    # Once the packet log stops growing, tshark must have written as many.
    counts: list[int] = []

    def settled() -> bool:
        counts.append(sum(1 for r in logged(data) if not_canary(r)))
        return len(counts) > 1 and counts[-1] == counts[-2]

    wait_for(settled, 30, "the packet log to take every packet",
             interval=2 * segments.FLUSH_INTERVAL)
    tshark_stop(topo, shark, counts[-1])
    assert "dropped" not in topo.log("tshark.log").replace("0 packets dropped", "")

    seen = [k for k in tshark_packets(pcap) if CANARY_PORT not in (k[1], k[3])]
    records = [r for r in logged(data) if not_canary(r)]
    assert len(seen) > 3000  # 2 x 4 MiB downloads and the scripted exchange
    assert Counter(key(r) for r in records) == Counter(seen)

    by_vip = sessions(data)
    assert len(by_vip) == 2
    for r in records:
        vip = r["src_ip"] if r["direction"] == "in" else r["dst_ip"]
        s = by_vip[vip]
        assert r["session_id"] == s["session_id"]
        assert r["client_ip"] == s["client"]["ip"] and r["client_port"] == s["client"]["port"]
        assert r["time"].endswith("Z")
    assert {r["client_ip"] for r in records} == {client_ip(1), client_ip(2)}

    # The CLI prints the same records.
    sid = by_vip[topo.tunnel_ip(1)]["session_id"]
    out = subprocess.run([sys.executable, "-m", "relay.cli", "logs", "packets", "--json",
                          "--session", sid, "--data-dir", str(data)],
                         capture_output=True, text=True, check=True).stdout
    printed = [json.loads(line) for line in out.splitlines() if not_canary(json.loads(line))]
    assert printed == [r for r in records if r["session_id"] == sid]
    # export-pcap against the oracle: what tshark captured of that session's traffic.
    exported = topo.workdir / "session.pcapng"
    res = subprocess.run([sys.executable, "-m", "relay.cli", "logs", "export-pcap", "--session",
                          sid, "--data-dir", str(data), "-o", str(exported)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    vip = topo.tunnel_ip(1)
    assert Counter(k for k in tshark_packets(exported) if CANARY_PORT not in (k[1], k[3])) == \
        Counter(k for k in seen if vip in (k[0], k[2]))
    for field in ("time", "session_id", "client_ip", "client_port", "direction", "src_ip",
                  "src_port", "dst_ip", "dst_port", "seq", "ack", "flags", "len"):
        assert field in printed[0]


def relay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], capture_output=True,
                          text=True, timeout=60)


# Client source ports of the requests sent while logging is off, and after it is on.
PORT_WHILE_OFF = 41000
PORT_WHILE_ON = 41001


def audits(data: Path) -> list[str]:
    return [r["action"] for r in reader.iter_records(data)
            if r["action"] in ("logging-on", "logging-off")]


def test_logging_off_on_and_tc_filter_del_are_audited(
        make_topology: Callable[..., Topology]) -> None:
    """relay serve and relay logging each started with `ip netns exec` (each gets
    a mount namespace of its own, where /sys/fs/bpf is no bpffs) and no
    [capture] bpffs setting: the relay mounts its own, relay logging reaches it."""
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    client = topo.connect_openconnect(1, data)
    conf = str(topo.workdir / "relay.toml")
    assert "bpffs" not in Path(conf).read_text()
    assert "mounted a bpffs of this relay's own at /sys/fs/bpf" in topo.log("relay.log")

    def in_ns(*args: str) -> subprocess.CompletedProcess[str]:
        return run([sys.executable, "-m", "relay.cli", *args, "--config", conf],
                   topo.relay_ns, check=False)

    topo.curl(1, "/")
    wait_for(lambda: len(logged(data)) > 0, 10, "records")
    status = json.loads(in_ns("logging", "status", "--json").stdout)
    assert status["attached"] and status["records"] > 0
    assert "relay_capture_in" in run(["tc", "filter", "show", "dev", "relay0", "ingress"],
                                     topo.relay_ns).stdout

    # Each request from a port of its own, so its packets are told apart.
    def ports(port: int) -> list[dict]:
        return [r for r in logged(data) if port in (r["src_port"], r["dst_port"])]

    off = in_ns("logging", "off")
    assert off.returncode == 0, off.stderr
    wait_for(lambda: audits(data) == ["logging-off"], 10, "the logging-off audit")
    assert not json.loads(in_ns("logging", "status", "--json").stdout)["attached"]
    topo.curl(1, "/?while-off", "--local-port", str(PORT_WHILE_OFF))

    on = in_ns("logging", "on")
    assert on.returncode == 0, on.stderr
    wait_for(lambda: audits(data) == ["logging-off", "logging-on"], 10, "the logging-on audit")
    topo.curl(1, "/?while-on", "--local-port", str(PORT_WHILE_ON))
    # Records are drained in order: once the later request's are in, the earlier
    # one's would be too.
    wait_for(lambda: ports(PORT_WHILE_ON), 10, "records of the request after logging on")
    assert ports(PORT_WHILE_OFF) == []
    topo.access_log("/?while-off ", "/?while-on ")

    run(["tc", "filter", "del", "dev", "relay0", "ingress"], topo.relay_ns)
    wait_for(lambda: audits(data)[-1:] == ["logging-off"], 10, "the audit of tc filter del")
    # The session lives through all of it.
    assert client.poll() is None
    topo.curl(1, "/?after-tc-del")

    # Where it cannot work (no relay on that data directory): one line, what to do.
    other = topo.workdir / "no-relay"
    other.mkdir()
    for state in ("on", "status"):
        res = in_ns("logging", state, "--data-dir", str(other))
        if state == "on":
            assert res.returncode == 2 and "Traceback" not in res.stderr
            assert res.stderr.strip().splitlines() == [
                f"relay: error: no relay is running on {other} ({other}/control.sock): "
                "start relay serve first"]
        else:
            assert res.returncode == 0 and "records: unknown" in res.stdout



def fins(data: Path) -> int:
    """Packet records of the web connections that carry a FIN."""
    return sum(1 for r in logged(data) if 80 in (r["src_port"], r["dst_port"])
               and "FIN" in r["flags"].split(","))


def test_restart_within_the_period_then_crash_keeps_every_record(
        make_topology: Callable[..., Topology]) -> None:
    """Issue 13 item 7 against the real relay: a clean stop, a restart within the
    same segment period, a crash (SIGKILL) and a restart that recovers: the records
    of both runs are all still there and verify passes."""
    topo = make_topology(1)
    data = topo.workdir / "data"
    # One segment period for the whole test, so no rotation can hide the overlap.
    same_period = 'packet_segment = "3650d"\n'
    topo.start_web()

    relay = topo.start_relay(data, logs_keys=same_period)
    client = topo.connect_openconnect(1, data)
    topo.curl(1, "/?first-run")
    wait_for(lambda: len(logged(data)) > 0, 10, "records of the first run")
    relay.send_signal(signal.SIGTERM)
    relay.wait(30)
    client.wait(30)
    first = Counter(key(r) for r in logged(data))
    assert [p.suffix for p in segments.segment_files(data)] == [".rpl"]

    relay = topo.start_relay(data, name="relay-2", logs_keys=same_period)
    client = topo.connect_openconnect(1, data, name="openconnect-2.log")
    topo.curl(1, "/?second-run")
    # The second run's request is on disk to its end: both FINs of its connection
    # (the first run's added two).
    wait_for(lambda: fins(data) >= 4, 20, "the second run's records")
    both = Counter(key(r) for r in logged(data))
    os.killpg(relay.pid, signal.SIGKILL)
    relay.wait(REAP_TIMEOUT_S)
    os.killpg(client.pid, signal.SIGKILL)
    client.wait(REAP_TIMEOUT_S)

    relay = topo.start_relay(data, name="relay-3", logs_keys=same_period)
    wait_for(lambda: any(r["action"] == "packetlog-recover" for r in reader.iter_records(data)),
             30, "the recovery audit record")
    relay.send_signal(signal.SIGTERM)
    relay.wait(30)
    after = Counter(key(r) for r in logged(data))
    # Nothing lost (a late packet may have been recorded after `both` was read).
    assert not both - after and not first - after, (both - after, first - after)
    assert len(segments.segment_files(data)) == 2, segments.segment_files(data)
    verify = relay_cli("logs", "verify", "--data-dir", str(data))
    assert verify.returncode == 0, verify.stdout + verify.stderr
