"""The AnyConnect DTLS data channel, server side, as openconnect 9.x uses it: sans-IO.

The CONNECT negotiates it (``PSK-NEGOTIATE``, :class:`relay.protocols.cstp.DtlsOffer`);
then the client opens a DTLS 1.2 handshake on UDP, keyed with :data:`PSK_LEN` bytes
of the TLS session's RFC 5705 exporter under :data:`PSK_LABEL`, and carrying the
App-ID in its ClientHello's session_id so that the server finds the session
(openconnect ``gnutls-dtls.c``: "set our session identifier match the application
ID"; ocserv ``main.c``, ``get_session_id``). The records themselves are sealed and
opened by OpenSSL (``cext/dtls.c``); this module holds what is protocol:

- :func:`parse_client_hello`: the App-ID and cookie of a datagram, or None;
- :class:`DtlsTunnel`: one session's channel once its handshake completed. Its
  records carry one AnyConnect header byte (:class:`relay.protocols.cstp.PacketType`)
  before the payload, as CSTP frames do without the rest of their header: DATA
  (the IP packets go to the datapath without passing through here), DPD request
  (answered with a DPD response echoing its payload: openconnect's MTU probe
  measures the size that comes back), DPD response, KEEPALIVE and DISCONNECT. The
  machine keeps the channel's liveness and tells when traffic must move back to TLS.

Time only advances through the ``now`` arguments; nothing here raises on what a
peer sends.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from relay.protocols.cstp import (
    DEAD_PEER_INTERVALS,
    PacketType,
    PeerDisconnected,
)

# RFC 5705 exporter label and length of the PSK (PSK_LABEL and PSK_KEY_SIZE in
# openconnect's openconnect-internal.h and ocserv's tlslib.h).
PSK_LABEL = b"EXPORTER-openconnect-psk"
PSK_LEN = 32
# DTLS record header (RFC 6347 4.1): type, version, epoch, sequence number, length.
RECORD_HEADER_LEN = 13
# DTLS handshake header (RFC 6347 4.2.2): type, length, message_seq,
# fragment_offset, fragment_length.
HANDSHAKE_HEADER_LEN = 12
CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23
HANDSHAKE_CLIENT_HELLO = 1
# Every DTLS version's major byte is 254 (DTLS 1.0 is {254, 255}, 1.2 {254, 253}).
DTLS_VERSION_MAJOR = 254
# ClientHello body before the session_id: client_version (2) and random (32).
HELLO_RANDOM_END = 2 + 32
# ocserv switches a session's output back to TLS when the client sends data over
# TLS and nothing has come over UDP for this long (UDP_SWITCH_TIME, worker.h):
# openconnect sends data over TLS only while its DTLS is down, but packets it
# queued just before DTLS came up may still arrive over TLS.
UDP_SWITCH_S = 15.0
# With nothing received over DTLS for this many DPD intervals the relay sends a
# DPD request of its own (ocserv's DPD_TRIES); at DEAD_PEER_INTERVALS (ocserv's
# DPD_MAX_TRIES, 3) the channel is dead and traffic moves back to TLS.
DPD_PROBE_INTERVALS = 2
# Control records (not DATA) acted on per receive; past this they are dropped. An
# honest client sends one DPD or keepalive at a time.
MAX_CONTROL_RECORDS = 64


@dataclass(frozen=True, slots=True)
class ClientHello:
    session_id: bytes  # openconnect's App-ID
    cookie: bytes  # empty before the HelloVerifyRequest


def parse_client_hello(datagram: bytes) -> ClientHello | None:
    """The session_id and cookie of a datagram that begins with a DTLS ClientHello
    (an unfragmented first handshake fragment in epoch 0), or None for anything
    else. Every length is checked against the datagram."""
    n = len(datagram)
    if n < RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + HELLO_RANDOM_END + 1:
        return None
    if datagram[0] != CONTENT_HANDSHAKE or datagram[1] != DTLS_VERSION_MAJOR \
            or datagram[3:5] != b"\0\0":
        return None
    record_end = RECORD_HEADER_LEN + int.from_bytes(datagram[11:13], "big")
    hs = RECORD_HEADER_LEN
    if record_end > n or datagram[hs] != HANDSHAKE_CLIENT_HELLO \
            or datagram[hs + 6:hs + 9] != b"\0\0\0":  # fragment_offset 0
        return None
    fragment_end = hs + HANDSHAKE_HEADER_LEN + int.from_bytes(datagram[hs + 9:hs + 12], "big")
    if fragment_end > record_end:
        return None
    pos = hs + HANDSHAKE_HEADER_LEN + HELLO_RANDOM_END
    sid_len = datagram[pos]
    if pos + 1 + sid_len + 1 > fragment_end:
        return None
    session_id = bytes(datagram[pos + 1:pos + 1 + sid_len])
    pos += 1 + sid_len
    cookie_len = datagram[pos]
    if pos + 1 + cookie_len > fragment_end:
        return None
    return ClientHello(session_id, bytes(datagram[pos + 1:pos + 1 + cookie_len]))


def is_protected_record(datagram: bytes) -> bool:
    """A datagram that begins with a DTLS record of a later epoch than the
    handshake's first: application data, or anything after ChangeCipherSpec."""
    return len(datagram) > RECORD_HEADER_LEN and datagram[1] == DTLS_VERSION_MAJOR \
        and datagram[3:5] != b"\0\0"


@dataclass(frozen=True, slots=True)
class ChannelDown:
    """The channel is dead: the session's traffic goes back to TLS."""

    reason: str


Event = PeerDisconnected | ChannelDown


class DtlsTunnel:
    """One session's DTLS channel after its handshake: the control records, the
    channel's liveness, and whether its traffic should still go this way."""

    def __init__(self, dpd_s: int, now: float) -> None:
        self.dpd_s = dpd_s
        self.up = True
        self.last_rx = now
        self._probed = False  # a DPD request of ours is outstanding
        self._out: list[bytes] = []

    def records_to_send(self) -> list[bytes]:
        """Records (header byte + payload) the machine wants sent over DTLS."""
        out, self._out = self._out, []
        return out

    def received(self, now: float) -> None:
        """Anything authenticated arrived over the channel (DATA included)."""
        self.last_rx = now
        self._probed = False

    def receive_control(self, data: bytes | bytearray, spans: array[int],
                        now: float) -> list[Event]:
        """The non-DATA records of one receive, record i at ``data[spans[2i] :
        spans[2i] + spans[2i+1]]`` with its header byte."""
        if not self.up:
            return []
        self.received(now)
        events: list[Event] = []
        for i in range(0, min(len(spans), 2 * MAX_CONTROL_RECORDS), 2):
            off, n = spans[i], spans[i + 1]
            ptype = data[off]
            if ptype == PacketType.DPD_REQ:
                self._out.append(bytes((PacketType.DPD_RESP,)) + bytes(data[off + 1:off + n]))
            elif ptype in (PacketType.DISCONNECT, PacketType.TERMINATE):
                # A reason code (cstp.DISCONNECT_REASON_CODE), then the text.
                reason = bytes(data[off + 2:off + n]).decode("utf-8", "replace").strip()
                self.up = False
                events.append(PeerDisconnected(reason or "client disconnected"))
                break
            # DPD responses and keepalives only prove the peer alive; other types
            # are ignored, as openconnect's dtls_mainloop ignores unknown ones.
        return events

    def client_sent_over_tls(self, now: float) -> list[Event]:
        """The client sent DATA over TLS: it has given up on this channel if the
        channel has been silent for UDP_SWITCH_S."""
        if self.up and now - self.last_rx > UDP_SWITCH_S:
            self.up = False
            return [ChannelDown(f"client sends over TLS, nothing over DTLS for "
                                f"{now - self.last_rx:.0f} s")]
        return []

    def next_timeout(self) -> float | None:
        if not self.up:
            return None
        probe = self.last_rx + DPD_PROBE_INTERVALS * self.dpd_s
        return probe if not self._probed else self.last_rx + DEAD_PEER_INTERVALS * self.dpd_s

    def handle_timeout(self, now: float) -> list[Event]:
        if not self.up:
            return []
        idle = now - self.last_rx
        if idle >= DEAD_PEER_INTERVALS * self.dpd_s:
            self.up = False
            return [ChannelDown(f"nothing over DTLS for {idle:.0f} s")]
        if idle >= DPD_PROBE_INTERVALS * self.dpd_s and not self._probed:
            self._probed = True
            self._out.append(bytes((PacketType.DPD_REQ,)))
        return []
