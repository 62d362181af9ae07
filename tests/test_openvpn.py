"""The sans-IO OpenVPN server, byte by byte, against a minimal client written
here from the same wire formats (the stock client is in test_e2e_openvpn.py)."""

from __future__ import annotations

import os
import ssl
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay import openvpn as ov
from relay.openvpn import Opcode
from relay.tlsconf import server_context

T0 = 1000.0
PEER_INFO = ("IV_VER=2.6.14\nIV_PLAT=linux\nIV_TCPNL=1\nIV_MTU=1600\nIV_NCP=2\n"
             "IV_CIPHERS=AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305\nIV_PROTO=990\n"
             "IV_HWADDR=02:00:00:00:00:01\nIV_GUI_VER=test-gui 1.0\n")
OPTIONS = "V4,dev-type tun,link-mtu 1559,tun-mtu 1500,proto UDPv4,cipher AES-256-GCM,tls-client"
PARAMS = ov.PushParams(address="10.211.0.5", netmask="255.255.0.0", gateway="10.211.0.1",
                       mtu=1400)


# --- a minimal client ------------------------------------------------------------------


def frame(pkt: bytes) -> bytes:
    return struct.pack("!H", len(pkt)) + pkt


def unframe(data: bytes) -> list[bytes]:
    out = []
    while data:
        (n,) = struct.unpack_from("!H", data)
        out.append(data[2:2 + n])
        data = data[2 + n:]
    return out


def string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("!H", len(raw)) + raw


class Client:
    def __init__(self, cert: Path, tcp: bool = False, options: str = OPTIONS) -> None:
        self.tcp = tcp
        self.options = options
        self.sid = os.urandom(8)
        self.remote_sid = b""
        self.keys: dict[int, ClientKey] = {}
        self.cert = cert
        self.new_key(0)

    def new_key(self, key_id: int) -> ClientKey:
        k = self.keys[key_id] = ClientKey(key_id, self.cert)
        return k

    def control(self, op: Opcode, payload: bytes = b"", key_id: int = 0) -> bytes:
        k = self.keys[key_id]
        acks, k.acks = k.acks[:4], k.acks[4:]
        pkt = ov.build_control(op, key_id, self.sid, acks, self.remote_sid, k.next_pid, payload)
        k.next_pid += 1
        return frame(pkt) if self.tcp else pkt

    def ack_packet(self, key_id: int = 0) -> bytes:
        k = self.keys[key_id]
        acks, k.acks = k.acks, []
        pkt = ov.build_control(Opcode.ACK_V1, key_id, self.sid, acks, self.remote_sid, None)
        return frame(pkt) if self.tcp else pkt

    def absorb(self, out: list[bytes]) -> list[ov.ControlPacket]:
        """Take the server's packets: ACK them, feed TLS records in order."""
        pkts = [p for chunk in out for p in (unframe(chunk) if self.tcp else [chunk])]
        seen = []
        for raw in pkts:
            if raw[0] >> 3 in (Opcode.DATA_V2, Opcode.DATA_V1):
                continue
            p = ov.parse_control(raw)
            seen.append(p)
            self.remote_sid = p.session_id
            k = self.keys[p.key_id]
            if p.packet_id is None:
                continue
            k.acks.append(p.packet_id)
            k.buffered.setdefault(p.packet_id, p)
            while k.recv_next in k.buffered:
                q = k.buffered.pop(k.recv_next)
                k.recv_next += 1
                if q.opcode is Opcode.CONTROL_V1:
                    k.incoming.write(q.payload)
        return seen

    def tls_packets(self, key_id: int = 0) -> list[bytes]:
        """Advance the TLS client; control packets carrying what it wrote."""
        k = self.keys[key_id]
        try:
            if not k.handshake_done:
                k.tls.do_handshake()
                k.handshake_done = True
            while data := k.tls.read(65536):
                k.plaintext += data
        except ssl.SSLWantReadError:
            pass
        out = []
        pending = k.outgoing.read()
        while pending:
            out.append(self.control(Opcode.CONTROL_V1, pending[:1000], key_id))
            pending = pending[1000:]
        return out

    def send_text(self, data: bytes, key_id: int = 0) -> list[bytes]:
        self.keys[key_id].tls.write(data)
        return self.tls_packets(key_id)

    def key_method_2(self, key_id: int = 0, user: str = "anyone", password: str = "pw",
                     peer_info: str = PEER_INFO) -> bytes:
        k = self.keys[key_id]
        k.pre_master, k.random1, k.random2 = os.urandom(48), os.urandom(32), os.urandom(32)
        return (b"\0\0\0\0\x02" + k.pre_master + k.random1 + k.random2 + string(self.options)
                + string(user) + string(password) + string(peer_info))

    def derive(self, key_id: int = 0) -> None:
        """Data keys from the server's key-method 2 reply (in the TLS plaintext)."""
        k = self.keys[key_id]
        msg = k.plaintext
        assert msg[:5] == b"\0\0\0\0\x02"
        s_random1, s_random2 = msg[5:37], msg[37:69]
        (n,) = struct.unpack_from("!H", msg, 69)
        end = 71 + n + 6  # options, then empty user, password and peer-info
        assert msg[71 + n:end] == b"\0" * 6
        k.plaintext = msg[end:]
        key2 = ov.derive_key2(k.pre_master, k.random1, s_random1, k.random2, s_random2,
                              self.sid, self.remote_sid)
        k.enc, k.enc_iv = AESGCM(key2[:32]), key2[64:72]
        k.dec, k.dec_iv = AESGCM(key2[128:160]), key2[192:200]

    def data(self, payload: bytes, key_id: int = 0, peer_id: int = 7,
             pid: int | None = None) -> bytes:
        k = self.keys[key_id]
        if pid is None:
            k.send_pid += 1
            pid = k.send_pid
        pid_b = pid.to_bytes(4, "big")
        head = bytes([(Opcode.DATA_V2 << 3) | key_id]) + peer_id.to_bytes(3, "big") + pid_b
        ct = k.enc.encrypt(pid_b + k.enc_iv, payload, head)
        pkt = head + ct[-16:] + ct[:-16]
        return frame(pkt) if self.tcp else pkt

    def open_data(self, pkt: bytes) -> bytes:
        if self.tcp:
            [pkt] = unframe(pkt)
        assert pkt[0] >> 3 == Opcode.DATA_V2
        k = self.keys[pkt[0] & 7]
        head, tag, ct = pkt[:8], pkt[8:24], pkt[24:]
        return k.dec.decrypt(pkt[4:8] + k.dec_iv, ct + tag, head)


class ClientKey:
    def __init__(self, key_id: int, cert: Path) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cert)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=False)
        self.handshake_done = False
        self.plaintext = b""
        self.next_pid = 0
        self.recv_next = 0
        self.buffered: dict[int, ov.ControlPacket] = {}
        self.acks: list[int] = []
        self.send_pid = 0
        self.pre_master = self.random1 = self.random2 = b""
        self.enc = self.dec = AESGCM(bytes(32))
        self.enc_iv = self.dec_iv = b""


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    return server_context(tmp_path, "", "")


def feed(server: ov.OpenVPNServer, client: Client, pkts: list[bytes],
         now: float = T0) -> list[ov.Event]:
    events: list[ov.Event] = []
    for p in pkts:
        events += (server.receive_data(p, now) if client.tcp
                   else server.receive_datagram(p, now))
    return events


def exchange(server: ov.OpenVPNServer, client: Client, pkts: list[bytes], now: float = T0,
             key_id: int = 0) -> list[ov.Event]:
    """Deliver ``pkts`` and play the client's TLS until nothing moves."""
    events: list[ov.Event] = []
    while pkts:
        events += feed(server, client, pkts, now)
        client.absorb(server.packets_to_send())
        pkts = client.tls_packets(key_id)
    k = client.keys[key_id]
    if k.acks:
        events += feed(server, client, [client.ack_packet(key_id)], now)
    return events


def connect(tls: tuple[ssl.SSLContext, Path], tcp: bool = False,
            **km2: str) -> tuple[ov.OpenVPNServer, Client, list[ov.Event]]:
    """Reset, TLS handshake and key-method 2: the server's ClientAuth event."""
    ctx, cert = tls
    server = ov.OpenVPNServer(ctx, tcp=tcp, peer_id=7, now=T0)
    client = Client(cert, tcp=tcp)
    events = exchange(server, client, [client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2)])
    assert client.keys[0].handshake_done and not events
    events = exchange(server, client, client.send_text(client.key_method_2(**km2)))
    if client.keys[0].plaintext:  # the server answered with its key-method 2
        client.derive()
    return server, client, events


def tunnel(tls: tuple[ssl.SSLContext, Path],
           tcp: bool = False) -> tuple[ov.OpenVPNServer, Client]:
    server, client, events = connect(tls, tcp)
    events = exchange(server, client, client.send_text(b"PUSH_REQUEST\0"))
    assert events == [ov.PushRequest()]
    exchange(server, client, [])
    server.push_reply(PARAMS, T0)
    client.absorb(server.packets_to_send())
    client.tls_packets()
    assert client.keys[0].plaintext.startswith(b"PUSH_REPLY,")
    feed(server, client, [client.ack_packet()])
    return server, client


# --- the PRF and key derivation --------------------------------------------------------


def test_tls1_prf_matches_openvpns_own_test_vector() -> None:
    # tests/unit_tests/openvpn/test_crypto.c (crypto_test_tls_prf): an odd-length
    # secret, so the MD5 and SHA-1 halves overlap by one byte.
    secret = (b"Lorem ipsum dolor sit amet, consectetur adipisici elit, sed eiusmod tempor "
              b"incidunt ut labore et dolore magna aliqua.")
    seed = b"Quis aute iure reprehenderit in voluptate velit esse cillum dolore"
    assert len(secret) % 2 == 1
    assert ov.tls1_prf(secret, seed, 32) == bytes.fromhex(
        "d98c8518c85e946927916acfc2d592fbb1567e4b4b1459e6a904ac2ddab72d67")


def test_key_expansion_is_two_prf_rounds_with_both_session_ids() -> None:
    pre, cr1, sr1, cr2, sr2 = (bytes([i]) * n for i, n in
                               ((1, 48), (2, 32), (3, 32), (4, 32), (5, 32)))
    csid, ssid = b"C" * 8, b"S" * 8
    master = ov.tls1_prf(pre, b"OpenVPN master secret" + cr1 + sr1, 48)
    expected = ov.tls1_prf(master, b"OpenVPN key expansion" + cr2 + sr2 + csid + ssid, 256)
    key2 = ov.derive_key2(pre, cr1, sr1, cr2, sr2, csid, ssid)
    assert key2 == expected and len(key2) == 256
    # Swapping the session ids (a server that mixed up its roles) changes every key.
    assert ov.derive_key2(pre, cr1, sr1, cr2, sr2, ssid, csid)[:32] != key2[:32]


# --- packets -------------------------------------------------------------------------------


def test_control_packet_round_trip_and_truncation() -> None:
    pkt = ov.build_control(Opcode.CONTROL_V1, 3, b"A" * 8, [5, 6], b"B" * 8, 9, b"tls")
    p = ov.parse_control(pkt)
    assert (p.opcode, p.key_id, p.session_id, p.acks, p.remote_session_id, p.packet_id,
            p.payload) == (Opcode.CONTROL_V1, 3, b"A" * 8, (5, 6), b"B" * 8, 9, b"tls")
    ack = ov.parse_control(ov.build_control(Opcode.ACK_V1, 0, b"A" * 8, [1], b"B" * 8, None))
    assert ack.packet_id is None and ack.acks == (1,)
    for cut in range(1, len(pkt) - 3):
        with pytest.raises(ov.Malformed):
            ov.parse_control(pkt[:cut])
    with pytest.raises(ov.Malformed):  # an ACK packet must ACK something
        ov.parse_control(ov.build_control(Opcode.ACK_V1, 0, b"A" * 8, [], b"", None))
    with pytest.raises(ov.Malformed):  # P_DATA is not control
        ov.parse_control(bytes([Opcode.DATA_V2 << 3]) + bytes(20))


def test_replay_window() -> None:
    w = ov.ReplayWindow(8)
    assert not w.check(0)
    for pid in (1, 3, 2, 10):
        assert w.check(pid)
        w.commit(pid)
    assert not w.check(3) and not w.check(10)  # each id once
    assert not w.check(2)  # 10 - 2 = 8: out of the window
    assert w.check(4) and w.check(11)
    w.commit(4)
    assert not w.check(4)


# --- the handshake ------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True])
def test_handshake_push_and_data_both_ways(tls: tuple[ssl.SSLContext, Path], tcp: bool) -> None:
    server, client, events = connect(tls, tcp)
    [auth] = events
    assert isinstance(auth, ov.ClientAuth)
    assert (auth.username, auth.password, auth.dev_type) == ("anyone", "pw", "tun")
    assert auth.peer_info["IV_VER"] == "2.6.14" and auth.peer_info["IV_GUI_VER"] == "test-gui 1.0"
    server, client = tunnel(tls, tcp)
    reply = client.keys[0].plaintext.rstrip(b"\0").decode()
    assert reply.split(",") == [
        "PUSH_REPLY", "redirect-gateway def1", "route-gateway 10.211.0.1", "topology subnet",
        "ping 10", "ping-restart 60", "ifconfig 10.211.0.5 255.255.0.0", "tun-mtu 1400",
        "peer-id 7", "cipher AES-256-GCM"]
    ip = bytes.fromhex("4500001c000000004011") + bytes(10) + b"payload!"
    [ev] = feed(server, client, [client.data(ip)])
    assert ev == ov.Packet(bytearray(ip))
    out = server.encrypt(b"to the client")
    assert out is not None and client.open_data(out) == b"to the client"


def test_tap_client_gets_lladdr_and_no_topology(tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, cert = tls
    server = ov.OpenVPNServer(ctx, tcp=False, peer_id=1, now=T0)
    client = Client(cert, options=OPTIONS.replace("dev-type tun", "dev-type tap"))
    exchange(server, client, [client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2)])
    [auth] = exchange(server, client, client.send_text(client.key_method_2()))
    assert isinstance(auth, ov.ClientAuth) and auth.dev_type == "tap"
    client.derive()
    exchange(server, client, client.send_text(b"PUSH_REQUEST\0"))
    server.push_reply(ov.PushParams("10.211.0.9", "255.255.0.0", "10.211.0.1", 1400,
                                    lladdr="02:11:22:33:44:55"), T0)
    client.absorb(server.packets_to_send())
    client.tls_packets()
    reply = client.keys[0].plaintext.decode()
    assert "lladdr 02:11:22:33:44:55" in reply and "topology" not in reply


def test_a_client_without_aes_256_gcm_is_refused(tls: tuple[ssl.SSLContext, Path]) -> None:
    _, _, events = connect(tls, peer_info="IV_VER=2.3.0\nIV_CIPHERS=BF-CBC\n")
    [err] = events
    assert isinstance(err, ov.ProtocolError) and "AES-256-GCM" in err.message


def test_auth_failed_reaches_the_client_then_closed(tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client, _ = connect(tls)
    assert server.auth_failed("wrong password", T0) == []
    client.absorb(server.packets_to_send())
    client.tls_packets()
    assert client.keys[0].plaintext == b"AUTH_FAILED,wrong password\0"
    assert feed(server, client, [client.ack_packet()]) == [ov.Closed()]


def test_auth_failed_closes_after_the_exit_interval_without_ack(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    server, _, _ = connect(tls)
    server.auth_failed("no", T0)
    assert server.handle_timeout(T0 + ov.SCHEDULED_EXIT_S) == [ov.Closed()]


# --- the reliability layer ----------------------------------------------------------------


def test_unacknowledged_reset_is_retransmitted_with_back_off(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, cert = tls
    server = ov.OpenVPNServer(ctx, tcp=False, peer_id=1, now=T0)
    client = Client(cert)
    server.receive_datagram(client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2), T0)
    [first] = server.packets_to_send()
    assert server.next_timeout() == T0 + ov.TLS_TIMEOUT_S
    assert server.handle_timeout(T0 + 1) == [] and server.packets_to_send() == []
    server.handle_timeout(T0 + 2)
    [again] = server.packets_to_send()
    p, q = ov.parse_control(first), ov.parse_control(again)
    assert (q.opcode, q.packet_id, q.session_id) == (p.opcode, 0, p.session_id)
    assert p.acks == (0,)  # the first copy ACKed the client's reset
    assert server.next_timeout() == T0 + 2 + 2 * ov.TLS_TIMEOUT_S  # backed off
    server.handle_timeout(T0 + 6)
    assert len(server.packets_to_send()) == 1
    assert server.next_timeout() == T0 + 6 + 4 * ov.TLS_TIMEOUT_S
    # Once acknowledged, nothing more is sent.
    client.absorb([first])
    server.receive_datagram(client.ack_packet(), T0 + 7)
    server.handle_timeout(T0 + 100)
    assert server.packets_to_send() == []


def test_duplicated_control_packets_are_acked_again_but_used_once(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, cert = tls
    server = ov.OpenVPNServer(ctx, tcp=False, peer_id=1, now=T0)
    client = Client(cert)
    reset = client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2)
    exchange(server, client, [reset])
    assert client.keys[0].handshake_done
    # The client's reset again (our ACK was lost): ACKed again, no new session.
    server.receive_datagram(reset, T0 + 1)
    [ack] = [ov.parse_control(p) for p in server.packets_to_send()]
    assert ack.opcode is Opcode.ACK_V1 and ack.acks == (0,)
    # A TLS record twice: TLS sees it once (a second copy would be a bad record).
    flight = client.send_text(client.key_method_2())
    events = feed(server, client, flight + flight)
    assert [type(e) for e in events] == [ov.ClientAuth]
    acks = [a for p in server.packets_to_send() for a in ov.parse_control(p).acks]
    assert acks.count(client.keys[0].next_pid - 1) == 2


def test_reordered_and_lost_control_packets(tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, cert = tls
    server = ov.OpenVPNServer(ctx, tcp=False, peer_id=1, now=T0)
    client = Client(cert)
    exchange(server, client, [client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2)])
    # The key-method 2 message split over three control packets, delivered 3, 1
    # and (after "losing" it) 2.
    k = client.keys[0]
    k.tls.write(client.key_method_2())
    record = k.outgoing.read()
    third = len(record) // 3
    p1, p2, p3 = (client.control(Opcode.CONTROL_V1, part) for part in
                  (record[:third], record[third:2 * third], record[2 * third:]))
    assert server.receive_datagram(p3, T0) == []
    assert server.receive_datagram(p1, T0) == []
    acks = [a for p in server.packets_to_send() for a in ov.parse_control(p).acks]
    assert sorted(acks) == [k.next_pid - 3, k.next_pid - 1]  # both ACKed, p2 missing
    [auth] = server.receive_datagram(p2, T0 + 2)  # the retransmission of p2
    assert isinstance(auth, ov.ClientAuth)


def test_packets_beyond_the_receive_window_are_not_acked(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, cert = tls
    server = ov.OpenVPNServer(ctx, tcp=False, peer_id=1, now=T0)
    client = Client(cert)
    exchange(server, client, [client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2)])
    far = ov.build_control(Opcode.CONTROL_V1, 0, client.sid, [], b"",
                           client.keys[0].next_pid + ov.RECEIVE_WINDOW, b"x")
    server.receive_datagram(far, T0)
    assert server.packets_to_send() == []


def test_send_window_holds_back_packets_until_acked() -> None:
    send = ov.ReliableSend()
    for i in range(ov.SEND_WINDOW + 3):
        send.queue(Opcode.CONTROL_V1, bytes([i]))
    assert [pid for pid, _ in send.due(T0)] == list(range(ov.SEND_WINDOW))
    send.ack(0)
    send.ack(1)
    assert [pid for pid, _ in send.due(T0)] == [ov.SEND_WINDOW, ov.SEND_WINDOW + 1]


def test_control_packets_of_another_session_are_ignored(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client, _ = connect(tls)
    intruder = Client(tls[1])
    intruder.remote_sid = client.remote_sid
    server.receive_datagram(intruder.control(Opcode.CONTROL_V1, b"\x16\x03\x01"), T0)
    assert server.packets_to_send() == []
    assert server.drops["control packet from another session id"] == 1


# --- the data channel ---------------------------------------------------------------------


def test_bad_gcm_tag_is_dropped(tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client = tunnel(tls)
    pkt = bytearray(client.data(b"\x45" + bytes(27)))
    pkt[10] ^= 1  # inside the tag
    assert server.receive_datagram(bytes(pkt), T0) == []
    pkt = bytearray(client.data(b"\x45" + bytes(27)))
    pkt[-1] ^= 1  # inside the ciphertext
    assert server.receive_datagram(bytes(pkt), T0) == []
    assert server.drops["data packet failed authentication (GCM tag)"] == 2
    # A forged packet does not burn its packet id: the genuine one still passes.
    good = client.data(b"\x45" + bytes(27), pid=client.keys[0].send_pid)
    assert len(server.receive_datagram(good, T0)) == 1


def test_replayed_packet_id_is_rejected(tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client = tunnel(tls)
    first = client.data(b"\x45" + bytes(27))
    assert len(server.receive_datagram(first, T0)) == 1
    assert server.receive_datagram(first, T0) == []
    for _ in range(ov.REPLAY_WINDOW + 1):
        client.data(b"")  # ids the server never sees
    newest = client.data(b"\x45" + bytes(27))
    assert len(server.receive_datagram(newest, T0)) == 1
    too_old = client.data(b"\x45" + bytes(27), pid=2)
    assert server.receive_datagram(too_old, T0) == []
    assert server.drops["replayed or too old data packet id"] == 2


def test_data_before_keys_and_truncated_data_are_dropped(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    server = ov.OpenVPNServer(tls[0], tcp=False, peer_id=1, now=T0)
    assert server.receive_datagram(bytes([Opcode.DATA_V2 << 3]) + bytes(40), T0) == []
    server, client = tunnel(tls)
    assert server.receive_datagram(client.data(b"x")[:20], T0) == []
    assert server.drops["truncated data packet"] == 1


def test_keepalive_ping_and_dead_peer(tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client = tunnel(tls)
    assert server.receive_datagram(client.data(ov.PING_MAGIC), T0) == []  # not a packet
    assert server.next_timeout() == T0 + ov.PING_INTERVAL_S
    server.handle_timeout(T0 + ov.PING_INTERVAL_S)
    [ping] = server.packets_to_send()
    assert client.open_data(ping) == ov.PING_MAGIC
    [dead] = server.handle_timeout(T0 + ov.SERVER_PING_RESTART_S)
    assert isinstance(dead, ov.PeerDead)


def test_explicit_exit_notify(tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client = tunnel(tls)
    [ev] = server.receive_datagram(client.data(ov.OCC_MAGIC + bytes([ov.OCC_EXIT])), T0)
    assert isinstance(ev, ov.PeerExit) and "OCC_EXIT" in ev.reason
    server, client = tunnel(tls)
    [ev] = exchange(server, client, client.send_text(b"EXIT\0"))
    assert isinstance(ev, ov.PeerExit)


def test_handshake_must_finish_within_the_hand_window(tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, cert = tls
    server = ov.OpenVPNServer(ctx, tcp=False, peer_id=1, now=T0)
    client = Client(cert)
    server.receive_datagram(client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2), T0)
    client.absorb(server.packets_to_send())
    server.receive_datagram(client.ack_packet(), T0)
    assert server.next_timeout() == T0 + ov.HAND_WINDOW_S
    [dead] = server.handle_timeout(T0 + ov.HAND_WINDOW_S)
    assert isinstance(dead, ov.PeerDead) and "60 s" in dead.reason


def test_renegotiation_with_soft_reset(tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client = tunnel(tls)
    old = client.data(b"\x45" + bytes(27))
    client.new_key(1)
    events = exchange(server, client, [client.control(Opcode.CONTROL_SOFT_RESET_V1, key_id=1)],
                      key_id=1)
    assert events == [] and client.keys[1].handshake_done
    events = exchange(server, client, client.send_text(client.key_method_2(1), 1), key_id=1)
    assert events == []  # no second login or push for a renegotiation
    client.derive(1)
    out = server.encrypt(b"new key")
    assert out is not None and out[0] & 7 == 1 and client.open_data(out) == b"new key"
    assert len(server.receive_datagram(client.data(b"\x45" + bytes(27), key_id=1), T0)) == 1
    # The old key still decrypts in the transition window, then expires.
    assert len(server.receive_datagram(old, T0)) == 1
    server.handle_timeout(T0 + ov.TRANSITION_WINDOW_S)
    assert server.receive_datagram(client.data(b"\x45" + bytes(27)), T0) == []


# --- hostile input -------------------------------------------------------------------------


def test_tcp_stream_garbage_is_a_protocol_error(tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, _ = tls
    server = ov.OpenVPNServer(ctx, tcp=True, peer_id=1, now=T0)
    [err] = server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", T0)
    assert isinstance(err, ov.ProtocolError)
    server = ov.OpenVPNServer(ctx, tcp=True, peer_id=1, now=T0)
    [err] = server.receive_data(b"\x00\x00", T0)
    assert isinstance(err, ov.ProtocolError) and "0-byte" in err.message
    server = ov.OpenVPNServer(ctx, tcp=True, peer_id=1, now=T0)
    [err] = server.receive_data(struct.pack("!H", ov.MAX_PACKET_BYTES + 1), T0)
    assert isinstance(err, ov.ProtocolError)


def test_tcp_framing_split_anywhere(tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, cert = tls
    server = ov.OpenVPNServer(ctx, tcp=True, peer_id=1, now=T0)
    client = Client(cert, tcp=True)
    reset = client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2)
    for byte in reset:
        assert server.receive_data(bytes([byte]), T0) == []
    [reply] = unframe(b"".join(server.packets_to_send()))
    assert ov.parse_control(reply).opcode is Opcode.CONTROL_HARD_RESET_SERVER_V2


def test_udp_garbage_and_a_tls_error(tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, cert = tls
    server = ov.OpenVPNServer(ctx, tcp=False, peer_id=1, now=T0)
    assert server.receive_datagram(os.urandom(3), T0) == []
    assert server.receive_datagram(b"", T0) == []
    assert server.receive_datagram(bytes([Opcode.CONTROL_V1 << 3]) + bytes(13), T0) == []
    assert sum(server.drops.values()) == 3
    client = Client(cert)
    exchange(server, client, [client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2)])
    [err] = server.receive_datagram(client.control(Opcode.CONTROL_V1, b"not TLS at all"), T0)
    assert isinstance(err, ov.ProtocolError) and "TLS" in err.message


def test_client_reset_session_id() -> None:
    reset = ov.build_control(Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0, b"C" * 8, [], b"", 0)
    assert ov.client_reset_session_id(reset) == b"C" * 8
    assert ov.client_reset_session_id(reset[:5]) is None
    v3 = bytes([Opcode.CONTROL_HARD_RESET_CLIENT_V3 << 3]) + reset[1:]
    assert ov.client_reset_session_id(v3) is None  # tls-crypt-v2 is not offered
