"""Key derivation and the data channel's keys: OpenVPN's TLS-PRF (``ssl.c``
openvpn_PRF, ``crypto_openssl.c`` ssl_tls1_PRF), struct key2, the cipher and keys
of each key id, cipher negotiation (``ssl_ncp.c``) and the replay window
(``packet_id.c``), with how long a key may take to negotiate and how long it
outlives its successor."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

# --- Sizes (crypto.h, crypto.c) --------------------------------------------------------

# The implicit part of the AEAD nonce, taken from the "HMAC" half of each key
# (crypto.c: iv length 12 minus the 4-byte packet id).
IMPLICIT_IV_SIZE = 8
AES_256_KEY_SIZE = 32  # AES-256 and ChaCha20 alike
# The data ciphers the relay negotiates, in its order of preference (OpenVPN 2.6's
# default data-ciphers, less AES-128-GCM: AES-256-GCM first, as openvpn's server
# prefers it; CHACHA20-POLY1305 for clients without AES instructions). Both are
# AEAD with the same packet layout; the relay has no non-AEAD data channel.
DATA_CIPHERS = ("AES-256-GCM", "CHACHA20-POLY1305")
# What a client that announces IV_NCP=2 but no IV_CIPHERS (OpenVPN 2.4) can do
# (ssl_ncp.c tls_peer_ncp_list).
NCP2_CIPHERS = ("AES-256-GCM", "AES-128-GCM")
# struct key2 (crypto.h): two keys, each cipher[64] + hmac[64] (MAX_CIPHER_KEY_LENGTH,
# MAX_HMAC_KEY_LENGTH); the client sends with keys[0], the server with keys[1].
KEY_HALF = 64
KEY2_SIZE = 4 * KEY_HALF
MASTER_SECRET_SIZE = 48
PRF_LABEL_MASTER = b"OpenVPN master secret"
PRF_LABEL_EXPANSION = b"OpenVPN key expansion"

# --- Lifetimes (OpenVPN 2.6 defaults) --------------------------------------------------

# --hand-window 60: a key negotiation must finish within 60 s.
HAND_WINDOW_S = 60.0
# --transition-window 3600: the previous key still decrypts this long.
TRANSITION_WINDOW_S = 3600.0
# --replay-window 64: data packet ids up to 64 behind the highest are accepted once.
REPLAY_WINDOW = 64


# --- Key derivation (ssl.c openvpn_PRF, crypto_openssl.c ssl_tls1_PRF) ----------------


def _p_hash(digest: str, secret: bytes, seed: bytes, size: int) -> bytes:
    out = b""
    a = seed
    while len(out) < size:
        a = hmac.digest(secret, a, digest)
        out += hmac.digest(secret, a + seed, digest)
    return out[:size]


def tls1_prf(secret: bytes, seed: bytes, size: int) -> bytes:
    """The TLS 1.0/1.1 PRF (RFC 2246 section 5): P_MD5 over the first half of
    the secret XOR P_SHA1 over the second (halves overlap by a byte when odd)."""
    half = (len(secret) + 1) // 2
    md5 = _p_hash("md5", secret[:half], seed, size)
    sha1 = _p_hash("sha1", secret[len(secret) - half:], seed, size)
    return bytes(x ^ y for x, y in zip(md5, sha1, strict=True))


def derive_key2(pre_master: bytes, client_random1: bytes, server_random1: bytes,
                client_random2: bytes, server_random2: bytes,
                client_sid: bytes, server_sid: bytes) -> bytes:
    """The 256 bytes of OpenVPN's struct key2 (generate_key_expansion_openvpn_prf)."""
    master = tls1_prf(pre_master, PRF_LABEL_MASTER + client_random1 + server_random1,
                      MASTER_SECRET_SIZE)
    return tls1_prf(master, PRF_LABEL_EXPANSION + client_random2 + server_random2
                    + client_sid + server_sid, KEY2_SIZE)


# --- Cipher negotiation (ssl_ncp.c) ------------------------------------------------------


def negotiate_cipher(peer_info: dict[str, str]) -> str | None:
    """The data cipher for a client (ncp_get_best_cipher): the first of the relay's
    :data:`DATA_CIPHERS` that the client's IV_CIPHERS lists, or None."""
    listed = peer_info.get("IV_CIPHERS")
    if listed is not None:
        offered = {c.upper() for c in listed.split(":")}
    else:
        try:
            ncp = int(peer_info.get("IV_NCP", "0"))
        except ValueError:
            ncp = 0
        offered = set(NCP2_CIPHERS) if ncp >= 2 else set()
    return next((c for c in DATA_CIPHERS if c in offered), None)


# --- The data channel's keys (crypto.c openvpn_encrypt_aead) -----------------------------


@dataclass(frozen=True, slots=True)
class DataKeys:
    """One key id's cipher and keys in the server's direction: it sends with
    key2.keys[1] and receives with keys[0], each cipher[64] then hmac[64] (the
    AEAD key is the cipher half's start, the implicit IV the hmac half's)."""

    cipher: str  # one of DATA_CIPHERS
    encrypt_key: bytes
    encrypt_iv: bytes
    decrypt_key: bytes
    decrypt_iv: bytes

    @classmethod
    def from_key2(cls, cipher: str, key2: bytes) -> DataKeys:
        client, server = key2[:2 * KEY_HALF], key2[2 * KEY_HALF:]
        return cls(cipher, server[:AES_256_KEY_SIZE],
                   server[KEY_HALF:KEY_HALF + IMPLICIT_IV_SIZE], client[:AES_256_KEY_SIZE],
                   client[KEY_HALF:KEY_HALF + IMPLICIT_IV_SIZE])


# --- The replay window (packet_id.c) ----------------------------------------------------


class ReplayWindow:
    """Sliding-window replay protection (packet_id.c, --replay-window 64):
    each packet id once, none older than the window behind the highest seen."""

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self.highest = 0
        self.seen = 0  # bit i: packet id (highest - i) was accepted

    def check(self, pid: int) -> bool:
        if pid == 0:
            return False
        if pid > self.highest:
            return True
        back = self.highest - pid
        return back < self.size and not (self.seen >> back) & 1

    def commit(self, pid: int) -> None:
        """Record an id that :meth:`check` passed and that authenticated."""
        if pid > self.highest:
            self.seen = ((self.seen << (pid - self.highest)) | 1) & ((1 << self.size) - 1)
            self.highest = pid
        else:
            self.seen |= 1 << (self.highest - pid)
