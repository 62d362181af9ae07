"""Steering to the workers (relay.serve.steer, ebpf/steer.c), on real kernel
objects in a network namespace the test makes: the TAP device's frames reach
the queue of their session MAC's worker, and UDP datagrams the socket of the
worker their OpenVPN peer id, DTLS App-ID or (once steered) source address
names, and new TCP connections the worker the control plane names; the
SO_REUSEPORT groups refuse a port someone else holds; a second relay cannot
attach to the first one's TAP device."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import in_netns

from relay.errors import RelayError
from relay.protocols import dtls
from relay.protocols.openvpn.wire import OPCODE_SHIFT, Opcode
from relay.serve import steer, tap
from relay.serve.steer import DTLS, OPENVPN, Steering

pytestmark = pytest.mark.netns


def sh(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"


@pytest.fixture
def ns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("steering needs root (network namespaces, TAP, BPF)")
    name = f"relaysteer-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def steering() -> Iterator[Steering]:
    s = Steering()
    try:
        yield s
    finally:
        s.close()


def received(socks: list[socket.socket]) -> list[list[bytes]]:
    """What each socket holds now (once the kernel has delivered: waits for the
    first datagram anywhere)."""
    select.select(socks, [], [], 5)
    out = []
    for sock in socks:
        got = []
        while True:
            try:
                got.append(sock.recv(4096))
            except BlockingIOError:
                break
        out.append(got)
    return out


def test_frames_reach_the_queue_of_their_sessions_worker(ns: str, steering: Steering) -> None:
    dev = f"rst{uuid.uuid4().hex[:6]}"
    queues = in_netns(ns, lambda: [tap._open_queue(dev, tap.IFF_TUN_EXCL if i == 0 else 0)
                                   for i in range(3)])
    try:
        # The device exists: a second relay's TUNSETIFF is refused, not attached.
        with pytest.raises(RelayError, match="is another relay running"):
            in_netns(ns, lambda: tap._open_queue(dev, tap.IFF_TUN_EXCL))
        steering.attach_tap(queues[0])
        # IPv6 would send neighbour solicitations of its own into the device.
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
        sh("ip", "-n", ns, "addr", "add", "10.9.0.1/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        macs = {1: bytes.fromhex("020000000001"), 2: bytes.fromhex("020000000002")}
        for worker, mac in macs.items():
            steering.set_mac(mac, worker)
            sh("ip", "-n", ns, "neigh", "replace", f"10.9.0.{10 + worker}", "lladdr",
               mac.hex(":"), "dev", dev, "nud", "permanent")
        sh("ip", "-n", ns, "neigh", "replace", "10.9.0.13", "lladdr", "02:00:00:00:00:03",
           "dev", dev, "nud", "permanent")

        def send() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for last in (11, 12, 12, 13):
                    s.sendto(b"x", (f"10.9.0.{last}", 9))

        in_netns(ns, send)
        got: list[list[bytes]] = [[] for _ in queues]
        select.select(queues, [], [], 5)
        for i, fd in enumerate(queues):
            while True:
                try:
                    got[i].append(os.read(fd, 2048)[:6])
                except BlockingIOError:
                    break
        assert got[1] == [macs[1]]
        assert got[2] == [macs[2], macs[2]]
        assert got[0] == [bytes.fromhex("020000000003")]  # no session's MAC: queue 0
        steering.drop_mac(macs[2])
        in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(
            b"x", ("10.9.0.12", 9)))
        select.select(queues[:1], [], [], 5)
        assert os.read(queues[0], 2048)[:6] == macs[2]
    finally:
        for fd in queues:
            os.close(fd)


def test_udp_datagrams_reach_the_worker_their_peer_id_app_id_or_address_names(
        ns: str, steering: Steering) -> None:
    def make() -> dict[str, Any]:
        out: dict[str, Any] = {
            OPENVPN: steer.udp_group("127.0.0.1", 0, 3),
            DTLS: steer.udp_group("127.0.0.1", 0, 3),
            "client": socket.socket(socket.AF_INET, socket.SOCK_DGRAM)}
        out["client"].bind(("127.0.0.1", 0))
        return out

    made = in_netns(ns, make)
    client: socket.socket = made["client"]
    here = client.getsockname()
    try:
        for kind in (OPENVPN, DTLS):
            socks = made[kind]
            assert len({s.getsockname() for s in socks}) == 1  # one port, three sockets
            steering.attach_udp(kind, socks[0])
        ovpn, dtls_socks = made[OPENVPN], made[DTLS]
        ovpn_at = ovpn[0].getsockname()

        def data_v2(worker: int) -> bytes:
            return bytes([Opcode.DATA_V2 << OPCODE_SHIFT, worker, 0, 1]) + b"payload"

        # Data packets by the peer id's top byte, whatever their source.
        for worker in (2, 0, 1):
            client.sendto(data_v2(worker), ovpn_at)
        got = received(ovpn)
        assert [[d[1] for d in g] for g in got] == [[0], [1], [2]]
        # Other datagrams by the steered address; without one, by the kernel's
        # hash (one socket, the same every time).
        control = bytes([Opcode.CONTROL_V1 << OPCODE_SHIFT]) + b"control"
        steering.set_peer(OPENVPN, here, 2)
        client.sendto(control, ovpn_at)
        assert [len(g) for g in received(ovpn)] == [0, 0, 1]
        steering.drop_peer(OPENVPN, here)
        for _ in range(3):
            client.sendto(control, ovpn_at)
        assert sorted(len(g) for g in received(ovpn)) == [0, 0, 3]
        # A peer id of no worker (a fourth) is left to the hash, not lost.
        client.sendto(data_v2(3), ovpn_at)
        assert sum(len(g) for g in received(ovpn)) == 1

        # DTLS: a ClientHello by its App-ID's first byte, then the channel's
        # records by the address its worker had steered.
        hello = bytearray(dtls.RECORD_HEADER_LEN + dtls.HANDSHAKE_HEADER_LEN
                          + dtls.HELLO_RANDOM_END + 1 + 32 + 1)
        hello[0] = dtls.CONTENT_HANDSHAKE
        hello[dtls.RECORD_HEADER_LEN] = dtls.HANDSHAKE_CLIENT_HELLO
        sid_at = dtls.RECORD_HEADER_LEN + dtls.HANDSHAKE_HEADER_LEN + dtls.HELLO_RANDOM_END
        hello[sid_at] = 32
        hello[sid_at + 1:sid_at + 33] = steer.app_id(1)
        client.sendto(bytes(hello), dtls_socks[0].getsockname())
        assert [len(g) for g in received(dtls_socks)] == [0, 1, 0]
        steering.set_peer(DTLS, ("::ffff:127.0.0.1", here[1]), 2)  # as a dual-stack worker names it
        record = bytes([dtls.CONTENT_APPLICATION_DATA]) + b"record"
        client.sendto(record, dtls_socks[0].getsockname())
        assert [len(g) for g in received(dtls_socks)] == [0, 0, 1]
    finally:
        for sock in [*ovpn, *dtls_socks, client]:
            sock.close()


def test_new_tcp_connections_go_to_the_worker_the_control_plane_names(
        ns: str, steering: Steering) -> None:
    def run() -> list[int]:
        group = steer.tcp_group("127.0.0.1", 0, 3)
        steering.attach_tcp(group[0])
        landed = []
        try:
            for least in (2, 0, 1, 2):
                steering.set_least(least)
                with socket.create_connection(group[0].getsockname(), timeout=5):
                    ready, _, _ = select.select(group, [], [], 5)
                    assert len(ready) == 1
                    conn, _ = ready[0].accept()
                    conn.close()
                    landed.append(group.index(ready[0]))
            steering.set_least(steer.HASH)  # no worker serves: the kernel's hash
            with socket.create_connection(group[0].getsockname(), timeout=5):
                assert len(select.select(group, [], [], 5)[0]) == 1
        finally:
            for sock in group:
                sock.close()
        return landed

    assert in_netns(ns, run) == [2, 0, 1, 2]


def test_a_group_refuses_a_port_another_program_holds(ns: str) -> None:
    def make() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # it would let us in
            other.bind(("127.0.0.1", 0))
            other.listen()
            port = other.getsockname()[1]
            with pytest.raises(RelayError, match=rf"cannot listen on 127\.0\.0\.1:{port}: "
                                                 "Address already in use"):
                steer.tcp_group("127.0.0.1", port, 2)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind(("127.0.0.1", port))
                with pytest.raises(RelayError, match=r"\[openvpn\] listen: UDP: cannot listen"):
                    steer.udp_group("127.0.0.1", port, 2, "[openvpn] listen: ")

    in_netns(ns, make)


def test_peer_keys_and_ids_name_the_worker() -> None:
    assert steer.peer_key(("198.51.100.7", 1194)) == steer.peer_key(("::ffff:198.51.100.7", 1194))
    assert steer.peer_key(("198.51.100.7", 1194)) != steer.peer_key(("198.51.100.7", 1195))
    assert steer.peer_id(3, 5) >> steer.PEER_ID_WORKER_SHIFT == 3
    assert steer.peer_id(3, steer.PEER_ID_PER_WORKER + 5) == steer.peer_id(3, 5)
    app = steer.app_id(7)
    assert app[0] == 7 and len(app) == 32 and steer.app_id(7) != app
