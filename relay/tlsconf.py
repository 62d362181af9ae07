"""TLS for the listeners: TLS 1.2 or newer only, a self-signed certificate
generated into the data directory when none is configured, OpenVPN's tls-crypt
key beside it, and the relay id a client certificate proves (relay collector
and relay directory believe certificates, not claims)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import re
import secrets
import socket
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.config import SERVER_ID_RULE
from relay.errors import RelayError
from relay.protocols.openvpn.keys import KEY2_SIZE
from relay.protocols.openvpn.tlscrypt import format_static_key, parse_static_key

SELF_SIGNED_CERT = "tls/cert.pem"
SELF_SIGNED_KEY = "tls/key.pem"
# Long enough that a volunteer's relay does not stop on a forgotten renewal;
# clients pin the key (pin-sha256), not the dates.
SELF_SIGNED_DAYS = 3650
# The tls-crypt key, made on first use like the self-signed certificate beside it.
TLS_CRYPT_KEY = "tls/tls-crypt.key"


def ensure_self_signed(data_dir: Path, common_name: str) -> tuple[Path, Path]:
    """A key and self-signed certificate for ``common_name`` under ``data_dir/tls``
    (made once, then reused so that clients' pins stay valid)."""
    cert_path = data_dir / SELF_SIGNED_CERT
    key_path = data_dir / SELF_SIGNED_KEY
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def pin_sha256(cert_path: Path) -> str:
    """openconnect's --servercert value for this certificate."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return "pin-sha256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


def server_context(data_dir: Path, cert: str, key: str) -> tuple[ssl.SSLContext, Path]:
    if cert:
        cert_path, key_path = Path(cert), Path(key)
    else:
        cert_path, key_path = ensure_self_signed(data_dir, socket.gethostname())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise RelayError(f"[server] cert: cannot load {cert_path} / {key_path}: {exc}") from None
    return ctx, cert_path


def identity_of_names(common_names: list[str]) -> str | None:
    """The relay id a client certificate proves: its subject's single CN, when
    that CN follows the [server] id rule; None otherwise. relay collector files a
    sender's records under it and refuses records that claim another id; relay
    directory lists a relay only under it."""
    if len(common_names) == 1 and re.fullmatch(SERVER_ID_RULE, common_names[0]) \
            and common_names[0] not in (".", ".."):
        return common_names[0]
    return None


def peer_identity(cert: dict[str, Any] | None) -> str | None:
    """The relay id of a verified client certificate (ssl's decoded form)."""
    if not cert:
        return None
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    return identity_of_names(names)


def tls_crypt_key(data_dir: Path) -> str:
    """The text of the relay's tls-crypt key file (made, 0600, if there is none)."""
    path = data_dir / TLS_CRYPT_KEY
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(format_static_key(secrets.token_bytes(KEY2_SIZE)))
    text = path.read_text()
    try:
        parse_static_key(text)
    except ValueError as exc:
        raise RelayError(f"{path}: {exc}; remove it to have a new key made") from None
    return text
