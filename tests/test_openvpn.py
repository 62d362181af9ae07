"""The sans-IO OpenVPN server, byte by byte, against a minimal client written
here from the same wire formats (the stock client is in test_e2e_openvpn.py).
Every session runs once with the Python data channel and once with the C one."""

from __future__ import annotations

import hmac
import os
import ssl
import struct
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.protocols.openvpn.cookie import Proof, check_proof, reset_reply
from relay.protocols.openvpn.datachannel import (
    AEADS,
    STREAM_BATCH,
    DataChannel,
    PyDataChannel,
)
from relay.protocols.openvpn.events import (
    ClientAuth,
    Closed,
    Event,
    Floated,
    Packets,
    PeerDead,
    PeerExit,
    ProtocolError,
    PushRequest,
)
from relay.protocols.openvpn.keys import (
    HAND_WINDOW_S,
    REPLAY_WINDOW,
    TRANSITION_WINDOW_S,
    derive_key2,
)
from relay.protocols.openvpn.reliable import (
    RECEIVE_WINDOW,
    TLS_TIMEOUT_S,
)
from relay.protocols.openvpn.server import (
    MAX_SEND_QUEUE_BYTES,
    PING_INTERVAL_S,
    PUSH_REPLY_HOLDOFF_S,
    SCHEDULED_EXIT_S,
    SERVER_PING_RESTART_S,
    OpenVPNServer,
    PushParams,
)
from relay.protocols.openvpn.tlscrypt import (
    TlsCrypt,
)
from relay.protocols.openvpn.wire import (
    MAX_PACKET_BYTES,
    OCC_EXIT,
    OCC_MAGIC,
    PING_MAGIC,
    TCP_LENGTH,
    ControlPacket,
    Opcode,
    build_control,
    parse_control,
)
from relay.serve.datachannel import CDataChannel
from relay.tlsconf import server_context

T0 = 1000.0
PEER_INFO = ("IV_VER=2.6.14\nIV_PLAT=linux\nIV_TCPNL=1\nIV_MTU=1600\nIV_NCP=2\n"
             "IV_CIPHERS=AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305\nIV_PROTO=990\n"
             "IV_HWADDR=02:00:00:00:00:01\nIV_GUI_VER=test-gui 1.0\n")
OPTIONS = "V4,dev-type tun,link-mtu 1559,tun-mtu 1500,proto UDPv4,cipher AES-256-GCM,tls-client"
PARAMS = PushParams(address="10.211.0.5", netmask="255.255.0.0", gateway="10.211.0.1",
                    mtu=1400)
COOKIE_KEY = bytes(range(32))
PEER = ("198.18.1.2", 40000)
STATIC_KEY = bytes(range(256))
# The client's side of tls-crypt (KEY_DIRECTION_INVERSE): the server's key halves swapped.
CLIENT_TLS_CRYPT = TlsCrypt(STATIC_KEY[128:] + STATIC_KEY[:128])
IP = bytes.fromhex("4500001c000000004011") + bytes(10) + b"payload!"
# The data channel the sessions of a test get (the channel fixture sets it).
CHANNEL: list[Callable[[], DataChannel]] = [PyDataChannel]


@pytest.fixture(autouse=True, params=["python", "c"])
def channel(request: pytest.FixtureRequest) -> Iterator[str]:
    CHANNEL[0] = PyDataChannel if request.param == "python" else CDataChannel
    yield request.param
    CHANNEL[0] = PyDataChannel


def server_for(ctx: ssl.SSLContext, **kw: object) -> OpenVPNServer:
    return OpenVPNServer(ctx, data_channel=CHANNEL[0](), **kw)  # type: ignore[arg-type]


def encrypt(server: OpenVPNServer, payload: bytes) -> bytes | None:
    """One data packet from the server, as it goes on the wire."""
    sealed = server.seal(payload, array("I", (0, len(payload))))
    return None if sealed is None or not sealed.count else bytes(sealed.data[:sealed.size])


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
    def __init__(self, cert: Path, tcp: bool = False, options: str = OPTIONS,
                 tls_crypt: bool = False, cipher: str = "AES-256-GCM") -> None:
        self.tcp = tcp
        self.cipher = cipher  # what the server is expected to choose
        self.options = options
        self.tls_crypt = CLIENT_TLS_CRYPT if tls_crypt else None
        self.wrap_pid = 0
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
        pkt = build_control(op, key_id, self.sid, acks, self.remote_sid, k.next_pid, payload)
        k.next_pid += 1
        return self.send(pkt)

    def ack_packet(self, key_id: int = 0) -> bytes:
        k = self.keys[key_id]
        acks, k.acks = k.acks, []
        pkt = build_control(Opcode.ACK_V1, key_id, self.sid, acks, self.remote_sid, None)
        return self.send(pkt)

    def send(self, pkt: bytes) -> bytes:
        """A control packet as it goes on the wire: wrapped, framed."""
        if self.tls_crypt is not None:
            self.wrap_pid += 1
            pkt = self.tls_crypt.wrap(pkt, self.wrap_pid, int(T0))
        return frame(pkt) if self.tcp else pkt

    def absorb(self, out: list[bytes]) -> list[ControlPacket]:
        """Take the server's packets: ACK them, feed TLS records in order."""
        pkts = [p for chunk in out for p in (unframe(chunk) if self.tcp else [chunk])]
        seen = []
        for raw in pkts:
            if raw[0] >> 3 in (Opcode.DATA_V2, Opcode.DATA_V1):
                continue
            if self.tls_crypt is not None:
                opened = self.tls_crypt.unwrap(raw)
                assert opened is not None
                raw = opened[0]
            p = parse_control(raw)
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
        key2 = derive_key2(k.pre_master, k.random1, s_random1, k.random2, s_random2,
                           self.sid, self.remote_sid)
        aead = AEADS[self.cipher]
        k.enc, k.enc_iv = aead(key2[:32]), key2[64:72]
        k.dec, k.dec_iv = aead(key2[128:160]), key2[192:200]

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
        self.buffered: dict[int, ControlPacket] = {}
        self.acks: list[int] = []
        self.send_pid = 0
        self.pre_master = self.random1 = self.random2 = b""
        self.enc: AESGCM | ChaCha20Poly1305 = AESGCM(bytes(32))
        self.dec: AESGCM | ChaCha20Poly1305 = self.enc
        self.enc_iv = self.dec_iv = b""


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    return server_context(tmp_path, "", "")


def feed(server: OpenVPNServer, client: Client, pkts: list[bytes],
         now: float = T0) -> list[Event]:
    events: list[Event] = []
    for p in pkts:
        events += (server.receive_data(p, now) if client.tcp
                   else server.receive_datagram(p, now))
    return events


def exchange(server: OpenVPNServer, client: Client, pkts: list[bytes], now: float = T0,
             key_id: int = 0) -> list[Event]:
    """Deliver ``pkts`` and play the client's TLS until nothing moves."""
    events: list[Event] = []
    while pkts:
        events += feed(server, client, pkts, now)
        client.absorb(server.packets_to_send())
        pkts = client.tls_packets(key_id)
    k = client.keys[key_id]
    if k.acks:
        events += feed(server, client, [client.ack_packet(key_id)], now)
    return events


def start(tls: tuple[ssl.SSLContext, Path], client: Client,
          now: float = T0) -> OpenVPNServer:
    """The resets: over TCP the stream's first packet; over UDP the stateless
    answer and the proof the client sends with its reset again (as the stock client
    does). The client has the server's reset and the ACK of its own."""
    ctx, _ = tls
    tls_crypt = TlsCrypt(STATIC_KEY) if client.tls_crypt else None
    reset = client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2)
    if client.tcp:
        server = server_for(ctx, tcp=True, peer_id=7, now=now, tls_crypt=tls_crypt,
                            wall=int(now))
        assert server.receive_data(reset, now) == []
    else:
        reply = reset_reply(COOKIE_KEY, PEER, reset, now, tls_crypt)
        assert reply is not None and len(reply) == len(reset)
        client.absorb([reply])
        k = client.keys[0]
        k.next_pid = 0  # the same reset again, now with the ACK
        again = client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2)
        proof = check_proof(COOKIE_KEY, PEER, again, now, tls_crypt)
        assert proof is not None
        server = server_for(ctx, tcp=False, peer_id=7, now=now, proof=proof,
                            tls_crypt=tls_crypt, wall=int(now))
        assert server.receive_datagram(again, now) == []
    client.absorb(server.packets_to_send())
    return server


def connect(tls: tuple[ssl.SSLContext, Path], tcp: bool = False, tls_crypt: bool = False,
            cipher: str = "AES-256-GCM", **km2: str
            ) -> tuple[OpenVPNServer, Client, list[Event]]:
    """Reset, TLS handshake and key-method 2: the server's ClientAuth event."""
    client = Client(tls[1], tcp=tcp, tls_crypt=tls_crypt, cipher=cipher)
    server = start(tls, client)
    events = exchange(server, client, client.tls_packets())
    assert client.keys[0].handshake_done and not events
    events = exchange(server, client, client.send_text(client.key_method_2(**km2)))
    if client.keys[0].plaintext:  # the server answered with its key-method 2
        client.derive()
    return server, client, events


def tunnel(tls: tuple[ssl.SSLContext, Path], tcp: bool = False,
           tls_crypt: bool = False, cipher: str = "AES-256-GCM",
           peer_info: str = PEER_INFO) -> tuple[OpenVPNServer, Client]:
    server, client, events = connect(tls, tcp, tls_crypt, cipher, peer_info=peer_info)
    events = exchange(server, client, client.send_text(b"PUSH_REQUEST\0"))
    assert events == [PushRequest()]
    exchange(server, client, [])
    server.push_reply(PARAMS, T0)
    client.absorb(server.packets_to_send())
    client.tls_packets()
    assert client.keys[0].plaintext.startswith(b"PUSH_REPLY,")
    feed(server, client, [client.ack_packet()])
    return server, client


# --- the PRF and the reset exchange, against references written here ----------------


def _p_hash(algorithm: str, secret: bytes, seed: bytes, size: int) -> bytes:
    """P_hash of RFC 2246 section 5, written from the RFC for this test."""
    out, a = b"", seed
    while len(out) < size:
        a = hmac.new(secret, a, algorithm).digest()
        out += hmac.new(secret, a + seed, algorithm).digest()
    return out[:size]


def _rfc2246_prf(secret: bytes, label_and_seed: bytes, size: int) -> bytes:
    half = (len(secret) + 1) // 2
    return bytes(a ^ b for a, b in zip(_p_hash("md5", secret[:half], label_and_seed, size),
                                       _p_hash("sha1", secret[-half:], label_and_seed, size),
                                       strict=True))


def test_key_expansion_against_a_prf_written_from_the_rfc() -> None:
    """Independent of the relay's PRF: RFC 2246's PRF written out here (checked on
    OpenVPN's own vector first), with the labels and order of OpenVPN's
    generate_key_expansion_openvpn_prf (ssl.c)."""
    secret = (b"Lorem ipsum dolor sit amet, consectetur adipisici elit, sed eiusmod tempor "
              b"incidunt ut labore et dolore magna aliqua.")
    seed = b"Quis aute iure reprehenderit in voluptate velit esse cillum dolore"
    assert _rfc2246_prf(secret, seed, 32) == bytes.fromhex(
        "d98c8518c85e946927916acfc2d592fbb1567e4b4b1459e6a904ac2ddab72d67")
    pre, cr1, sr1, cr2, sr2 = (os.urandom(n) for n in (48, 32, 32, 32, 32))
    csid, ssid = os.urandom(8), os.urandom(8)
    master = _rfc2246_prf(pre, b"OpenVPN master secret" + cr1 + sr1, 48)
    assert derive_key2(pre, cr1, sr1, cr2, sr2, csid, ssid) == _rfc2246_prf(
        master, b"OpenVPN key expansion" + cr2 + sr2 + csid + ssid, 256)


def test_the_reset_exchange_byte_for_byte_as_openvpn_writes_it(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    """Packets written and read by hand from OpenVPN's layout (ssl_pkt.h,
    reliable.c), not with build_control/parse_control: opcode << 3 | key id, the
    8-byte session id, the ACK count, the acknowledged packet ids (32 bits each)
    and the peer's session id when there are any, then the packet id (32 bits),
    which P_ACK_V1 lacks."""
    csid = bytes.fromhex("0102030405060708")
    zero_pid = b"\x00\x00\x00\x00"
    # P_CONTROL_HARD_RESET_CLIENT_V2 (7), key 0, no ACK, packet id 0: 14 bytes.
    reset = b"\x38" + csid + b"\x00" + zero_pid
    reply = reset_reply(COOKIE_KEY, PEER, reset, T0)
    # P_CONTROL_HARD_RESET_SERVER_V2 (8), key 0, the cookie as session id, no ACK,
    # packet id 0: as small as the reset.
    assert reply is not None and len(reply) == 14
    assert reply[0] == 0x40 and reply[9] == 0 and reply[10:] == zero_pid
    cookie = reply[1:9]
    # The stock client sends its reset again with the ACK of the server's: 26 bytes.
    again = b"\x38" + csid + b"\x01" + zero_pid + cookie + zero_pid
    proof = check_proof(COOKIE_KEY, PEER, again, T0)
    assert proof is not None and proof.client_session_id == csid
    server = OpenVPNServer(tls[0], tcp=False, peer_id=7, now=T0, proof=proof,
                              wall=int(T0))
    assert server.receive_datagram(again, T0) == []
    # P_ACK_V1 (5) of the client's packet 0, back to the client's session: 22 bytes.
    assert server.packets_to_send() == [b"\x28" + cookie + b"\x01" + zero_pid + csid]


# --- the handshake ------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True])
def test_handshake_push_and_data_both_ways(tls: tuple[ssl.SSLContext, Path], tcp: bool) -> None:
    server, client, events = connect(tls, tcp)
    [auth] = events
    assert isinstance(auth, ClientAuth)
    assert (auth.username, auth.password, auth.dev_type) == ("anyone", "pw", "tun")
    assert auth.peer_info["IV_VER"] == "2.6.14" and auth.peer_info["IV_GUI_VER"] == "test-gui 1.0"
    server, client = tunnel(tls, tcp)
    reply = client.keys[0].plaintext.rstrip(b"\0").decode()
    assert reply.split(",") == [
        "PUSH_REPLY", "redirect-gateway def1", "route-gateway 10.211.0.1", "topology subnet",
        "ping 10", "ping-restart 60", "ifconfig 10.211.0.5 255.255.0.0", "tun-mtu 1400",
        "peer-id 7", "cipher AES-256-GCM"]
    [ev] = feed(server, client, [client.data(IP)])
    assert isinstance(ev, Packets) and ev.payloads() == [IP]
    out = encrypt(server, b"to the client")
    assert out is not None and client.open_data(out) == b"to the client"


def test_tap_client_gets_lladdr_and_no_topology(tls: tuple[ssl.SSLContext, Path]) -> None:
    client = Client(tls[1], options=OPTIONS.replace("dev-type tun", "dev-type tap"))
    server = start(tls, client)
    exchange(server, client, client.tls_packets())
    [auth] = exchange(server, client, client.send_text(client.key_method_2()))
    assert isinstance(auth, ClientAuth) and auth.dev_type == "tap"
    client.derive()
    exchange(server, client, client.send_text(b"PUSH_REQUEST\0"))
    server.push_reply(PushParams("10.211.0.9", "255.255.0.0", "10.211.0.1", 1400,
                                 lladdr="02:11:22:33:44:55"), T0)
    client.absorb(server.packets_to_send())
    client.tls_packets()
    reply = client.keys[0].plaintext.decode()
    assert "lladdr 02:11:22:33:44:55" in reply and "topology" not in reply


def test_a_client_without_an_aead_cipher_is_refused(tls: tuple[ssl.SSLContext, Path]) -> None:
    _, _, events = connect(tls, peer_info="IV_VER=2.3.0\nIV_CIPHERS=BF-CBC:AES-256-CBC\n")
    [err] = events
    assert isinstance(err, ProtocolError)
    assert "AES-256-GCM, CHACHA20-POLY1305" in err.message and "non-AEAD" in err.message


@pytest.mark.parametrize("tcp", [False, True])
def test_chacha20_poly1305_for_a_client_that_offers_only_it(tls: tuple[ssl.SSLContext, Path],
                                                             tcp: bool) -> None:
    server, client = tunnel(tls, tcp, cipher="CHACHA20-POLY1305",
                            peer_info=PEER_INFO.replace(
                                "IV_CIPHERS=AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305",
                                "IV_CIPHERS=CHACHA20-POLY1305"))
    reply = client.keys[0].plaintext.rstrip(b"\0").decode()
    assert reply.endswith(",cipher CHACHA20-POLY1305")
    [ev] = feed(server, client, [client.data(IP)])
    assert isinstance(ev, Packets) and ev.payloads() == [IP]
    out = encrypt(server, b"to the client")
    assert out is not None and client.open_data(out) == b"to the client"
    # A renegotiated key keeps the session's cipher.
    client.new_key(1)
    exchange(server, client, [client.control(Opcode.CONTROL_SOFT_RESET_V1, key_id=1)], key_id=1)
    exchange(server, client, client.send_text(client.key_method_2(1), 1), key_id=1)
    client.derive(1)
    out = encrypt(server, b"new key")
    assert out is not None and client.open_data(out) == b"new key"
    assert (unframe(out)[0] if tcp else out)[0] & 7 == 1


def test_the_relay_prefers_aes_256_gcm_and_a_2_4_client_gets_it(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    for peer_info in ("IV_VER=2.6.14\nIV_CIPHERS=CHACHA20-POLY1305:AES-256-GCM\n",
                      "IV_VER=2.4.12\nIV_NCP=2\n"):  # 2.4: IV_NCP=2 means AES-GCM
        server, client = tunnel(tls, peer_info=peer_info)
        assert client.keys[0].plaintext.rstrip(b"\0").endswith(b",cipher AES-256-GCM")
        [ev] = feed(server, client, [client.data(IP)])
        assert isinstance(ev, Packets)


def test_auth_failed_reaches_the_client_then_closed(tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client, _ = connect(tls)
    assert server.auth_failed("wrong password", T0) == []
    client.absorb(server.packets_to_send())
    client.tls_packets()
    assert client.keys[0].plaintext == b"AUTH_FAILED,wrong password\0"
    assert feed(server, client, [client.ack_packet()]) == [Closed()]


def test_auth_failed_closes_after_the_exit_interval_without_ack(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    server, _, _ = connect(tls)
    server.auth_failed("no", T0)
    assert server.handle_timeout(T0 + SCHEDULED_EXIT_S) == [Closed()]


# --- the reliability layer ----------------------------------------------------------------


def test_unacknowledged_reset_is_retransmitted_with_back_off(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, cert = tls
    server = server_for(ctx, tcp=True, peer_id=1, now=T0)
    client = Client(cert, tcp=True)
    server.receive_data(client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2), T0)
    [first] = unframe(b"".join(server.packets_to_send()))
    assert server.next_timeout() == T0 + TLS_TIMEOUT_S
    assert server.handle_timeout(T0 + 1) == [] and server.packets_to_send() == []
    server.handle_timeout(T0 + 2)
    [again] = unframe(b"".join(server.packets_to_send()))
    p, q = parse_control(first), parse_control(again)
    assert (q.opcode, q.packet_id, q.session_id) == (p.opcode, 0, p.session_id)
    assert p.acks == (0,)  # the first copy ACKed the client's reset
    assert server.next_timeout() == T0 + 2 + 2 * TLS_TIMEOUT_S  # backed off
    server.handle_timeout(T0 + 6)
    assert len(server.packets_to_send()) == 1
    assert server.next_timeout() == T0 + 6 + 4 * TLS_TIMEOUT_S
    # Once acknowledged, nothing more is sent.
    client.absorb([TCP_LENGTH.pack(len(first)) + first])
    server.receive_data(client.ack_packet(), T0 + 7)
    server.handle_timeout(T0 + 100)
    assert server.packets_to_send() == []


def test_duplicated_control_packets_are_acked_again_but_used_once(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    client = Client(tls[1])
    server = start(tls, client)
    exchange(server, client, client.tls_packets())
    assert client.keys[0].handshake_done
    reset = build_control(Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0, client.sid, [], b"", 0)
    # The client's reset again (our ACK was lost): ACKed again, no new session.
    server.receive_datagram(reset, T0 + 1)
    [ack] = [parse_control(p) for p in server.packets_to_send()]
    assert ack.opcode is Opcode.ACK_V1 and ack.acks == (0,)
    # A TLS record twice: TLS sees it once (a second copy would be a bad record).
    flight = client.send_text(client.key_method_2())
    events = feed(server, client, flight + flight)
    assert [type(e) for e in events] == [ClientAuth]
    acks = [a for p in server.packets_to_send() for a in parse_control(p).acks]
    assert acks.count(client.keys[0].next_pid - 1) == 2


def test_reordered_and_lost_control_packets(tls: tuple[ssl.SSLContext, Path]) -> None:
    client = Client(tls[1])
    server = start(tls, client)
    exchange(server, client, client.tls_packets())
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
    acks = [a for p in server.packets_to_send() for a in parse_control(p).acks]
    assert sorted(acks) == [k.next_pid - 3, k.next_pid - 1]  # both ACKed, p2 missing
    [auth] = server.receive_datagram(p2, T0 + 2)  # the retransmission of p2
    assert isinstance(auth, ClientAuth)


def test_packets_beyond_the_receive_window_are_not_acked(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    client = Client(tls[1])
    server = start(tls, client)
    exchange(server, client, client.tls_packets())
    far = build_control(Opcode.CONTROL_V1, 0, client.sid, [], b"",
                        client.keys[0].next_pid + RECEIVE_WINDOW, b"x")
    server.receive_datagram(far, T0)
    assert server.packets_to_send() == []


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
    assert server.drops["data packet failed authentication (tag)"] == 2
    # A forged packet does not burn its packet id: the genuine one still passes.
    good = client.data(b"\x45" + bytes(27), pid=client.keys[0].send_pid)
    assert len(server.receive_datagram(good, T0)) == 1


def test_replayed_packet_id_is_rejected(tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client = tunnel(tls)
    first = client.data(b"\x45" + bytes(27))
    assert len(server.receive_datagram(first, T0)) == 1
    assert server.receive_datagram(first, T0) == []
    for _ in range(REPLAY_WINDOW + 1):
        client.data(b"")  # ids the server never sees
    newest = client.data(b"\x45" + bytes(27))
    assert len(server.receive_datagram(newest, T0)) == 1
    too_old = client.data(b"\x45" + bytes(27), pid=2)
    assert server.receive_datagram(too_old, T0) == []
    assert server.drops["replayed or too old data packet id"] == 2


def test_data_before_keys_and_truncated_data_are_dropped(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    server = start(tls, Client(tls[1]))
    assert server.receive_datagram(bytes([Opcode.DATA_V2 << 3]) + bytes(40), T0) == []
    server, client = tunnel(tls)
    assert server.receive_datagram(client.data(b"x")[:20], T0) == []
    assert server.drops["truncated data packet"] == 1


def test_keepalive_ping_and_dead_peer(tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client = tunnel(tls)
    assert server.receive_datagram(client.data(PING_MAGIC), T0) == []  # not a packet
    assert server.next_timeout() == T0 + PING_INTERVAL_S
    server.handle_timeout(T0 + PING_INTERVAL_S)
    [ping] = server.packets_to_send()
    assert client.open_data(ping) == PING_MAGIC
    # One ping per interval: the next is due an interval later, not at once again.
    assert server.next_timeout() == T0 + 2 * PING_INTERVAL_S
    assert server.handle_timeout(T0 + PING_INTERVAL_S) == []
    assert server.packets_to_send() == []
    [dead] = server.handle_timeout(T0 + SERVER_PING_RESTART_S)
    assert isinstance(dead, PeerDead)


def test_explicit_exit_notify(tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client = tunnel(tls)
    [ev] = server.receive_datagram(client.data(OCC_MAGIC + bytes([OCC_EXIT])), T0)
    assert isinstance(ev, PeerExit) and "OCC_EXIT" in ev.reason
    server, client = tunnel(tls)
    [ev] = exchange(server, client, client.send_text(b"EXIT\0"))
    assert isinstance(ev, PeerExit)


def test_handshake_must_finish_within_the_hand_window(tls: tuple[ssl.SSLContext, Path]) -> None:
    server = start(tls, Client(tls[1]))
    assert server.next_timeout() == T0 + HAND_WINDOW_S
    [dead] = server.handle_timeout(T0 + HAND_WINDOW_S)
    assert isinstance(dead, PeerDead) and "60 s" in dead.reason


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
    out = encrypt(server, b"new key")
    assert out is not None and out[0] & 7 == 1 and client.open_data(out) == b"new key"
    assert len(server.receive_datagram(client.data(b"\x45" + bytes(27), key_id=1), T0)) == 1
    # The old key still decrypts in the transition window, then expires.
    assert len(server.receive_datagram(old, T0)) == 1
    server.handle_timeout(T0 + TRANSITION_WINDOW_S)
    assert server.receive_datagram(client.data(b"\x45" + bytes(27)), T0) == []


def batch(pkts: list[bytes]) -> tuple[bytearray, array[int]]:
    buf, spans = bytearray(), array("I")
    for p in pkts:
        spans.extend((len(buf), len(p)))
        buf += p
    return buf, spans


def test_the_data_packets_of_one_receive_are_one_batch(tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client = tunnel(tls)
    payloads = [IP[:-1] + bytes([i]) for i in range(10)]
    pkts = [client.data(p) for p in payloads]
    forged = bytearray(pkts[3])
    forged[-1] ^= 1
    buf, spans = batch([*pkts[:3], bytes(forged), pkts[3], pkts[3], client.data(PING_MAGIC),
                        *pkts[4:]])
    [ev] = server.receive_datagrams(buf, spans, T0 + 5)
    assert isinstance(ev, Packets) and ev.payloads() == payloads
    assert ev.data is buf  # decrypted in place
    assert server.drops == {"data packet failed authentication (tag)": 1,
                            "replayed or too old data packet id": 1}
    assert server.last_rx == T0 + 5


def test_tcp_data_frames_of_one_read_are_one_batch_around_control(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client = tunnel(tls, tcp=True)
    first = [client.data(IP[:-1] + bytes([i])) for i in range(5)]
    push = client.send_text(b"PUSH_REQUEST\0")  # answered again after the holdoff
    later = [client.data(IP[:-1] + bytes([i])) for i in range(5, 8)]
    stream = b"".join([*first, *push, *later])
    events = server.receive_data(stream[:-3], T0 + PUSH_REPLY_HOLDOFF_S)
    assert [type(e) for e in events] == [Packets, Packets]  # the last frame is incomplete
    assert [len(e.payloads()) for e in events if isinstance(e, Packets)] == [5, 2]
    [ev] = server.receive_data(stream[-3:], T0 + PUSH_REPLY_HOLDOFF_S)
    assert isinstance(ev, Packets) and ev.payloads() == [IP[:-1] + bytes([7])]
    client.absorb(server.packets_to_send())
    client.tls_packets()
    assert client.keys[0].plaintext.count(b"PUSH_REPLY,") == 2  # the control frame was read


def test_a_tcp_read_longer_than_a_batch_is_read_whole(tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client = tunnel(tls, tcp=True)
    pkts = [client.data(IP[:-2] + i.to_bytes(2, "big")) for i in range(STREAM_BATCH + 6)]
    events = server.receive_data(b"".join(pkts), T0)
    assert [len(e.payloads()) for e in events if isinstance(e, Packets)] == [STREAM_BATCH, 6]
    assert events[1].payloads()[-1] == IP[:-2] + (STREAM_BATCH + 5).to_bytes(2, "big")


def test_a_float_needs_a_packet_that_authenticates(tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client = tunnel(tls)
    accepted = client.data(IP)
    assert len(server.receive_datagrams(*batch([accepted]), T0)) == 1
    garbage = bytes([Opcode.DATA_V2 << 3]) + (7).to_bytes(3, "big") + os.urandom(60)
    forged = bytearray(client.data(IP))
    forged[30] ^= 1
    no_key = bytearray(client.data(IP))
    no_key[0] |= 3
    # From a new address: forgeries, a replay of what was accepted, and a packet of
    # no key move nothing, and are not even counted against the session.
    for pkts in ([garbage], [bytes(forged)], [accepted], [bytes(no_key)]):
        assert server.receive_datagrams(*batch(pkts), T0 + 1, moved=True) == []
    assert server.drops == {} and server.last_rx == T0
    # One that authenticates among them: the session follows it, the rest as ever.
    events = server.receive_datagrams(*batch([garbage, client.data(IP)]), T0 + 2, moved=True)
    assert [type(e) for e in events] == [Floated, Packets]
    assert server.drops == {"data packet failed authentication (tag)": 1}


# --- hostile input -------------------------------------------------------------------------


def test_tcp_stream_garbage_is_a_protocol_error(tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, _ = tls
    server = server_for(ctx, tcp=True, peer_id=1, now=T0)
    [err] = server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", T0)
    assert isinstance(err, ProtocolError)
    server = server_for(ctx, tcp=True, peer_id=1, now=T0)
    [err] = server.receive_data(b"\x00\x00", T0)
    assert isinstance(err, ProtocolError) and "0-byte" in err.message
    server = server_for(ctx, tcp=True, peer_id=1, now=T0)
    [err] = server.receive_data(struct.pack("!H", MAX_PACKET_BYTES + 1), T0)
    assert isinstance(err, ProtocolError)


def test_tcp_framing_split_anywhere(tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, cert = tls
    server = server_for(ctx, tcp=True, peer_id=1, now=T0)
    client = Client(cert, tcp=True)
    reset = client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2)
    for byte in reset:
        assert server.receive_data(bytes([byte]), T0) == []
    [reply] = unframe(b"".join(server.packets_to_send()))
    assert parse_control(reply).opcode is Opcode.CONTROL_HARD_RESET_SERVER_V2


def test_udp_garbage_and_a_tls_error(tls: tuple[ssl.SSLContext, Path]) -> None:
    client = Client(tls[1])
    server = start(tls, client)
    assert server.receive_datagram(os.urandom(3), T0) == []
    assert server.receive_datagram(b"", T0) == []
    assert server.receive_datagram(bytes([Opcode.CONTROL_V1 << 3]) + bytes(13), T0) == []
    assert server.receive_datagram(bytes(MAX_PACKET_BYTES + 1), T0) == []
    assert sum(server.drops.values()) == 4 and not server.closed
    [err] = server.receive_datagram(client.control(Opcode.CONTROL_V1, b"not TLS at all"), T0)
    assert isinstance(err, ProtocolError) and "TLS" in err.message


# --- the UDP cookie (stateless answer to a reset) --------------------------------------


def test_a_udp_session_starts_from_a_proof_and_a_tcp_one_from_a_reset(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    proof = Proof(b"C" * 8, b"S" * 8)
    with pytest.raises(ValueError):
        OpenVPNServer(tls[0], tcp=False, peer_id=1, now=T0)
    with pytest.raises(ValueError):
        OpenVPNServer(tls[0], tcp=True, peer_id=1, now=T0, proof=proof)
    # From the proof on, the server ACKs the client's reset and speaks as the cookie.
    server = server_for(tls[0], tcp=False, peer_id=1, now=T0, proof=proof)
    ack = build_control(Opcode.ACK_V1, 0, b"C" * 8, [0], b"S" * 8, None)
    assert server.receive_datagram(ack, T0) == []
    [out] = [parse_control(p) for p in server.packets_to_send()]
    assert (out.opcode, out.session_id, out.acks, out.remote_session_id) == (
        Opcode.ACK_V1, b"S" * 8, (0,), b"C" * 8)


# --- bounded memory ----------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True])
def test_repeated_push_requests_do_not_queue_replies(tls: tuple[ssl.SSLContext, Path],
                                                      tcp: bool) -> None:
    server, client = tunnel(tls, tcp)
    assert server.active is not None and not server.active.send.unacked
    flood = [p for _ in range(1000) for p in client.send_text(b"PUSH_REQUEST\0")]
    assert feed(server, client, flood, T0 + 1) == []
    # Only ACKs went out: the reply was acknowledged and the holdoff is running.
    assert not server.active.send.unacked
    assert all(parse_control(p).opcode is Opcode.ACK_V1
               for chunk in server.packets_to_send()
               for p in (unframe(chunk) if tcp else [chunk]))
    # After the holdoff a client that still asks gets the reply again, once.
    later = T0 + PUSH_REPLY_HOLDOFF_S
    feed(server, client, [p for _ in range(100) for p in client.send_text(b"PUSH_REQUEST\0")],
         later)
    assert len(server.active.send.unacked) == 1
    client.absorb(server.packets_to_send())
    client.tls_packets()
    assert client.keys[0].plaintext.count(b"PUSH_REPLY,") == 2


def test_a_peer_that_never_acknowledges_is_closed_at_the_send_cap(
        tls: tuple[ssl.SSLContext, Path]) -> None:
    server, client = tunnel(tls)
    now = T0
    events: list[Event] = []
    assert server.push_reply_text is not None
    # Each round queues the push reply again; the cap must end it within this many.
    for _ in range(MAX_SEND_QUEUE_BYTES // len(server.push_reply_text) + 1):
        now += PUSH_REPLY_HOLDOFF_S
        events = feed(server, client, client.send_text(b"PUSH_REQUEST\0"), now)
        server.packets_to_send()  # the client never acknowledges any of it
        assert server.active is not None
        assert server.active.send.queued_bytes <= MAX_SEND_QUEUE_BYTES
        if events:
            break
    [err] = events
    assert isinstance(err, ProtocolError) and err.reason == "send-queue-full"
    assert server.closed and server.receive_datagram(client.data(b"x"), now) == []


# --- tls-crypt -----------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True])
def test_tls_crypt_session_from_reset_to_data(tls: tuple[ssl.SSLContext, Path],
                                              tcp: bool) -> None:
    server, client = tunnel(tls, tcp, tls_crypt=True)
    [ev] = feed(server, client, [client.data(IP)])
    assert isinstance(ev, Packets) and ev.payloads() == [IP]
    # A control packet replayed, or one that does not authenticate, is not used.
    ping = client.send_text(b"PUSH_REQUEST\0")
    feed(server, client, ping + ping)
    assert server.drops["replayed tls-crypt packet id"] == len(ping)
    if not tcp:  # over TCP it ends the stream
        forged = bytearray(client.control(Opcode.CONTROL_V1, b"x"))
        forged[-1] ^= 1
        assert server.receive_datagram(bytes(forged), T0) == []
        assert server.drops["control packet failed tls-crypt authentication"] == 1


# --- fuzzing: nothing a peer sends makes the server raise ------------------------------

FUZZ_STATES = ("reset", "tls", "key-exchange", "tunnel", "tls-crypt tunnel")
# The TLS context fixture is only read, so one per test function is fine.
FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def fuzz_session(tls: tuple[ssl.SSLContext, Path], tcp: bool,
                 state: str) -> tuple[OpenVPNServer, list[bytes]]:
    """A server in ``state`` and genuine packets of that moment to mutate (framed
    for TCP)."""
    client = Client(tls[1], tcp=tcp)
    if state == "reset":
        if tcp:
            server = server_for(tls[0], tcp=True, peer_id=1, now=T0)
            return server, [client.control(Opcode.CONTROL_HARD_RESET_CLIENT_V2)]
        server = start(tls, client)
        return server, client.tls_packets()
    if state == "tls":
        server = start(tls, client)
        exchange(server, client, client.tls_packets())
        return server, [*client.send_text(client.key_method_2()), client.ack_packet()]
    if state == "key-exchange":
        server, client, _ = connect(tls, tcp)
        return server, [*client.send_text(b"PUSH_REQUEST\0"), client.ack_packet()]
    server, client = tunnel(tls, tcp, tls_crypt=state == "tls-crypt tunnel")
    samples = [client.data(b"\x45" + bytes(27)), client.data(PING_MAGIC),
               *client.send_text(b"PUSH_REQUEST\0EXIT\0")]
    client.new_key(1)
    return server, [*samples, client.control(Opcode.CONTROL_SOFT_RESET_V1, key_id=1),
                    *client.tls_packets(1)]


def mutated(data: st.DataObject, samples: list[bytes]) -> bytes:
    """A random packet, or a genuine one with bytes changed, cut or added."""
    if not samples or data.draw(st.integers(0, 4)) == 0:
        return data.draw(st.binary(max_size=120))
    pkt = bytearray(data.draw(st.sampled_from(samples)))
    for _ in range(data.draw(st.integers(0, 4))):
        if pkt:
            pkt[data.draw(st.integers(0, len(pkt) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(pkt)))
    return bytes(pkt[:cut] + data.draw(st.binary(max_size=8)) + pkt[cut:]) \
        if data.draw(st.booleans()) else bytes(pkt[:cut])


@pytest.mark.parametrize("state", FUZZ_STATES)
@pytest.mark.parametrize("tcp", [False, True])
@FUZZ
@given(data=st.data())
def test_fuzzed_input_never_raises(tls: tuple[ssl.SSLContext, Path], tcp: bool, state: str,
                                   data: st.DataObject) -> None:
    server, samples = fuzz_session(tls, tcp, state)
    now = T0
    stream = b""
    for _ in range(data.draw(st.integers(1, 6))):
        pkt = mutated(data, samples)
        now += data.draw(st.sampled_from([0.0, 0.5, TLS_TIMEOUT_S, PING_INTERVAL_S,
                                          PUSH_REPLY_HOLDOFF_S, HAND_WINDOW_S]))
        if tcp:  # the stream cut anywhere, as TCP may deliver it
            stream += pkt
            cut = data.draw(st.integers(0, len(stream)))
            chunk, stream = stream[:cut], stream[cut:]
            events = server.receive_data(chunk, now)
        else:
            events = server.receive_datagram(pkt, now)
        events += server.handle_timeout(now)
        server.packets_to_send()
        assert all(isinstance(e, Event) for e in events)
        if any(isinstance(e, ProtocolError) for e in events):
            assert server.closed
        # What is due has been done: the next deadline is not in the past, or a
        # caller's timer would fire again at once.
        when = server.next_timeout()
        assert when is None or when > now
