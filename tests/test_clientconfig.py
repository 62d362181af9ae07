"""What ``relay client-config`` writes: the .ovpn (which the stock client runs in
test_e2e_openvpn.py) and the openconnect command line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from relay.clientconfig import openconnect_command, openvpn_config
from relay.config import Config, OpenVPNConfig
from relay.errors import RelayError
from relay.tlsconf import SELF_SIGNED_CERT, TLS_CRYPT_KEY, pin_sha256


def _block(text: str, tag: str) -> str:
    return text.split(f"<{tag}>\n")[1].split(f"\n</{tag}>")[0]


def test_ovpn_carries_the_relays_certificate_and_the_transport(tmp_path: Path) -> None:
    cfg = Config().with_data_dir(tmp_path)
    udp = openvpn_config(cfg, tmp_path, "udp", "tun", remote="relay.example.org")
    assert _block(udp, "ca") == (tmp_path / SELF_SIGNED_CERT).read_text().strip()
    lines = udp.splitlines()
    for line in ("client", "dev tun", "proto udp", "remote relay.example.org 1194",
                 "data-ciphers AES-256-GCM:CHACHA20-POLY1305", "explicit-exit-notify 2"):
        assert line in lines
    # An anonymous relay: the client must send a name, any name.
    assert _block(udp, "auth-user-pass") == "anonymous\nanonymous"
    assert "<tls-crypt>" not in udp and not (tmp_path / TLS_CRYPT_KEY).exists()
    tcp = openvpn_config(cfg, tmp_path, "tcp", "tap", remote="relay.example.org")
    assert {"proto tcp-client", "dev tap"} <= set(tcp.splitlines())
    assert "explicit-exit-notify 2" not in tcp  # UDP only
    with_users = replace(cfg, server=replace(cfg.server, users=str(tmp_path / "users")))
    assert "auth-user-pass" in openvpn_config(with_users, tmp_path, "udp", "tun").splitlines()
    for proto, dev in (("sctp", "tun"), ("udp", "tunnel")):
        with pytest.raises(ValueError):
            openvpn_config(cfg, tmp_path, proto, dev)


def test_ovpn_carries_the_tls_crypt_key_when_it_is_on(tmp_path: Path) -> None:
    cfg = replace(Config(), openvpn=OpenVPNConfig(tls_crypt=True)).with_data_dir(tmp_path)
    text = openvpn_config(cfg, tmp_path, "udp", "tun")
    assert _block(text, "tls-crypt") == (tmp_path / TLS_CRYPT_KEY).read_text().strip()
    assert openvpn_config(cfg, tmp_path, "udp", "tun") == text  # the key is made once


def test_openconnect_line_is_pinned_to_the_relays_certificate(tmp_path: Path) -> None:
    cfg = Config().with_data_dir(tmp_path)
    with pytest.raises(RelayError, match="start relay serve once first"):
        openconnect_command(cfg, tmp_path)
    openvpn_config(cfg, tmp_path, "udp", "tun")  # makes the self-signed certificate
    pin = pin_sha256(tmp_path / SELF_SIGNED_CERT)
    assert openconnect_command(cfg, tmp_path, remote="relay.example.org") == (
        f"openconnect --protocol=anyconnect --servercert {pin} https://relay.example.org:443/\n")
