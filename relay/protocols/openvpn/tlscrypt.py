"""tls-crypt (``tls_crypt.c`` tls_crypt_wrap / tls_crypt_unwrap): every control
packet encrypted and authenticated under a static key that the client config
carries, so a peer without it gets no answer at all; and the key file format."""

from __future__ import annotations

import hmac
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from relay.protocols.openvpn.keys import AES_256_KEY_SIZE, KEY2_SIZE, KEY_HALF
from relay.protocols.openvpn.wire import SID_SIZE

# A wrapped control packet: opcode/key id and session id in clear, the packet id and
# the time its sequence started (packet_id's long form, 4 + 4 bytes), an HMAC-SHA256
# tag over all of that and the plaintext, then the rest of the packet in AES-256-CTR
# with the tag's first 16 bytes as the IV.
TLS_CRYPT_CLEAR = 1 + SID_SIZE
TLS_CRYPT_PID = struct.Struct("!II")  # packet id, time
TLS_CRYPT_TAG_SIZE = 32
TLS_CRYPT_IV_SIZE = 16
TLS_CRYPT_HMAC_KEY_SIZE = 32
TLS_CRYPT_OVERHEAD = TLS_CRYPT_PID.size + TLS_CRYPT_TAG_SIZE
# The stateless reset reply is packet 1 of the relay's sequence; the session that
# its proof starts sends from the next.
TLS_CRYPT_RESET_REPLY_PID = 1
# The key file: OpenVPN's "Static key V1", the 256 bytes of a struct key2 in hex.
STATIC_KEY_BEGIN = "-----BEGIN OpenVPN Static key V1-----"
STATIC_KEY_END = "-----END OpenVPN Static key V1-----"
STATIC_KEY_HEX_PER_LINE = 32


def format_static_key(key2: bytes) -> str:
    """The key file text (what ``openvpn --genkey secret`` writes, without comments)."""
    hexed = key2.hex()
    lines = [hexed[i:i + STATIC_KEY_HEX_PER_LINE]
             for i in range(0, len(hexed), STATIC_KEY_HEX_PER_LINE)]
    return "\n".join([STATIC_KEY_BEGIN, *lines, STATIC_KEY_END]) + "\n"


def parse_static_key(text: str) -> bytes:
    """The 256 key bytes of a key file; ValueError when it is not one."""
    body = text.partition(STATIC_KEY_BEGIN)[2].partition(STATIC_KEY_END)
    if not body[1]:
        raise ValueError("not an OpenVPN static key (no BEGIN/END lines)")
    key2 = bytes.fromhex("".join(body[0].split()))
    if len(key2) != KEY2_SIZE:
        raise ValueError(f"an OpenVPN static key has {KEY2_SIZE} bytes, this one {len(key2)}")
    return key2


class TlsCrypt:
    """tls-crypt under one static key, in the server's direction (OpenVPN's
    KEY_DIRECTION_NORMAL: send with key2.keys[0], receive with keys[1]; each key
    is cipher[64] then hmac[64], of which AES-256 and HMAC-SHA256 use the start)."""

    def __init__(self, key2: bytes) -> None:
        if len(key2) != KEY2_SIZE:
            raise ValueError(f"a tls-crypt key has {KEY2_SIZE} bytes")
        send, receive = key2[:2 * KEY_HALF], key2[2 * KEY_HALF:]
        self._send = (send[:AES_256_KEY_SIZE], send[KEY_HALF:KEY_HALF + TLS_CRYPT_HMAC_KEY_SIZE])
        self._receive = (receive[:AES_256_KEY_SIZE],
                         receive[KEY_HALF:KEY_HALF + TLS_CRYPT_HMAC_KEY_SIZE])

    def wrap(self, pkt: bytes, pid: int, time: int) -> bytes:
        cipher_key, hmac_key = self._send
        clear = pkt[:TLS_CRYPT_CLEAR] + TLS_CRYPT_PID.pack(pid, time)
        plain = pkt[TLS_CRYPT_CLEAR:]
        tag = hmac.digest(hmac_key, clear + plain, "sha256")
        return clear + tag + _aes_ctr(cipher_key, tag[:TLS_CRYPT_IV_SIZE], plain)

    def unwrap(self, pkt: bytes) -> tuple[bytes, int] | None:
        """The packet as it would be without tls-crypt and its packet id; None when
        it is too short or does not authenticate."""
        if len(pkt) < TLS_CRYPT_CLEAR + TLS_CRYPT_OVERHEAD:
            return None
        cipher_key, hmac_key = self._receive
        tag_at = TLS_CRYPT_CLEAR + TLS_CRYPT_PID.size
        tag = pkt[tag_at:tag_at + TLS_CRYPT_TAG_SIZE]
        plain = _aes_ctr(cipher_key, tag[:TLS_CRYPT_IV_SIZE], pkt[tag_at + TLS_CRYPT_TAG_SIZE:])
        if not hmac.compare_digest(hmac.digest(hmac_key, pkt[:tag_at] + plain, "sha256"), tag):
            return None
        pid, _ = TLS_CRYPT_PID.unpack_from(pkt, TLS_CRYPT_CLEAR)
        return pkt[:TLS_CRYPT_CLEAR] + plain, pid


def _aes_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    ctx = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()  # CTR: the same both ways
    return ctx.update(data) + ctx.finalize()
