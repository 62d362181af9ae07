"""Key-method 2 (``ssl.c`` key_method_2_read/write): the messages, inside TLS, that
carry each side's randoms, its options string and the client's login and peer-info."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from relay.protocols.openvpn.wire import Malformed

KEY_METHOD_2 = 2
KEY_METHOD_MASK = 0x0F
# key_source2: the client's pre_master (48) + random1 (32) + random2 (32); the
# server sends only the randoms.
PRE_MASTER_SIZE = 48
RANDOM_SIZE = 32


@dataclass(frozen=True, slots=True)
class KeyMethod2:
    pre_master: bytes
    random1: bytes
    random2: bytes
    options: str
    username: str
    password: str
    peer_info: dict[str, str]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise IndexError
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def string(self) -> str:
        """u16 length (counting a trailing NUL), then the bytes; 0 = empty."""
        (n,) = struct.unpack("!H", self.take(2))
        return self.take(n).rstrip(b"\0").decode("utf-8", "replace") if n else ""


def parse_key_method_2(data: bytes) -> tuple[KeyMethod2, int] | None:
    """The client's message and its length, None if more bytes are needed."""
    r = _Reader(data)
    try:
        if r.take(4) != b"\0\0\0\0":
            raise Malformed("key-method 2 message does not start with 4 zero bytes")
        method = r.take(1)[0]
        if method & KEY_METHOD_MASK != KEY_METHOD_2:
            raise Malformed(f"key method {method & KEY_METHOD_MASK} (only 2 exists)")
        pre_master, random1, random2 = (r.take(PRE_MASTER_SIZE), r.take(RANDOM_SIZE),
                                        r.take(RANDOM_SIZE))
        options = r.string()
        username = r.string()
        password = r.string()
    except IndexError:
        return None
    peer_info: dict[str, str] = {}
    if r.pos < len(data):  # peer-info is the last field; old clients omit it
        try:
            text = r.string()
        except IndexError:
            return None
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                peer_info[key] = value
    return KeyMethod2(pre_master, random1, random2, options, username, password, peer_info), r.pos


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("!H", len(raw)) + raw


def server_key_method_2(random1: bytes, random2: bytes, options: str) -> bytes:
    """The server's message: no pre_master, empty user, password and peer-info."""
    return (b"\0\0\0\0" + bytes([KEY_METHOD_2]) + random1 + random2 + _string(options)
            + b"\0\0" * 3)


def option_value(options: str, name: str) -> str | None:
    """The value of ``name`` in an OCC options string ("V4,dev-type tun,...")."""
    for item in options.split(","):
        key, _, value = item.partition(" ")
        if key == name:
            return value
    return None
