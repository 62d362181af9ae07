"""End to end: the stock ``openvpn`` 2.6 client through ``relay serve`` in
namespaces, over TCP and UDP, ``dev tun`` and ``dev tap``, with AES-256-GCM and
CHACHA20-POLY1305, with and without tls-crypt; a client whose NAT rebinds keeps
its session."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import records, scrape, wait_records

from relay.clientconfig import openvpn_config
from relay.config import Config, OpenVPNConfig
from relay.netns import INTERNET_IP, Topology, client_ip, relay_ip, run, wait_for
from relay.packetlog import segments

pytestmark = pytest.mark.netns

OPENVPN_PORT = 1194


def openvpn_version() -> str:
    if shutil.which("openvpn") is None:
        pytest.fail("the openvpn client is missing: apt-get install openvpn (./run.sh setup)")
    out = subprocess.run(["openvpn", "--version"], capture_output=True, text=True).stdout
    return re.search(r"OpenVPN (\d+\.\d+\.\d+)", out).group(1)  # type: ignore[union-attr]


def start_openvpn(topo: Topology, data: Path, proto: str, dev: str, i: int = 1,
                  extra: str = "", cfg: Config | None = None) -> subprocess.Popen[bytes]:
    """The stock client with the config ``relay client-config openvpn`` writes for
    ``cfg`` (plus ``extra`` lines); waits until it reports the tunnel up."""
    conf = topo.workdir / f"client-{i}-{proto}-{dev}.ovpn"
    conf.write_text(openvpn_config((cfg or Config()).with_data_dir(data), data, proto, dev,
                                   remote=relay_ip(i)) + extra)
    log_name = f"openvpn-{i}.log"
    proc = topo.spawn(topo.client_ns(i), ["openvpn", "--config", str(conf)], log_name)
    wait_for(lambda: "Initialization Sequence Completed" in topo.log(log_name)
             or proc.poll() is not None, 30, f"openvpn in {topo.client_ns(i)} to connect")
    if proc.poll() is not None:
        raise AssertionError(f"openvpn exited: {topo.log(log_name)[-3000:]}")
    return proc


def interface(topo: Topology, dev: str, i: int = 1) -> tuple[str, str]:
    """(IPv4 address, MAC or "") of the client's tun0/tap0."""
    out = run(["ip", "-o", "-4", "addr", "show", "dev", f"{dev}0"], topo.client_ns(i)).stdout
    addr = out.split("inet ")[1].split("/")[0]
    link = run(["ip", "-o", "link", "show", f"{dev}0"], topo.client_ns(i)).stdout
    mac = link.split("link/ether ")[1].split()[0] if "link/ether" in link else ""
    return addr, mac


def client_port(topo: Topology, proto: str, i: int = 1) -> int:
    """The client's source port towards the relay, as the client sees it."""
    if proto == "tcp":
        out = run(["ss", "-Htn", "state", "established", "dst",
                   f"{relay_ip(i)}:{OPENVPN_PORT}"], topo.client_ns(i)).stdout.split()
        return int(out[2].rsplit(":", 1)[1])
    out = run(["ss", "-Huan"], topo.client_ns(i)).stdout.split()
    return int(out[3].rsplit(":", 1)[1])  # openvpn's is the namespace's only UDP socket


@pytest.mark.parametrize("tls_crypt", [False, True], ids=["", "tls-crypt"])
@pytest.mark.parametrize("cipher", ["AES-256-GCM", "CHACHA20-POLY1305"])
@pytest.mark.parametrize(("proto", "dev"), [("tcp", "tun"), ("udp", "tun"), ("tcp", "tap"),
                                            ("udp", "tap")])
def test_stock_openvpn_client_fetches_a_page_with_records_and_stamp(
        make_topology: Callable[..., Topology], proto: str, dev: str, cipher: str,
        tls_crypt: bool) -> None:
    version = openvpn_version()
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data, extra_tables=f"[openvpn]\ntls_crypt = {str(tls_crypt).lower()}\n")
    # The relay's .ovpn offers both ciphers (the relay picks AES-256-GCM); a client
    # that offers only CHACHA20-POLY1305 (no AES instructions) gets that.
    client = start_openvpn(topo, data, proto, dev,
                           cfg=Config(openvpn=OpenVPNConfig(tls_crypt=tls_crypt)),
                           extra=f"data-ciphers {cipher}\n")
    # (With tls_crypt the relay answers only wrapped packets: the client connected, so
    # it wrapped them.)
    assert f"Data Channel: cipher '{cipher}'" in topo.log("openvpn-1.log")
    vip, mac = interface(topo, dev)
    port = client_port(topo, proto)

    ua = "e2e-openvpn/1.0"
    assert "hello from the internet namespace" in topo.curl(1, "/", "-A", ua)
    big = topo.curl(1, "/big.bin", "-o", "/dev/null", "-w", "%{size_download}")
    assert int(big) == 4 * 1024 * 1024
    [connect] = records(data, "connect")
    tag = connect["session_id"][:8]
    # The NAT address at the web server, and the User-Agent tail stamped in place.
    logged = topo.access_log(f'"GET / HTTP/1.1" 200 "{ua[:-8]}{tag}"')
    assert logged.splitlines()[0].startswith("198.19.0.1 ")

    # Packet records carry the session and the client's physical address.
    def ours() -> list[dict[str, Any]]:
        return [r for r in segments.iter_records(data)
                if r["session_id"] == connect["session_id"] and r["dst_port"] == 80]

    wait_for(ours, 20, "packet records of the session")
    for r in ours():
        assert (r["client_ip"], r["client_port"], r["src_ip"]) == (client_ip(1), port, vip)

    client.send_signal(signal.SIGTERM)
    client.wait(15)
    wait_for(lambda: records(data, "disconnect"), 20, "the disconnect record")
    [disconnect] = records(data, "disconnect")
    for rec in (connect, disconnect):
        assert rec["session_id"] == connect["session_id"]
        assert rec["protocol"] == "OpenVPN"
        assert rec["server"]["ip"] == relay_ip(1)
        assert rec["client"]["ip"] == client_ip(1) and rec["client"]["port"] == port
        assert rec["virtual_ip"] == vip
        sw = rec["client_software"]
        assert (sw["name"], sw["version"], sw["platform"]) == ("OpenVPN", version, "linux")
        assert "id" in sw and "gui" in sw
    assert disconnect["packets"]["in"] > 100 and disconnect["packets"]["out"] > 2000
    assert disconnect["bytes"]["out"] > 4 * 1024 * 1024 > disconnect["bytes"]["in"] > 0
    if proto == "udp":  # explicit-exit-notify
        assert disconnect["reason"] == "client-disconnect: exit notification (OCC_EXIT)"
    else:
        assert disconnect["reason"] in ("connection-closed", "connection-lost")
    if dev == "tap":  # the client's tap device took the session MAC the relay pushed
        assert mac and "lladdr" in topo.log("openvpn-1.log")
        assert f"link layer address set to {mac}" in topo.log("openvpn-1.log")


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_client_renegotiation_keeps_the_session(make_topology: Callable[..., Topology],
                                                proto: str) -> None:
    openvpn_version()
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    start_openvpn(topo, data, proto, "tun", extra="reneg-sec 3\n")
    wait_for(lambda: topo.log("openvpn-1.log").count("TLS: soft reset") >= 2, 20,
             "two renegotiations")
    assert "hello" in topo.curl(1, "/")
    wait_for(lambda: topo.log("openvpn-1.log").count("TLS: soft reset") >= 3, 20,
             "a third renegotiation")
    assert "hello" in topo.curl(1, "/")
    assert len(records(data, "connect")) == 1 and records(data, "disconnect") == []
    assert "TLS Error" not in topo.log("openvpn-1.log")


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_tls_crypt_with_the_key_from_the_client_config(make_topology: Callable[..., Topology],
                                                       proto: str) -> None:
    openvpn_version()
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data, extra_tables="[openvpn]\ntls_crypt = true\n")
    cfg = Config(openvpn=OpenVPNConfig(tls_crypt=True))
    assert "<tls-crypt>" in openvpn_config(cfg.with_data_dir(data), data, proto, "tun")
    key = data / "tls" / "tls-crypt.key"
    assert key.stat().st_mode & 0o777 == 0o600
    # A reset without the key gets no answer at all.
    forged = run([sys.executable, str(Path(__file__).with_name("openvpn_hostile.py")),
                  "resets", "--dst", f"{relay_ip(1)}:{OPENVPN_PORT}", "--src",
                  f"{client_ip(1)}:40999", "--count", "5", "--quiet", "3"],
                 topo.client_ns(1)).stdout
    assert '"replies": []' in forged and forged.count("40999") == 5
    # The stock client with the key connects: every control packet it sends is wrapped.
    start_openvpn(topo, data, proto, "tun", cfg=cfg, extra="reneg-sec 3\n")
    assert "hello" in topo.curl(1, "/")
    wait_for(lambda: topo.log("openvpn-1.log").count("TLS: soft reset") >= 2, 20,
             "two renegotiations under tls-crypt")
    assert "hello" in topo.curl(1, "/")
    assert "tls-crypt unwrap error" not in topo.log("openvpn-1.log")
    assert len(records(data, "connect")) == 1 and records(data, "disconnect") == []


HOSTILE = r"""
import os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for payload in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x00", b"\x05\x00" + os.urandom(5)):
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(payload)
    try:
        s.recv(100)
    except OSError:
        pass
    s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for n in (1, 14, 200, 1400):
    u.sendto(os.urandom(n), (host, port))
"""


def test_hostile_input_is_dropped_with_a_log_line_and_the_relay_keeps_serving(
        make_topology: Callable[..., Topology]) -> None:
    openvpn_version()
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    run([sys.executable, "-c", HOSTILE, relay_ip(1), str(OPENVPN_PORT)], topo.client_ns(1))
    lines = ("OpenVPN/UDP: dropped", "does not start with P_CONTROL_HARD_RESET_CLIENT_V2",
             "0-byte packet in the TCP stream")
    # The relay logs each as its connection ends, which can be after the client is done.
    wait_for(lambda: all(line in topo.log("relay.log") for line in lines), 30,
             "a log line for each hostile input")
    assert "Traceback" not in topo.log("relay.log")
    start_openvpn(topo, data, "udp", "tun")
    assert "hello" in topo.curl(1, "/")
    assert "dev tun0" in run(["ip", "route", "get", INTERNET_IP], topo.client_ns(1)).stdout


# The client's NAT rebinding, done statelessly by nftables in the client's namespace
# from the moment the rules go in: its datagrams to the relay leave from NEW_PORT,
# and the relay's answers to NEW_PORT reach the client's socket.
NEW_PORT = 40001
REBIND = """
table ip rebind {{
  chain out {{
    type filter hook output priority raw; policy accept;
    ip daddr {relay} udp dport {relay_port} udp sport {port} notrack udp sport set {new}
  }}
  chain in {{
    type filter hook prerouting priority raw; policy accept;
    ip saddr {relay} udp sport {relay_port} udp dport {new} notrack udp dport set {port}
  }}
}}
"""
FORGE = r"""
import os, socket, sys
host, port, peer_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 40998))
for i in range(5):  # P_DATA_V2 of the session's peer id, a fresh packet id, no valid tag
    s.sendto(bytes([9 << 3]) + peer_id.to_bytes(3, "big") + ((1 << 31) + i).to_bytes(4, "big")
             + os.urandom(60), (host, port))
"""


def test_a_client_whose_nat_rebinds_keeps_its_session(
        make_topology: Callable[..., Topology]) -> None:
    openvpn_version()
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    client = start_openvpn(topo, data, "udp", "tun")
    port = client_port(topo, "udp")
    assert "hello" in topo.curl(1, "/")
    [connect] = records(data, "connect")
    sid = connect["session_id"]
    peer_id = int(re.search(r"peer-id (\d+)", topo.log("openvpn-1.log")).group(1))  # type: ignore[union-attr]

    # Packets of the session's peer id from another port that do not authenticate
    # move nothing: they are dropped and counted, and the session stays.
    unproven = ("relay_dropped_packets_total", (("reason", "openvpn-unproven"),))
    before = scrape(topo).get(unproven, 0)
    run([sys.executable, "-c", FORGE, relay_ip(1), str(OPENVPN_PORT), str(peer_id)],
        topo.client_ns(1))
    wait_for(lambda: scrape(topo).get(unproven, 0) >= before + 5, 10,
             "the forged packets counted")
    assert "hello" in topo.curl(1, "/")
    assert records(data, "client-float") == []

    # The NAT rebinds: the next packets come from NEW_PORT, and the session follows.
    run(["nft", "-f", "-"], topo.client_ns(1), input=REBIND.format(
        relay=relay_ip(1), relay_port=OPENVPN_PORT, port=port, new=NEW_PORT))
    ua = "e2e-float/1.0"
    assert "hello" in topo.curl(1, "/", "-A", ua)
    [moved] = wait_records(data, "client-float", 1)
    assert moved["session_id"] == sid
    assert moved["from"] == {"ip": client_ip(1), "port": port}
    assert moved["to"] == {"ip": client_ip(1), "port": NEW_PORT}
    assert moved["server"]["id"] == "relay-1"
    assert scrape(topo)[("relay_openvpn_floats_total", ())] == 1
    # Still the same session: the stamp and the packet log name it, at the new port.
    topo.access_log(f'"GET / HTTP/1.1" 200 "{ua[:-8]}{sid[:8]}"')

    def web() -> list[dict[str, Any]]:
        return [r for r in segments.iter_records(data)
                if r["session_id"] == sid and 80 in (r["src_port"], r["dst_port"])]

    wait_for(lambda: any(r["client_port"] == NEW_PORT for r in web()), 20,
             "packet records at the new port")
    # Each connection's packets name one client address, from the SYN on: the
    # float's first packets wait in the worker until the capture names the new port.
    ports: dict[int, set[int]] = {}
    for r in web():
        ports.setdefault(r["src_port"] if r["dst_port"] == 80 else r["dst_port"],
                         set()).add(r["client_port"])
    assert sorted(map(sorted, ports.values())) == sorted([[port], [port], [NEW_PORT]])
    assert {r["client_ip"] for r in web()} == {client_ip(1)}

    client.send_signal(signal.SIGTERM)
    client.wait(15)
    [disconnect] = wait_records(data, "disconnect", 1)
    assert disconnect["reason"] == "client-disconnect: exit notification (OCC_EXIT)"
    assert disconnect["client"]["ip"] == client_ip(1)
    assert disconnect["client"]["port"] == NEW_PORT
    assert disconnect["floats"] == [{"time": moved["time"], "from": moved["from"],
                                     "to": moved["to"]}]
    assert len(records(data, "connect")) == 1
