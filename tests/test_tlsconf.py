"""The relay's key material in its data directory: the tls-crypt key file."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.errors import RelayError
from relay.protocols.openvpn.tlscrypt import parse_static_key
from relay.tlsconf import TLS_CRYPT_KEY, tls_crypt_key


def test_the_relays_tls_crypt_key_is_made_once_private_and_checked(tmp_path: Path) -> None:
    text = tls_crypt_key(tmp_path)
    path = tmp_path / TLS_CRYPT_KEY
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert len(parse_static_key(text)) == 256 and tls_crypt_key(tmp_path) == text
    path.write_text(text[:100])
    with pytest.raises(RelayError, match="remove it to have a new key made"):
        tls_crypt_key(tmp_path)
