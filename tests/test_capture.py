"""The eBPF capture for real: a TAP device in a network namespace of this test,
TCP frames of two sessions (IPv4, and IPv6 with extension headers) written into it
(tc ingress) and sent out of it through a packet socket (tc egress), every record
field checked; logging off/on from another process; ``tc filter del`` noticed;
drops counted with a tiny ring. Needs root, bcc and tc: missing, it fails."""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import in_netns

from relay import sessionid
from relay.errors import RelayError
from relay.packetlog import segments, tcfilter
from relay.packetlog.capture import Capture, FilterWatcher, wait_for
from relay.packetlog.segments import PacketLogWriter
from relay.times import parse_rfc3339

pytestmark = pytest.mark.netns

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
ETH_P_ALL = 0x0003
REPO = Path(__file__).resolve().parent.parent

MAC_A = bytes.fromhex("02aa00000001")
MAC_B = bytes.fromhex("02bb00000002")
MAC_UNKNOWN = bytes.fromhex("02cc00000003")
ROUTER_MAC = bytes.fromhex("02ee000000ee")
SID_A = sessionid.new()
SID_B = sessionid.new()


def sh(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"
    return proc.stdout


@pytest.fixture
def tapns(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ns = f"relaycap-{uuid.uuid4().hex[:8]}"
    dev = f"rcap{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    tap_fd = -1
    try:
        def make() -> tuple[int, socket.socket]:
            fd = os.open("/dev/net/tun", os.O_RDWR)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TAP | IFF_NO_PI))
            return fd, socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))

        tap_fd, psock = in_netns(ns, make)
        sh("ip", "-n", ns, "link", "set", dev, "address", "02:ee:00:00:00:ee", "up")
        psock.bind((dev, 0))
        yield {"ns": ns, "dev": dev, "tap": tap_fd, "psock": psock,
               "data": tmp_path / "data"}
        psock.close()
    finally:
        if tap_fd >= 0:
            os.close(tap_fd)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        # Pins left by a failed test would keep programs alive.
        subprocess.run(["rm", "-rf", str(tcfilter.pin_dir(dev))], check=False)


# ------------------------------------------------------------------ frames


def tcp_header(sport: int, dport: int, seq: int, ack: int, flags: int, window: int) -> bytes:
    # 32-byte header (doff 8) with 12 bytes of options: NOP NOP timestamps.
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", 1, 2)
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 8 << 4, flags, window, 0, 0) + opts


def ipv4_frame(dst_mac: bytes, src_mac: bytes, src: str, dst: str, tcp: bytes,
               payload: bytes) -> bytes:
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0,
                     ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return dst_mac + src_mac + b"\x08\x00" + ip + tcp + payload


def ipv6_frame(dst_mac: bytes, src_mac: bytes, src: str, dst: str, tcp: bytes,
               payload: bytes) -> bytes:
    # Hop-by-hop (8 B, PadN), destination options (16 B), routing (type 4 with
    # segments left 0, 8 B... as a 24-byte header), fragment (offset 0, more
    # fragments 0) then TCP: every kind the capture walks.
    hop = bytes([60, 0]) + b"\x01\x04\0\0\0\0"
    dst_opts = bytes([43, 1]) + b"\x01\x0c" + b"\0" * 12
    routing = bytes([44, 2, 4, 0]) + b"\0" * 20
    frag = bytes([6, 0, 0, 0]) + b"\0\0\0\x2a"
    ext = hop + dst_opts + routing + frag
    plen = len(ext) + len(tcp) + len(payload)
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, plen, 0, 64,
                      ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return dst_mac + src_mac + b"\x86\xdd" + ip6 + ext + tcp + payload


def make_traffic() -> list[tuple[str, bytes, dict[str, Any]]]:
    """(how to inject, frame, expected record fields) for both sessions."""
    out = []
    flows = [
        (MAC_A, SID_A, "198.18.1.2", 40001, ipv4_frame, "10.211.0.2", "93.184.216.34"),
        (MAC_B, SID_B, "2001:db8:1::2", 40002, ipv6_frame, "fd00:211::3", "2001:db8:ff::80"),
    ]
    for mac, sid, cip, cport, build, vip, remote in flows:
        steps = [("in", 0x02, 1000, 0, b""), ("out", 0x12, 5000, 1001, b""),
                 ("in", 0x10, 1001, 5001, b""), ("in", 0x18, 1001, 5001, b"GET / HTTP/1.1\r\n\r\n"),
                 ("out", 0x18, 5001, 1019, b"x" * 700), ("in", 0x11, 1019, 5701, b"")]
        for i, (direction, flags, seq, ack, payload) in enumerate(steps):
            window = 500 + i
            if direction == "in":
                tcp = tcp_header(33333, 443, seq, ack, flags, window)
                frame = build(ROUTER_MAC, mac, vip, remote, tcp, payload)
                src, dst, sport, dport = vip, remote, 33333, 443
            else:
                tcp = tcp_header(443, 33333, seq, ack, flags, window)
                frame = build(mac, ROUTER_MAC, remote, vip, tcp, payload)
                src, dst, sport, dport = remote, vip, 443, 33333
            out.append((direction, frame, {
                "session_id": sid, "client_ip": cip, "client_port": cport,
                "direction": direction, "src_ip": src, "dst_ip": dst, "src_port": sport,
                "dst_port": dport, "seq": seq, "ack": ack,
                "flags": segments.flags_str(flags), "window": window, "len": len(payload)}))
    return out


def inject(env: dict[str, Any], direction: str, frame: bytes) -> None:
    if direction == "in":
        os.write(env["tap"], frame)  # the relay writing a client's frame
    else:
        env["psock"].send(frame)     # the kernel sending towards the client


def drain_all(cap: Capture, expect: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while cap.stats()["drained"] < expect and time.monotonic() < deadline:
        cap.drain()
        time.sleep(0.01)
    cap.flush()


def records(env: dict[str, Any]) -> list[dict[str, Any]]:
    errors: list[tuple[str, str]] = []
    recs = list(segments.iter_records(env["data"], on_error=lambda p, r: errors.append((p, r))))
    assert not errors
    return recs


def start_capture(env: dict[str, Any], **kw: Any) -> Capture:
    writer = PacketLogWriter(env["data"])
    writer.open()
    cap = Capture(env["dev"], writer, netns=env["ns"], **kw)
    cap.start()
    cap.add_session(MAC_A, SID_A, "198.18.1.2", 40001)
    cap.add_session(MAC_B, SID_B, "2001:db8:1::2", 40002)
    return cap


# ------------------------------------------------------------------ tests


def test_tools_present() -> None:
    import bcc  # noqa: F401  (fails loudly when python3-bpfcc is missing)

    assert Path("/sys/fs/bpf").is_dir(), "bpffs is not mounted at /sys/fs/bpf"
    sh("tc", "-V")


def test_every_field_and_attribution(tapns: dict[str, Any]) -> None:
    cap = start_capture(tapns)
    try:
        out = sh("tc", "-n", tapns["ns"], "filter", "show", "dev", tapns["dev"], "ingress")
        assert "relay_capture_in" in out and "direct-action" in out
        out = sh("tc", "-n", tapns["ns"], "filter", "show", "dev", tapns["dev"], "egress")
        assert "relay_capture_out" in out
        assert (tcfilter.pin_dir(tapns["dev"]) / tcfilter.PROG_IN).exists()
        traffic = make_traffic()
        t0 = time.time_ns()
        for direction, frame, _ in traffic:
            inject(tapns, direction, frame)
        # A frame from a MAC with no session is kept, unattributed, not dropped.
        inject(tapns, "in", ipv4_frame(ROUTER_MAC, MAC_UNKNOWN, "10.211.0.9", "1.1.1.1",
                                       tcp_header(1, 2, 3, 4, 0x02, 5), b""))
        # Non-TCP (UDP) is not recorded.
        udp = ipv4_frame(ROUTER_MAC, MAC_A, "10.211.0.2", "1.1.1.1", b"\0" * 8, b"")
        inject(tapns, "in", udp[:23] + b"\x11" + udp[24:])
        drain_all(cap, len(traffic) + 1)
        t1 = time.time_ns()
        got = records(tapns)
        assert len(got) == len(traffic) + 1
        by_key = {(r["session_id"], r["direction"], r["seq"], r["flags"]): r for r in got}
        for _, _, want in traffic:
            rec = by_key[(want["session_id"], want["direction"], want["seq"], want["flags"])]
            assert {k: rec[k] for k in want} == want
            ns = parse_rfc3339(rec["time"]).timestamp() * 1e9
            assert t0 - 1e9 < ns < t1 + 1e9  # wall clock (µs precision of datetime)
        stray = [r for r in got if r["session_id"] == ""]
        assert len(stray) == 1 and stray[0]["src_ip"] == "10.211.0.9"
        assert stray[0]["client_ip"] == ""
        stats = cap.stats()
        assert stats["records"] == len(traffic) + 1 and stats["drops"] == 0
        # A removed session's packets are no longer attributed to it.
        cap.remove_session(MAC_A)
        inject(tapns, *traffic[0][:2])
        drain_all(cap, len(traffic) + 2)
        assert records(tapns)[-1]["session_id"] == ""
    finally:
        cap.close()
    assert not tcfilter.pin_dir(tapns["dev"]).exists()
    with tcfilter.iproute(tapns["ns"]) as ipr:
        assert tcfilter.attached_state(ipr, tapns["dev"]) == (False, False)


def _ctl(env: dict[str, Any], fn: str) -> Any:
    """relay.packetlog.logging_ctl in a separate process, as `relay logging` runs."""
    args = [repr(env["dev"])]
    if fn != "logging_off":  # the pins of the Capture this test runs in its own process
        args.append(f"Path({str(tcfilter.pin_dir(env['dev']))!r})")
    args.append(f"netns={env['ns']!r}")
    if fn == "logging_status":
        args += [f"data_dir={str(env['data'])!r}", "sample_seconds=0.2"]
    code = ("import json; from pathlib import Path; import relay.packetlog.logging_ctl as l; "
            f"r = l.{fn}({', '.join(args)}); print(json.dumps(r.to_dict() if r else None))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_logging_off_on_from_another_process_and_watcher(tapns: dict[str, Any]) -> None:
    cap = start_capture(tapns)
    changes: list[bool] = []
    watcher = FilterWatcher(tapns["dev"], changes.append, netns=tapns["ns"])
    watcher.start()
    try:
        assert watcher.state is True
        traffic = make_traffic()
        status = _ctl(tapns, "logging_status")
        assert status["attached"] is True and status["drops"] == 0

        _ctl(tapns, "logging_off")
        assert wait_for(lambda: changes == [False], 5), changes
        assert _ctl(tapns, "logging_status")["attached"] is False
        for direction, frame, _ in traffic:
            inject(tapns, direction, frame)
        cap.flush()
        assert records(tapns) == []  # logging off: nothing recorded

        _ctl(tapns, "logging_on")
        assert wait_for(lambda: changes == [False, True], 5), changes
        for direction, frame, _ in traffic:
            inject(tapns, direction, frame)
        drain_all(cap, len(traffic))
        assert len(records(tapns)) == len(traffic)
        status = _ctl(tapns, "logging_status")
        assert status["attached"] is True and status["records"] == len(traffic)
        assert status["disk_bytes"] > 0

        # An operator's `tc filter del` is noticed too.
        sh("tc", "-n", tapns["ns"], "filter", "del", "dev", tapns["dev"], "egress")
        assert wait_for(lambda: changes == [False, True, False], 5), changes
        cap.attach()
        assert wait_for(lambda: changes == [False, True, False, True], 5), changes
    finally:
        watcher.stop()
        cap.close()


def test_drops_counted_when_ring_is_tiny(tapns: dict[str, Any]) -> None:
    # One page: 39 records of 104 bytes fit; the rest must be counted as drops.
    cap = start_capture(tapns, ring_bytes=os.sysconf("SC_PAGESIZE"))
    try:
        _, frame, _ = make_traffic()[0]
        sent = 200
        for _ in range(sent):
            inject(tapns, "in", frame)
        stats = cap.stats()
        assert stats["drops"] > 0
        assert stats["records"] + stats["drops"] == sent
        assert sum(stats["drops_per_cpu"]) == stats["drops"]
        assert stats["ring_used"] > 0
        drained = cap.drain()
        assert drained == stats["records"]
        # Traffic itself was never dropped: every frame was still delivered up.
        status = _ctl(tapns, "logging_status")
        assert status["drops"] == stats["drops"]
    finally:
        cap.close()


class _FailingOnceWriter:
    """A packet-log writer stub whose first tick fails as a full disk would."""

    def __init__(self) -> None:
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks == 1:
            raise OSError(28, "No space left on device")

    def write(self, recs: Any, n: int) -> None:
        raise AssertionError("no records in this test")


def test_flush_timer_survives_an_exception(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 13 item 7: one failing flush must not stop the 1-second flush for
    good; it is counted and logged once."""
    from relay.cext import lib

    writer = _FailingOnceWriter()
    cap = Capture("relay-test0", writer, ring_bytes=os.sysconf("SC_PAGESIZE"))  # type: ignore[arg-type]
    # The drain of a real (empty) ring, without bcc or a device: only the timer runs.
    cap._ring_fd = lib.relay_bpf_ringbuf_create(cap.ring_bytes)
    assert cap._ring_fd >= 0, "BPF ring buffer: needs root"
    cap._drain = lib.relay_drain_open(cap._ring_fd, cap.ring_bytes, segments.BLOCK_RECORDS)

    async def run() -> None:
        cap.start_drain(asyncio.get_running_loop())
        deadline = time.monotonic() + 10
        while writer.ticks < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cap.stop_drain()

    try:
        with caplog.at_level("ERROR", logger="relay.packetlog.capture"):
            asyncio.run(run())
    finally:
        cap.close()
    assert writer.ticks >= 4
    assert cap.flush_errors == 1
    [line] = [r.getMessage() for r in caplog.records]
    assert "flush failed on relay-test0" in line and "No space left" in line


def test_bpffs_mounted_where_there_is_none(tmp_path: Path) -> None:
    """Issue 13 item 11: a [capture] bpffs path without a bpffs (as /sys/fs/bpf under
    `ip netns exec`) gets one mounted; one that cannot be a mount point is a one-line
    error saying what to do. Run in a mount namespace of its own, as `ip netns exec`
    gives the relay."""
    target = tmp_path / "bpffs"
    code = ("from pathlib import Path; from relay.packetlog import tcfilter; "
            f"p = Path({str(target)!r}); "
            "print(tcfilter.is_bpffs(p), tcfilter.ensure_bpffs(p), tcfilter.is_bpffs(p), "
            "tcfilter.ensure_bpffs(p))")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                           "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "True", "False"]
    assert not tcfilter.is_bpffs(target)  # this test's own mount namespace is untouched

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(RelayError) as err:
        tcfilter.ensure_bpffs(blocked / "bpffs")
    assert str(err.value) == (f"[capture] bpffs {blocked}/bpffs: not a bpffs and cannot be made "
                              "a mount point (Not a directory): point [capture] bpffs at a "
                              "bpffs (mount -t bpf bpf DIR)")
