"""What a stock client needs to reach this relay (``relay client-config``; the
directory's public server list carries the same text): a ready ``.ovpn`` for
``openvpn``, the command line for ``openconnect``, both pinned to the relay's
certificate."""

from __future__ import annotations

import socket
from pathlib import Path

from relay.config import Config, parse_hostport
from relay.errors import RelayError
from relay.protocols.openvpn.keys import DATA_CIPHERS
from relay.tlsconf import SELF_SIGNED_CERT, ensure_self_signed, pin_sha256, tls_crypt_key

# explicit-exit-notify n: the client sends its exit notification up to n times, a
# second apart (openvpn(8); its default and the usual .ovpn files say 1).
EXIT_NOTIFY_ATTEMPTS = 2


def openvpn_config(cfg: Config, data_dir: Path, proto: str, dev: str,
                   remote: str | None = None) -> str:
    """A ready ``.ovpn`` for the stock client: the relay's certificate inline as
    the CA, ``proto`` "udp" or "tcp", ``dev`` "tun" or "tap", the tls-crypt key
    inline with ``[openvpn] tls_crypt``; ``remote`` is the address clients use
    (default: the listen address, or this host's name when that is a wildcard)."""
    if proto not in ("udp", "tcp"):
        raise ValueError(f"proto must be udp or tcp, got {proto!r}")
    if dev not in ("tun", "tap"):
        raise ValueError(f"dev must be tun or tap, got {dev!r}")
    host, port = parse_hostport(cfg.openvpn.listen)
    if remote is None:
        remote = socket.getfqdn() if host in ("0.0.0.0", "::") else host
    if cfg.server.cert:
        cert_path = Path(cfg.server.cert)
    else:
        cert_path, _ = ensure_self_signed(data_dir, socket.gethostname())
    try:
        ca = cert_path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise RelayError(f"[server] cert: cannot read {cert_path}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    lines = [
        f"# OpenVPN client configuration for relay {cfg.server.id}",
        "client",
        f"dev {dev}",
        f"proto {'udp' if proto == 'udp' else 'tcp-client'}",
        f"remote {remote} {port}",
        "nobind",
        "persist-key",
        f"data-ciphers {':'.join(DATA_CIPHERS)}",
        "verb 3",
    ]
    if proto == "udp":
        # The exit notification is one datagram per attempt: a second attempt a
        # second later lets the session end at once even when one is lost (seen
        # once in three suite runs on a loaded machine), at a second's cost at exit.
        lines.append(f"explicit-exit-notify {EXIT_NOTIFY_ATTEMPTS}")
    if cfg.server.users:
        lines.append("auth-user-pass")
    else:  # anonymous relay: any name is accepted, the client just must send one
        lines += ["<auth-user-pass>", "anonymous", "anonymous", "</auth-user-pass>"]
    lines += ["<ca>", ca, "</ca>"]
    if cfg.openvpn.tls_crypt:
        lines += ["<tls-crypt>", tls_crypt_key(data_dir).strip(), "</tls-crypt>"]
    return "\n".join([*lines, ""])


def openconnect_command(cfg: Config, data_dir: Path, remote: str | None = None) -> str:
    """The ``openconnect`` command line (one line), pinned to the relay's certificate;
    ``remote`` as for :func:`openvpn_config` (default: the listen address, or this
    host's name when that is a wildcard)."""
    cert = Path(cfg.server.cert) if cfg.server.cert else data_dir / SELF_SIGNED_CERT
    if not cert.exists():
        raise RelayError(f"no certificate at {cert} yet: start relay serve once first")
    host, port = parse_hostport(cfg.server.listen)
    if remote is None:
        remote = host if host not in ("0.0.0.0", "::") else socket.gethostname()
    return (f"openconnect --protocol=anyconnect --servercert {pin_sha256(cert)} "
            f"https://{remote}:{port}/\n")
