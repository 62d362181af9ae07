"""The DTLS data channel's sans-IO parts (relay.protocols.dtls), the CSTP
negotiation of it (relay.protocols.cstp), the PSK exporter of a TLS connection
(relay.serve.dtls_link.tls_psk) and the abuse accounting of its handshakes."""

from __future__ import annotations

import contextlib
import ssl
from array import array
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import AbuseConfig
from relay.protocols import cstp, dtls
from relay.serve.abuse import Abuse
from relay.serve.dtls_link import sockaddr_peer, tls_psk
from relay.tlsconf import ensure_self_signed

APP_ID = bytes(range(32))


def client_hello(session_id: bytes, cookie: bytes = b"", epoch: bytes = b"\0\0") -> bytes:
    body = (b"\xfe\xfd" + bytes(32) + bytes((len(session_id),)) + session_id
            + bytes((len(cookie),)) + cookie + b"\x00\x02\x00\xa8\x01\x00")
    hs = b"\x01" + len(body).to_bytes(3, "big") + b"\0\0" + b"\0\0\0" \
        + len(body).to_bytes(3, "big") + body
    return b"\x16\xfe\xff" + epoch + bytes(6) + len(hs).to_bytes(2, "big") + hs


# -- the ClientHello ---------------------------------------------------------------------

def test_the_app_id_and_cookie_are_read_from_a_client_hello() -> None:
    assert dtls.parse_client_hello(client_hello(APP_ID)) == dtls.ClientHello(APP_ID, b"")
    hello = dtls.parse_client_hello(client_hello(APP_ID, b"c" * 32))
    assert hello == dtls.ClientHello(APP_ID, b"c" * 32)


def test_what_is_not_a_first_client_hello_is_none() -> None:
    good = client_hello(APP_ID)
    assert dtls.parse_client_hello(client_hello(APP_ID, epoch=b"\0\1")) is None
    assert dtls.parse_client_hello(b"\x17" + good[1:]) is None  # application data
    assert dtls.parse_client_hello(good[:13] + b"\x02" + good[14:]) is None  # ServerHello
    assert dtls.parse_client_hello(good[:40]) is None  # cut short
    # A session_id longer than the fragment.
    assert dtls.parse_client_hello(good[:59] + b"\xff" + good[60:]) is None


@given(st.binary(max_size=300))
def test_no_datagram_makes_the_parser_raise(data: bytes) -> None:
    hello = dtls.parse_client_hello(data)
    assert hello is None or len(hello.session_id) <= 255


@given(st.integers(0, 200), st.binary(min_size=1, max_size=1))
def test_every_cut_or_changed_byte_of_a_hello_is_parsed_or_refused(at: int,
                                                                 byte: bytes) -> None:
    good = client_hello(APP_ID, b"k" * 32)
    at %= len(good)
    for data in (good[:at], good[:at] + byte + good[at + 1:]):
        dtls.parse_client_hello(data)


# -- the negotiation ---------------------------------------------------------------------

PARAMS = cstp.TunnelParams(address="10.211.0.2", netmask="255.255.0.0", mtu=1400, dpd_s=30,
                           keepalive_s=20)


def connect(extra: str = "") -> bytes:
    return (b"CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nCookie: webvpn=tok\r\n"
            + extra.encode() + b"\r\n")


@pytest.mark.parametrize("header, offered", [
    ("X-DTLS-CipherSuite: PSK-NEGOTIATE:OC-DTLS1_2-AES256-GCM:AES128-SHA\r\n", True),
    ("X-DTLS12-CipherSuite: ECDHE-RSA-AES256-GCM-SHA384:PSK-NEGOTIATE\r\n", True),
    ("X-DTLS-CipherSuite: OC-DTLS1_2-AES256-GCM:AES128-SHA\r\n", False),  # legacy only
    ("X-DTLS-CipherSuite: XPSK-NEGOTIATE\r\n", False),
    ("", False),
])
def test_the_connect_says_whether_psk_negotiate_is_offered(header: str, offered: bool) -> None:
    c = cstp.CstpServer()
    assert c.receive_data(connect(header), 0.0) == [cstp.TunnelRequest("tok", dtls=offered)]


def test_the_tunnel_offers_dtls_with_ocservs_headers_and_one_mtu() -> None:
    c = cstp.CstpServer()
    c.receive_data(connect("X-DTLS-CipherSuite: PSK-NEGOTIATE\r\n"), 0.0)
    offer = cstp.DtlsOffer(port=443, app_id=APP_ID, dpd_s=30, keepalive_s=20)
    c.open_tunnel(replace(PARAMS, dtls=offer))
    head = c.data_to_send().decode()
    assert "X-DTLS-Port: 443\r\n" in head and "X-DTLS-DPD: 30\r\n" in head
    assert "X-DTLS-Keepalive: 20\r\n" in head
    assert f"X-DTLS-App-ID: {APP_ID.hex()}\r\n" in head
    assert "X-DTLS-CipherSuite: PSK-NEGOTIATE\r\n" in head
    # openconnect's DTLS packet size: Base-MTU - 28 - 37 (AES-GCM) - 1 = the MTU.
    assert "X-CSTP-MTU: 1400\r\n" in head and "X-CSTP-Base-MTU: 1466\r\n" in head


def test_a_tunnel_without_dtls_has_no_dtls_headers() -> None:
    c = cstp.CstpServer()
    c.receive_data(connect("X-DTLS-CipherSuite: PSK-NEGOTIATE\r\n"), 0.0)
    c.open_tunnel(PARAMS)
    head = c.data_to_send().decode()
    assert "X-DTLS" not in head and "X-CSTP-Base-MTU: 1400\r\n" in head


def test_dtls_traffic_keeps_the_tunnel_alive_as_tls_traffic_does() -> None:
    c = cstp.CstpServer()
    c.receive_data(connect(), 0.0)
    c.open_tunnel(PARAMS)
    assert c.next_timeout() == 90.0
    c.peer_active(80.0)  # a DTLS record
    assert c.handle_timeout(90.0) == [] and c.next_timeout() == 170.0
    c.peer_active(10.0)  # late news changes nothing
    assert c.next_timeout() == 170.0


# -- the channel machine -------------------------------------------------------------------

def records(*recs: bytes) -> tuple[bytes, array[int]]:
    data = b"".join(recs)
    spans, off = array("I"), 0
    for r in recs:
        spans.extend((off, len(r)))
        off += len(r)
    return data, spans


def test_a_dpd_request_is_echoed_with_its_payload_for_mtu_probing() -> None:
    m = dtls.DtlsTunnel(dpd_s=30, now=0.0)
    probe = bytes((cstp.PacketType.DPD_REQ,)) + b"\x12\x34\x56\x78" + bytes(1300)
    data, spans = records(probe, bytes((cstp.PacketType.KEEPALIVE,)))
    assert m.receive_control(data, spans, 5.0) == []
    assert m.records_to_send() == [bytes((cstp.PacketType.DPD_RESP,)) + probe[1:]]
    assert m.records_to_send() == []


def test_a_disconnect_over_dtls_ends_the_session_with_the_clients_words() -> None:
    m = dtls.DtlsTunnel(dpd_s=30, now=0.0)
    data, spans = records(bytes((cstp.PacketType.DISCONNECT, cstp.DISCONNECT_REASON_CODE))
                          + b"Client received SIGINT")
    assert m.receive_control(data, spans, 1.0) == [cstp.PeerDisconnected("Client received SIGINT")]


def test_a_silent_channel_is_probed_then_goes_down() -> None:
    m = dtls.DtlsTunnel(dpd_s=10, now=100.0)
    assert m.next_timeout() == 120.0
    assert m.handle_timeout(119.0) == []
    assert m.handle_timeout(120.0) == [] and m.records_to_send() == [b"\x03"]
    assert m.next_timeout() == 130.0
    assert m.handle_timeout(130.0) == [dtls.ChannelDown("nothing over DTLS for 30 s")]
    assert not m.up and m.next_timeout() is None


def test_traffic_keeps_the_channel_up() -> None:
    m = dtls.DtlsTunnel(dpd_s=10, now=0.0)
    m.received(25.0)
    assert m.handle_timeout(30.0) == [] and m.next_timeout() == 45.0


def test_data_over_tls_moves_traffic_back_only_once_dtls_has_gone_quiet() -> None:
    m = dtls.DtlsTunnel(dpd_s=30, now=0.0)
    # Packets queued over TLS before DTLS came up may arrive after it.
    assert m.client_sent_over_tls(dtls.UDP_SWITCH_S - 1) == []
    assert m.up
    [down] = m.client_sent_over_tls(dtls.UDP_SWITCH_S + 1)
    assert isinstance(down, dtls.ChannelDown) and not m.up


# -- the exporter --------------------------------------------------------------------------

@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_both_ends_of_a_tls_connection_export_the_same_psk(tmp_path: Path,
                                                           version: ssl.TLSVersion) -> None:
    cert, key = ensure_self_signed(tmp_path, "relay.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.maximum_version = version
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    client = client_ctx.wrap_bio(bios[2], bios[3])
    for _ in range(6):
        for end in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        bios[0].write(bios[3].read())
        bios[2].write(bios[1].read())
    psk = tls_psk(server)
    assert psk is not None and len(psk) == dtls.PSK_LEN
    assert tls_psk(client) == psk
    assert tls_psk(object()) is None


def test_socket_addresses_from_recvmmsg_are_read() -> None:
    v4 = (2).to_bytes(2, "little") + (443).to_bytes(2, "big") + bytes((198, 18, 1, 2)) + bytes(8)
    assert sockaddr_peer(v4) == ("198.18.1.2", 443)
    v6 = (10).to_bytes(2, "little") + (5000).to_bytes(2, "big") + bytes(4) \
        + bytes(10) + b"\xff\xff" + bytes((198, 18, 1, 2)) + bytes(4)
    assert sockaddr_peer(v6) == ("::ffff:198.18.1.2", 5000)


# -- abuse accounting ------------------------------------------------------------------------

def test_a_dtls_handshake_takes_a_slot_but_no_session_and_a_failed_one_strikes(
        tmp_path: Path) -> None:
    now = [1000.0]
    # Three strikes: the refusal below is one, then two failed handshakes.
    abuse = Abuse(AbuseConfig(sessions_per_ip=1, strikes=3), tmp_path, lambda r: None,
                  lambda: now[0])
    assert abuse.admit("198.51.100.7") is None
    abuse.handshake_done("198.51.100.7")  # the TLS session: the source's only one
    assert abuse.admit("198.51.100.7") == "sessions-per-ip"
    # Its DTLS handshake is not a new session: let in, counted while it runs.
    assert abuse.admit("198.51.100.7", new_session=False) is None
    assert abuse.handshakes == 1
    abuse.handshake_over("198.51.100.7", strike=False)
    assert abuse.handshakes == 0 and not abuse.bans
    for _ in range(2):  # failed handshakes are strikes, as half-finished TLS ones
        assert abuse.admit("198.51.100.7", new_session=False) is None
        abuse.handshake_over("198.51.100.7", strike=True)
    assert abuse.banned("198.51.100.7") is not None
    assert abuse.admit("198.51.100.7", new_session=False) == "banned"
