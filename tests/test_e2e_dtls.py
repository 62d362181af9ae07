"""End to end: the DTLS data channel with the stock openconnect client (its
defaults: PSK-NEGOTIATE), beside a --no-dtls client; the fall-back to TLS when UDP
is blocked; and datagrams spoofed from raw sockets, which must change nothing."""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import records, scrape, wait_records

from relay.netns import Topology, client_ip, relay_ip, run, wait_for

pytestmark = pytest.mark.netns

DTLS_UP = "Established DTLS connection"
DTLS_DEAD = "DTLS Dead Peer Detection detected dead peer"
# A short DPD interval, so that a dead DTLS channel is noticed within seconds
# (openconnect: 2 intervals without an answer; the relay: 3).
FAST_DPD = 'dpd = "2s"\n'


def metric(topo: Topology, name: str, **labels: str) -> float:
    return scrape(topo).get((name, tuple(sorted(labels.items()))), 0.0)


def tshark_start(topo: Topology, dev: str, pcap: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["ip", "netns", "exec", topo.relay_ns, "tshark", "-n", "-q", "-i",
                             dev, "-w", str(pcap)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_for(lambda: pcap.exists() and pcap.stat().st_size > 0, 20, "tshark to start")
    return proc


def tshark_count(pcap: Path, display_filter: str) -> int:
    out = subprocess.run(["tshark", "-n", "-r", str(pcap), "-Y", display_filter, "-T", "fields",
                          "-e", "frame.number"], capture_output=True, text=True, check=True)
    return len(out.stdout.split())


def udp_port_of(topo: Topology, i: int) -> int:
    """The source port of openconnect's UDP socket towards the relay."""
    out = run(["ss", "-Hun", "dst", f"{relay_ip(i)}:443"], topo.client_ns(i)).stdout.split()
    return int(out[3].rsplit(":", 1)[1])


def test_openconnect_defaults_carry_the_tunnel_over_dtls_beside_a_no_dtls_client(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(2)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    dtls_client = topo.connect_openconnect(1, data)
    topo.connect_openconnect(2, data, extra=["--no-dtls"])
    wait_for(lambda: DTLS_UP in topo.log("openconnect-1.log"), 30, "openconnect's DTLS")
    assert metric(topo, "relay_dtls_channels_up") == 1

    pcap = topo.workdir / "c1.pcap"
    tshark = tshark_start(topo, "c1", pcap)
    try:
        size = topo.curl(1, "/big.bin", "-o", "/dev/null", "-w", "%{size_download}")
        assert int(size) == 4 * 1024 * 1024
        topo.curl(1, "/?dtls", "-A", "dtls-agent/1.0 (X11)")
        time.sleep(1)  # the last packets into the capture file
    finally:
        tshark.send_signal(signal.SIGINT)
        tshark.wait(15)
    # 4 MiB came over UDP (about 3000 datagrams of the tunnel's 1400-byte packets);
    # the TLS connection carried only CSTP keepalives and DPDs, if anything.
    assert tshark_count(pcap, f"udp.srcport == 443 && ip.dst == {client_ip(1)}") > 2500
    assert tshark_count(pcap, "tcp.port == 443 && tcp.len > 0") < 20

    # The --no-dtls client works over TLS, the same relay, the same records.
    assert "hello from the internet namespace" in topo.curl(2, "/", "-A", "tls-agent/1.0")

    connects = {r["virtual_ip"]: r for r in wait_records(data, "connect", 2)}
    dtls_rec, tls_rec = connects[topo.tunnel_ip(1)], connects[topo.tunnel_ip(2)]
    assert dtls_rec["data_channel"] == "DTLS" and tls_rec["data_channel"] == "TLS"
    # The User-Agent was stamped on its way through the DTLS channel.
    tag = dtls_rec["session_id"][:8]
    topo.access_log(f'"GET /?dtls HTTP/1.1" 200 "{"dtls-agent/1.0 (X11)"[:-8] + tag}"')
    # ... and its packets are in the packet log, under its session.
    sid = dtls_rec["session_id"]

    def http_packets() -> list[dict[str, object]]:
        out = subprocess.run([sys.executable, "-m", "relay.cli", "logs", "packets", "--json",
                              "--session", sid, "--data-dir", str(data)],
                             capture_output=True, text=True, check=True).stdout
        return [r for r in map(json.loads, out.splitlines()) if r["dst_port"] == 80]

    wait_for(lambda: len(http_packets()) > 100, 20, "the DTLS session's packets in the log")
    assert {r["client_ip"] for r in http_packets()} == {client_ip(1)}

    dtls_client.send_signal(signal.SIGINT)
    dtls_client.wait(15)
    [disconnect] = wait_records(data, "disconnect", 1)
    assert disconnect["session_id"] == sid and disconnect["data_channel"] == "DTLS"
    assert disconnect["bytes"]["out"] > 4 * 1024 * 1024
    assert disconnect["reason"].startswith("client-disconnect")


def test_blocking_udp_moves_the_tunnel_to_tls_and_keeps_the_session(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data, server_keys=FAST_DPD)
    client = topo.connect_openconnect(1, data)
    wait_for(lambda: DTLS_UP in topo.log("openconnect-1.log"), 30, "openconnect's DTLS")
    vip = topo.tunnel_ip(1)
    assert "hello" in topo.curl(1, "/")

    # A middlebox that drops UDP both ways: silently, as on the path (in the relay
    # namespace, so the client's own sends succeed).
    run(["nft", "-f", "-"], topo.relay_ns, input=(
        "table inet block_udp {\n"
        '  chain in { type filter hook input priority 0; iifname "c1" udp dport 443 drop; }\n'
        '  chain out { type filter hook output priority 0; oifname "c1" udp sport 443 drop; }\n'
        "}\n"))
    wait_for(lambda: DTLS_DEAD in topo.log("openconnect-1.log"), 30,
             "openconnect to give up on DTLS")
    wait_for(lambda: "DTLS down" in topo.log("relay.log"), 30, "the relay to give up on DTLS")
    # Both ways over TLS now, in the same session.
    size = topo.curl(1, "/big.bin", "-o", "/dev/null", "-w", "%{size_download}")
    assert int(size) == 4 * 1024 * 1024
    assert topo.tunnel_ip(1) == vip and client.poll() is None
    assert len(records(data, "connect")) == 1 and records(data, "disconnect") == []
    assert metric(topo, "relay_dtls_channels_up") == 0
    assert metric(topo, "relay_dtls_fallbacks_total") == 1


def spoofed_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 UDP datagram with any source (checksum 0: none, RFC 768)."""
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64,
                         socket.IPPROTO_UDP, 0, socket.inet_aton(src[0]),
                         socket.inet_aton(dst[0]))
    return header + udp


def client_hello(session_id: bytes, cookie: bytes = b"") -> bytes:
    """A DTLS 1.2 ClientHello as GnuTLS sends it for openconnect (no extensions)."""
    body = (b"\xfe\xfd" + bytes(range(32)) + bytes((len(session_id),)) + session_id
            + bytes((len(cookie),)) + cookie + b"\x00\x02\x00\xa8" + b"\x01\x00")
    hs = b"\x01" + len(body).to_bytes(3, "big") + b"\x00\x00" + b"\x00\x00\x00" \
        + len(body).to_bytes(3, "big") + body
    return b"\x16\xfe\xff" + b"\x00\x00" + b"\x00" * 6 + len(hs).to_bytes(2, "big") + hs


SPOOF = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for line in sys.stdin:
    packet = bytes.fromhex(line.strip())
    s.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))
"""


def test_spoofed_datagrams_never_end_a_session_nor_move_it(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    topo.connect_openconnect(1, data, extra=["-v"])
    wait_for(lambda: DTLS_UP in topo.log("openconnect-1.log"), 30, "openconnect's DTLS")
    app_id = bytes.fromhex(re.search(r"X-DTLS-App-ID: ([0-9a-f]+)",
                                     topo.log("openconnect-1.log")).group(1))  # type: ignore[union-attr]
    port = udp_port_of(topo, 1)
    me, relay = (client_ip(1), port), (relay_ip(1), 443)
    other = (client_ip(1), port + 1 if port < 65535 else port - 1)
    verified_before = metric(topo, "relay_dtls_hello_verify_total")

    packets = []
    for n in range(200):
        # Records "from" the client's own UDP address: a forged DISCONNECT and
        # data, in the epoch of the session's channel (it cannot seal them).
        record = b"\x17\xfe\xfd\x00\x01" + (10**6 + n).to_bytes(6, "big")
        packets.append(spoofed_udp(me, relay, record + b"\x00\x20" + bytes((5,)) * 32))
    # ClientHellos with the session's App-ID, from the client's address and from
    # another port, without a cookie and with a made-up one: each gets a
    # HelloVerifyRequest (RFC 6347 treats a bad cookie as none) and nothing is kept.
    for src in (me, other):
        packets.append(spoofed_udp(src, relay, client_hello(app_id)))
        packets.append(spoofed_udp(src, relay, client_hello(app_id, b"\x42" * 32)))
    subprocess.run(["ip", "netns", "exec", topo.client_ns(1), sys.executable, "-c", SPOOF],
                   input="\n".join(p.hex() for p in packets), text=True, check=True)

    wait_for(lambda: metric(topo, "relay_dtls_hello_verify_total") >= verified_before + 2, 10,
             "the cookie answers")
    assert metric(topo, "relay_dtls_handshakes_total", result="completed") == 1
    assert metric(topo, "relay_dtls_channels_up") == 1
    assert metric(topo, "relay_handshakes_in_progress") == 0
    # The session is whole, still on DTLS from the same address, and carries traffic.
    size = topo.curl(1, "/big.bin", "-o", "/dev/null", "-w", "%{size_download}")
    assert int(size) == 4 * 1024 * 1024
    assert udp_port_of(topo, 1) == port
    assert "DTLS down" not in topo.log("relay.log")
    assert DTLS_DEAD not in topo.log("openconnect-1.log")
    assert len(records(data, "connect")) == 1 and records(data, "disconnect") == []
