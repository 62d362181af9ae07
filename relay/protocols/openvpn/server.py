"""The OpenVPN server state machine: one client session, sans-IO.

:class:`OpenVPNServer` takes bytes (:meth:`~OpenVPNServer.receive_data` for a TCP
stream, :meth:`~OpenVPNServer.receive_datagram` for UDP) and a ``now`` from the
caller, returns events (:mod:`relay.protocols.openvpn.events`), and queues the
packets it wants sent (:meth:`~OpenVPNServer.packets_to_send`). Time only advances
through the ``now`` arguments and :meth:`~OpenVPNServer.handle_timeout`;
:meth:`~OpenVPNServer.next_timeout` says when that must be called.

Each key (key id 0, then 1..7 for renegotiations the client starts with
P_CONTROL_SOFT_RESET_V1) has its own reliability layer, TLS session and data
keys, as in OpenVPN's ``key_state``; the previous key keeps decrypting for the
transition window.

Data packets go through the session's data channel
(:mod:`relay.protocols.openvpn.datachannel`), all those of one receive at once:
a TCP read's consecutive data frames, a UDP batch's datagrams
(:meth:`~OpenVPNServer.receive_datagrams`); what the client sends arrives as one
:class:`~relay.protocols.openvpn.events.Packets` per call, and
:meth:`~OpenVPNServer.seal` encrypts a batch. The relay passes the C twin of the
data channel; by default it is the pure-Python reference.
"""

from __future__ import annotations

import secrets
import ssl
from array import array
from collections import Counter
from dataclasses import dataclass

from relay.protocols.openvpn.cookie import Proof
from relay.protocols.openvpn.datachannel import (
    DROP_REASONS,
    OCC,
    STREAM_BATCH,
    DataChannel,
    Opened,
    PyDataChannel,
    Sealed,
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
from relay.protocols.openvpn.keymethod import (
    RANDOM_SIZE,
    KeyMethod2,
    option_value,
    parse_key_method_2,
    server_key_method_2,
)
from relay.protocols.openvpn.keys import (
    DATA_CIPHERS,
    HAND_WINDOW_S,
    TRANSITION_WINDOW_S,
    DataKeys,
    ReplayWindow,
    derive_key2,
    negotiate_cipher,
)
from relay.protocols.openvpn.reliable import ReliableReceive, ReliableSend
from relay.protocols.openvpn.tlscrypt import TLS_CRYPT_RESET_REPLY_PID, TlsCrypt
from relay.protocols.openvpn.wire import (
    CONTROL_SEND_ACK_MAX,
    MAX_PACKET_BYTES,
    OCC_EXIT,
    OCC_MAGIC,
    OPCODE_SHIFT,
    PACKET_ID_MAX,
    PEER_ID_MAX,
    PING_MAGIC,
    RELIABLE_ACK_SIZE,
    SID_SIZE,
    TCP_LENGTH,
    TLS_PAYLOAD_MAX,
    Malformed,
    Opcode,
    build_control,
    parse_control,
)

# --- Limits and timeouts (OpenVPN 2.6 defaults unless said otherwise) -----------------

# Pushed as the sample server.conf's "keepalive 10 60" does: ping every 10 s,
# the client restarts after 60 s of silence; the server side waits twice as
# long (OpenVPN's --keepalive doubles ping-restart on the server).
PING_INTERVAL_S = 10
PING_RESTART_S = 60
SERVER_PING_RESTART_S = 2 * PING_RESTART_S
# --scheduled-exit-interval 5: after AUTH_FAILED the client gets 5 s to read it.
SCHEDULED_EXIT_S = 5.0
# Decrypted control-channel text buffered before a message ends: the key-method 2
# message with a full peer-info is ~1.5 KiB (push_peer_info allocates 1536 bytes),
# user and password at most 4 KiB each (USER_PASS_LEN with auth-token).
MAX_PLAINTEXT_BYTES = 16 * 1024
# Control bytes a key may hold queued and unacknowledged. OpenVPN keeps at most
# TLS_RELIABLE_N_SEND_BUFFERS (6) packets of --tls-mtu in flight and one control
# message of TLS_CHANNEL_BUF_SIZE (2048 bytes, common.h) waiting; the relay's largest
# legitimate backlog is its TLS flight (certificate chain included) plus key-method 2
# and the push reply. Four of TLS's largest records (2^14 bytes, RFC 8446 section
# 5.1) hold all of it several times over; past that the client is not acknowledging.
MAX_SEND_QUEUE_BYTES = 4 * 2**14
# push.c (sent_push_reply_expiry): once a PUSH_REPLY is sent, repeated PUSH_REQUESTs
# are ignored this long; the reliability layer retransmits the reply meanwhile.
PUSH_REPLY_HOLDOFF_S = 30.0


@dataclass(frozen=True, slots=True)
class PushParams:
    """What :meth:`OpenVPNServer.push_reply` sends the client."""

    address: str
    netmask: str
    gateway: str
    mtu: int
    dns: tuple[str, ...] = ()
    lladdr: str | None = None  # dev tap: the MAC the client's tap device takes


# --- The state machine -------------------------------------------------------------------


class KeyState:
    """One key id: its reliability layer, TLS session and, once key-method 2 is
    done, its data keys (OpenVPN's struct key_state)."""

    def __init__(self, key_id: int, ctx: ssl.SSLContext, now: float) -> None:
        self.key_id = key_id
        self.send = ReliableSend()
        self.recv = ReliableReceive()
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.handshake_done = False
        self.plaintext = b""
        self.keys: DataKeys | None = None
        self.deadline = now + HAND_WINDOW_S  # key negotiation must finish by then
        self.expires: float | None = None  # set when a newer key takes over


class OpenVPNServer:
    """One client session: over TCP from the client's reset, over UDP from the
    ``proof`` that the peer receives at its address (:func:`check_proof`)."""

    def __init__(self, ctx: ssl.SSLContext, *, tcp: bool, peer_id: int, now: float,
                 proof: Proof | None = None, tls_crypt: TlsCrypt | None = None,
                 wall: int = 0, data_channel: DataChannel | None = None) -> None:
        """``wall``: the wall-clock second, which tls-crypt's packet ids carry;
        ``data_channel``: where the data keys live (default: the Python reference)."""
        if not 0 <= peer_id <= PEER_ID_MAX:
            raise ValueError(f"peer id {peer_id} out of range")
        if tcp == (proof is not None):
            raise ValueError("a UDP session starts from a proof, a TCP one from a reset")
        self.ctx = ctx
        self.tcp = tcp
        self.peer_id = peer_id
        self.session_id = secrets.token_bytes(SID_SIZE)
        self.remote_session_id: bytes | None = None
        self.keys: dict[int, KeyState] = {}
        self.active: KeyState | None = None  # newest key with data keys
        self.dev_type = "tun"
        self.cipher: str | None = None  # negotiated with the first key
        self.data = data_channel if data_channel is not None else PyDataChannel()
        self.push_reply_text: str | None = None
        self.push_repeat_after = 0.0  # PUSH_REQUESTs before this are not answered again
        self.closing_at: float | None = None  # AUTH_FAILED queued: close when acked
        self.closed = False
        self.last_rx = now
        self.last_tx = now
        self.drops: Counter[str] = Counter()
        self._stream = bytearray()
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self.tls_crypt = tls_crypt
        # Our packet ids go on after the stateless reply's; the client's are checked
        # against replays (its sequence never restarts within a session).
        self._wrap_time = wall
        self._wrap_pid = TLS_CRYPT_RESET_REPLY_PID + 1 if proof is not None else 1
        self._wrap_replay = ReplayWindow()
        if proof is not None:
            # The resets crossed statelessly: ours (packet id 0) is acknowledged by
            # the proof, the client's (packet id 0) is received and owed an ACK.
            self.session_id = proof.server_session_id
            self.remote_session_id = proof.client_session_id
            ks = self.keys[0] = KeyState(0, ctx, now)
            ks.send.next_id = ks.send.base = 1
            ks.recv.next_id = 1
            ks.recv.acks.append(0)

    # -- input ----------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Bytes from the TCP stream: 16-bit length, packet, ..."""
        buf = self._stream
        buf += data
        pos = 0
        while len(buf) - pos >= TCP_LENGTH.size and not self.closed:
            if self.remote_session_id is not None:
                # The data frames from here on, in one call; then what stopped them.
                opened = self.data.open_stream(buf, pos, MAX_PACKET_BYTES)
                if opened.status:
                    pos = opened.end
                    self._opened(opened, now)
                    if (len(opened.status) == STREAM_BATCH or self.closed
                            or len(buf) - pos < TCP_LENGTH.size):
                        continue  # more data frames may follow, or the loop is done
            (n,) = TCP_LENGTH.unpack_from(buf, pos)
            if not 0 < n <= MAX_PACKET_BYTES:
                self._fail(f"{n}-byte packet in the TCP stream (at most {MAX_PACKET_BYTES})",
                           "packet-too-large" if n else "protocol-error")
                break
            first = pos + TCP_LENGTH.size
            if (self.remote_session_id is None and len(buf) > first
                    and buf[first] != Opcode.CONTROL_HARD_RESET_CLIENT_V2 << OPCODE_SHIFT):
                self._fail("the TCP stream does not start with P_CONTROL_HARD_RESET_CLIENT_V2")
                break
            if len(buf) - pos - TCP_LENGTH.size < n:
                break
            start = pos + TCP_LENGTH.size
            self._packet(bytes(buf[start:start + n]), now)
            pos = start + n
        del buf[:pos]
        return self._finish(now)

    def receive_datagram(self, pkt: bytes, now: float) -> list[Event]:
        if len(pkt) > MAX_PACKET_BYTES:
            self._drop(f"datagram larger than {MAX_PACKET_BYTES} bytes")
        elif not self.closed:
            self._packet(pkt, now)
        return self._finish(now)

    def receive_datagrams(self, buf: bytearray, spans: array[int], now: float, *,
                          moved: bool = False) -> list[Event]:
        """Data packets that arrived together, ``buf[spans[2i] : spans[2i] +
        spans[2i+1]]``, in one call of the data channel, which decrypts them in
        place (the :class:`Packets` are in ``buf``; the bytes of packets that fail
        are undefined). ``moved``: they came from another address than the
        session's. Unless one
        of them authenticates they are then dropped uncounted (anyone can send
        from anywhere); when one does, :class:`Floated` comes first (OpenVPN's
        float: the client's address changed, a NAT rebinding)."""
        if self.closed or not spans:
            return []
        opened = self.data.open(buf, spans, MAX_PACKET_BYTES)
        if moved:
            if not opened.authenticated:
                return []
            self._events.append(Floated())
        self._opened(opened, now)
        events, self._events = self._events, []
        return events

    def _packet(self, pkt: bytes, now: float) -> None:
        if not pkt:
            self._drop("empty packet")
            return
        op = pkt[0] >> OPCODE_SHIFT
        if op == Opcode.DATA_V2 or op == Opcode.DATA_V1:
            self._opened(self.data.open(bytearray(pkt), array("I", (0, len(pkt))),
                                        MAX_PACKET_BYTES), now)
            return
        if self.tls_crypt is not None:
            opened = self.tls_crypt.unwrap(pkt)
            if opened is None:
                self._hostile("control packet failed tls-crypt authentication")
                return
            pkt, pid = opened
            if not self._wrap_replay.check(pid):
                self._drop("replayed tls-crypt packet id")
                return
            self._wrap_replay.commit(pid)
        try:
            p = parse_control(pkt)
        except Malformed as exc:
            self._hostile(str(exc))
            return
        if self.remote_session_id is None:  # TCP: the stream's first packet
            if p.opcode is not Opcode.CONTROL_HARD_RESET_CLIENT_V2 or p.key_id:
                self._hostile(f"{p.opcode.name} before P_CONTROL_HARD_RESET_CLIENT_V2")
                return
            self.remote_session_id = p.session_id
            ks = self.keys[0] = KeyState(0, self.ctx, now)
            ks.send.queue(Opcode.CONTROL_HARD_RESET_SERVER_V2, b"")
        elif p.session_id != self.remote_session_id:
            self._hostile("control packet from another session id")
            return
        if p.acks and p.remote_session_id != self.session_id:
            self._hostile("ACK for another session id")
            return
        ks = self.keys.get(p.key_id)
        if p.opcode is Opcode.CONTROL_SOFT_RESET_V1 and ks is None:
            ks = self._soft_reset(p.key_id, now)
        if ks is None:
            self._drop(f"control packet for unknown key id {p.key_id}")
            return
        self.last_rx = now
        for pid in p.acks:
            ks.send.ack(pid)
        if p.packet_id is None:
            return
        ks.recv.receive(p)
        for q in ks.recv.ready():
            if q.opcode is Opcode.CONTROL_V1:
                self._tls_input(ks, q.payload, now)
            # Resets carry no TLS data (a 2.6 client may add early-negotiation TLVs
            # for tls-crypt-v2, which the relay does not use).
            if self.closed:
                return

    def _soft_reset(self, key_id: int, now: float) -> KeyState | None:
        """The client renegotiates: a new key state beside the current one."""
        if self.active is None or key_id == 0:
            self._drop(f"soft reset for key id {key_id} before the first key")
            return None
        for old in [k for k in self.keys.values() if k is not self.active]:
            self._forget_key(old.key_id)  # at most the active key and the new one
        if key_id == self.active.key_id:
            self._drop(f"soft reset for the active key id {key_id}")
            return None
        ks = self.keys[key_id] = KeyState(key_id, self.ctx, now)
        ks.send.queue(Opcode.CONTROL_SOFT_RESET_V1, b"")
        return ks

    # -- TLS and the control-channel messages -------------------------------------------

    def _tls_input(self, ks: KeyState, data: bytes, now: float) -> None:
        ks.incoming.write(data)
        try:
            if not ks.handshake_done:
                ks.tls.do_handshake()
                ks.handshake_done = True
            while chunk := ks.tls.read(MAX_PLAINTEXT_BYTES):
                ks.plaintext += chunk
                if len(ks.plaintext) > MAX_PLAINTEXT_BYTES:
                    self._fail(f"more than {MAX_PLAINTEXT_BYTES} bytes of control text "
                               "without a complete message", "control-text-too-long")
                    return
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLZeroReturnError:
            self._events.append(PeerExit("TLS session closed by the client"))
            self.closed = True
            return
        except ssl.SSLError as exc:
            what = "handshake" if not ks.handshake_done else "record"
            self._fail(f"TLS {what} failed: {exc.reason or exc}")
            return
        self._plaintext(ks, now)

    def _plaintext(self, ks: KeyState, now: float) -> None:
        if ks.keys is None and ks.plaintext:
            try:
                parsed = parse_key_method_2(ks.plaintext)
            except Malformed as exc:
                self._fail(str(exc))
                return
            if parsed is None:
                return
            km2, used = parsed
            ks.plaintext = ks.plaintext[used:]
            self._key_exchange(ks, km2, now)
        while b"\0" in ks.plaintext and not self.closed:
            raw, _, ks.plaintext = ks.plaintext.partition(b"\0")
            self._control_message(raw.decode("utf-8", "replace"), now)

    def _key_exchange(self, ks: KeyState, km2: KeyMethod2, now: float) -> None:
        assert self.remote_session_id is not None
        if self.cipher is None:  # renegotiations keep the first key's cipher
            self.cipher = negotiate_cipher(km2.peer_info)
            if self.cipher is None:
                offered = km2.peer_info.get("IV_CIPHERS", "")
                self._fail(f"the client offers none of the relay's data ciphers "
                           f"{', '.join(DATA_CIPHERS)} (IV_CIPHERS={offered!r}); the relay has "
                           "no non-AEAD data channel")
                return
        if ks.key_id == 0:
            self.dev_type = "tap" if option_value(km2.options, "dev-type") == "tap" else "tun"
            self._events.append(ClientAuth(km2.username, km2.password, km2.peer_info,
                                           self.dev_type))
        random1, random2 = secrets.token_bytes(RANDOM_SIZE), secrets.token_bytes(RANDOM_SIZE)
        ks.tls.write(server_key_method_2(random1, random2, self._options_string()))
        ks.keys = DataKeys.from_key2(self.cipher, derive_key2(
            km2.pre_master, km2.random1, random1, km2.random2, random2,
            self.remote_session_id, self.session_id))
        self.data.install(ks.key_id, ks.keys)
        previous = self.active
        self.active = ks
        if previous is not None:
            previous.expires = now + TRANSITION_WINDOW_S

    def _options_string(self) -> str:
        proto = "TCPv4_SERVER" if self.tcp else "UDPv4"
        return (f"V4,dev-type {self.dev_type},link-mtu 1550,tun-mtu 1500,proto {proto},"
                f"cipher {self.cipher},auth [null-digest],keysize 256,key-method 2,tls-server")

    def _control_message(self, text: str, now: float) -> None:
        if text == "PUSH_REQUEST":
            if self.push_reply_text is None:
                if self.closing_at is None:
                    self._events.append(PushRequest())
            elif now >= self.push_repeat_after:  # the client lost what we sent
                self._send_text(self.push_reply_text)
                self.push_repeat_after = now + PUSH_REPLY_HOLDOFF_S
        elif text == "EXIT" or text.startswith("EXIT,"):
            self._events.append(PeerExit("exit notification (control channel)"))
            self.closed = True
        else:
            self._drop("unknown control message")

    def _send_text(self, text: str) -> None:
        assert self.active is not None
        self.active.tls.write(text.encode() + b"\0")

    # -- the application's answers ------------------------------------------------------

    def push_reply(self, params: PushParams, now: float) -> list[Event]:
        items = ["PUSH_REPLY", "redirect-gateway def1", f"route-gateway {params.gateway}"]
        if self.dev_type == "tun":
            items.append("topology subnet")
        items += [f"ping {PING_INTERVAL_S}", f"ping-restart {PING_RESTART_S}",
                  f"ifconfig {params.address} {params.netmask}"]
        items += [f"dhcp-option DNS {ip}" for ip in params.dns]
        if params.lladdr is not None:
            items.append(f"lladdr {params.lladdr}")
        items += [f"tun-mtu {params.mtu}", f"peer-id {self.peer_id}", f"cipher {self.cipher}"]
        self.push_reply_text = ",".join(items)
        self._send_text(self.push_reply_text)
        self.push_repeat_after = now + PUSH_REPLY_HOLDOFF_S
        return self._finish(now)

    def auth_failed(self, message: str, now: float, *, temporary: bool = False) -> list[Event]:
        """Refuse the login (``temporary``: the client may retry later, OpenVPN
        2.6's AUTH_FAILED,TEMP); :class:`Closed` follows once the client has it."""
        self._send_text(f"AUTH_FAILED,{'TEMP:' if temporary else ''}{message}")
        self.closing_at = now + SCHEDULED_EXIT_S
        return self._finish(now)

    def disconnect(self, message: str, *, restart: bool, now: float) -> None:
        """Tell the client the relay ends the session (RESTART: come back later;
        HALT: do not) and stop; the caller sends what is queued, then closes."""
        if self.active is not None:
            self._send_text(f"{'RESTART' if restart else 'HALT'},{message}")
        self._finish(now)
        self.closed = True

    # -- data channel --------------------------------------------------------------------

    def seal(self, buf: bytes | bytearray, spans: array[int]) -> Sealed | None:
        """The payloads ``buf[spans[2i] : spans[2i] + spans[2i+1]]`` (IP packets, or
        frames for dev tap) as data packets to send, framed for TCP, in one call of
        the data channel; None before keys exist or once closed. The result may
        share the channel's buffer: send it before the next call."""
        ks = self.active
        if ks is None or ks.keys is None or self.closed:
            return None
        return self.data.seal(ks.key_id, self.peer_id, buf, spans, self.tcp)

    def _opened(self, opened: Opened, now: float) -> None:
        """Act on what the data channel made of a batch of data packets."""
        for status, why in DROP_REASONS.items():
            if opened.counts[status]:
                self.drops[why] += opened.counts[status]
        if not opened.authenticated:
            return
        self.last_rx = now  # pings, too, say the client is alive
        if opened.data:
            self._events.append(Packets(opened.plain, opened.data))
        if opened.counts[OCC]:
            for i, status in enumerate(opened.status):
                off, n = opened.spans[2 * i], opened.spans[2 * i + 1]
                # Other OCC messages only matter in static-key mode.
                if status == OCC and n > len(OCC_MAGIC) \
                        and opened.plain[off + len(OCC_MAGIC)] == OCC_EXIT:
                    self._events.append(PeerExit("exit notification (OCC_EXIT)"))
                    self.closed = True
                    return

    # -- time ----------------------------------------------------------------------------

    def next_timeout(self) -> float | None:
        times: list[float] = []
        for ks in self.keys.values():
            t = ks.send.next_timeout()
            if t is not None:
                times.append(t)
            times.append(ks.expires if ks.expires is not None
                         else ks.deadline if ks.keys is None else float("inf"))
        if self.push_reply_text is not None:
            times += [self.last_tx + PING_INTERVAL_S, self.last_rx + SERVER_PING_RESTART_S]
        if self.closing_at is not None:
            times.append(self.closing_at)
        finite = [t for t in times if t != float("inf")]
        return min(finite) if finite and not self.closed else None

    def handle_timeout(self, now: float) -> list[Event]:
        if self.closed:
            return []
        if self.closing_at is not None and now >= self.closing_at:
            self._events.append(Closed())
            self.closed = True
            return self._finish(now)
        for ks in list(self.keys.values()):
            if ks.expires is not None and now >= ks.expires:
                self._forget_key(ks.key_id)
            elif ks.keys is None and now >= ks.deadline:
                if ks.key_id == 0:
                    self._events.append(PeerDead(
                        f"TLS key negotiation did not finish within {HAND_WINDOW_S:.0f} s"))
                    self.closed = True
                    return self._finish(now)
                self.drops["renegotiation timed out"] += 1
                self._forget_key(ks.key_id)
        if self.push_reply_text is not None:
            if now - self.last_rx >= SERVER_PING_RESTART_S:
                idle = now - self.last_rx
                self._events.append(PeerDead(f"nothing from the client for {idle:.0f} s"))
                self.closed = True
                return self._finish(now)
            if now - self.last_tx >= PING_INTERVAL_S:
                ping = self.seal(PING_MAGIC, array("I", (0, len(PING_MAGIC))))
                if ping is not None and ping.count:
                    self._out.append(bytes(ping.data[:ping.size]))
                    self.last_tx = now
        return self._finish(now)

    # -- output ---------------------------------------------------------------------------

    def packets_to_send(self) -> list[bytes]:
        """Packets (UDP) or framed bytes (TCP) to write, in order."""
        out, self._out = self._out, []
        return out

    def _forget_key(self, key_id: int) -> None:
        del self.keys[key_id]
        self.data.remove(key_id)

    def note_sent(self, now: float) -> None:
        """A data packet went out (keepalive pings are only needed when idle)."""
        self.last_tx = now

    def _finish(self, now: float) -> list[Event]:
        for ks in self.keys.values():
            if not self._flush_key(ks, now):
                break
        if (self.closing_at is not None and not self.closed
                and all(not ks.send.unacked for ks in self.keys.values())):
            self._events.append(Closed())
            self.closed = True
        events, self._events = self._events, []
        return events

    def _flush_key(self, ks: KeyState, now: float) -> bool:
        """Send what is due on one key; False when the peer exceeded the send cap."""
        pending = ks.outgoing.read()
        if ks.send.queued_bytes + len(pending) > MAX_SEND_QUEUE_BYTES:
            self._fail(f"more than {MAX_SEND_QUEUE_BYTES} bytes of control packets "
                       "unacknowledged", "send-queue-full")
            return False
        while pending:
            ks.send.queue(Opcode.CONTROL_V1, pending[:TLS_PAYLOAD_MAX])
            pending = pending[TLS_PAYLOAD_MAX:]
        remote = self.remote_session_id or b""
        acks = ks.recv.acks
        for pid, e in ks.send.due(now):
            carried, acks = acks[:CONTROL_SEND_ACK_MAX], acks[CONTROL_SEND_ACK_MAX:]
            self._emit(build_control(e.opcode, ks.key_id, self.session_id, carried, remote,
                                     pid, e.payload), now)
        while acks:
            carried, acks = acks[:RELIABLE_ACK_SIZE], acks[RELIABLE_ACK_SIZE:]
            self._emit(build_control(Opcode.ACK_V1, ks.key_id, self.session_id, carried,
                                     remote, None), now)
        ks.recv.acks = []
        return True

    def _emit(self, pkt: bytes, now: float) -> None:
        if self.tls_crypt is not None:
            if self._wrap_pid > PACKET_ID_MAX:  # tls_crypt_wrap: "packet ID roll over"
                if not self.closed:
                    self._fail("tls-crypt packet ids used up")
                return
            pkt = self.tls_crypt.wrap(pkt, self._wrap_pid, self._wrap_time)
            self._wrap_pid += 1
        self._out.append(TCP_LENGTH.pack(len(pkt)) + pkt if self.tcp else pkt)
        self.last_tx = now

    # -- errors ---------------------------------------------------------------------------

    def _drop(self, why: str) -> None:
        self.drops[why] += 1

    def _hostile(self, why: str) -> None:
        """Malformed control input: a TCP stream is beyond repair, a UDP
        datagram is dropped (anyone can spoof one)."""
        if self.tcp:
            self._fail(why)
        else:
            self._drop(why)

    def _fail(self, message: str, reason: str = "protocol-error") -> None:
        self._events.append(ProtocolError(message, reason))
        self.closed = True
