"""The OpenVPN data channel in C (cext/ovpn.c, OpenSSL's EVP): the twin of
:class:`relay.protocols.openvpn.datachannel.PyDataChannel`, with its interface,
its rules and its results, in one call per batch. The OpenVPN link gives each
session's :class:`~relay.protocols.openvpn.server.OpenVPNServer` one of these;
the keys, their packet ids and replay windows live in C memory that the key
objects own.

Also :func:`udp_runs`, how the UDP endpoint splits one ``recvmmsg`` into the
runs it hands to sessions (twin: :func:`relay.protocols.openvpn.datachannel.udp_runs`).
"""

from __future__ import annotations

from array import array
from typing import Any

from relay.cext import ffi, lib
from relay.errors import RelayError
from relay.protocols.openvpn import datachannel as py
from relay.protocols.openvpn.datachannel import (
    KEY_IDS,
    NSTATUS,
    STREAM_BATCH,
    TAG_SIZE,
    V2_OVERHEAD,
    Opened,
    Sealed,
)
from relay.protocols.openvpn.keys import DATA_CIPHERS, IMPLICIT_IV_SIZE, REPLAY_WINDOW, DataKeys
from relay.protocols.openvpn.wire import OCC_MAGIC, PING_MAGIC, TCP_LENGTH

_CIPHERS = {"AES-256-GCM": lib.RELAY_OVPN_AES_256_GCM,
            "CHACHA20-POLY1305": lib.RELAY_OVPN_CHACHA20_POLY1305}


def _check() -> None:
    """The C build and the protocol's definitions must agree, or packets would
    be classified differently than the twin says."""
    mine = (set(_CIPHERS), IMPLICIT_IV_SIZE, TAG_SIZE, KEY_IDS, REPLAY_WINDOW, V2_OVERHEAD,
            TCP_LENGTH.size, NSTATUS, PING_MAGIC, OCC_MAGIC,
            (py.DATA, py.PING, py.OCC, py.NO_KEY, py.SHORT, py.REPLAY, py.BAD_TAG,
             py.MALFORMED))
    theirs = (set(DATA_CIPHERS), lib.RELAY_OVPN_IMPLICIT_IV_LEN, lib.RELAY_OVPN_TAG_LEN,
              lib.RELAY_OVPN_KEY_IDS, lib.RELAY_OVPN_REPLAY_WINDOW, lib.RELAY_OVPN_V2_OVERHEAD,
              lib.RELAY_OVPN_TCP_LEN, lib.RELAY_OVPN_NSTATUS,
              bytes(ffi.buffer(lib.relay_ovpn_ping_magic)),
              bytes(ffi.buffer(lib.relay_ovpn_occ_magic)),
              (lib.RELAY_OVPN_DATA, lib.RELAY_OVPN_PING, lib.RELAY_OVPN_OCC,
               lib.RELAY_OVPN_NO_KEY, lib.RELAY_OVPN_SHORT, lib.RELAY_OVPN_REPLAY,
               lib.RELAY_OVPN_BAD_TAG, lib.RELAY_OVPN_MALFORMED))
    if mine != theirs:
        raise RelayError("cext/ovpn.h and relay/protocols/openvpn/datachannel.py disagree "
                         "(ciphers, sizes, statuses or magics); rebuild with pip install .")


_check()

_from_buffer = ffi.from_buffer
_U8 = ffi.typeof("uint8_t[]")
_U32 = ffi.typeof("uint32_t[]")
_open = lib.relay_ovpn_open
_open_stream = lib.relay_ovpn_open_stream
_seal = lib.relay_ovpn_seal


class _Scratch:
    """What a call reports per packet, in buffers reused across calls (the event
    loop is one thread; each result is copied out before the next call)."""

    def __init__(self) -> None:
        self.fit(STREAM_BATCH)
        self.opened = ffi.new("struct relay_ovpn_opened *")
        self.sealed = bytearray(0)
        self.c_sealed = _from_buffer(_U8, self.sealed, True)
        self.payload_bytes = ffi.new("uint64_t *")

    def fit(self, n: int) -> None:
        """Room for n packets' statuses and spans."""
        self.size = n
        self.status = bytearray(n)
        self.plain = array("I", bytes(8 * n))
        self.data = array("I", bytes(8 * n))
        self.out_spans = array("I", bytes(8 * n))
        self.c_status = _from_buffer(_U8, self.status, True)
        self.c_plain = _from_buffer(_U32, self.plain, True)
        self.c_data = _from_buffer(_U32, self.data, True)
        self.c_out_spans = _from_buffer(_U32, self.out_spans, True)

    def fit_sealed(self, size: int) -> None:
        if len(self.sealed) < size:
            self.sealed = bytearray(size)
            self.c_sealed = _from_buffer(_U8, self.sealed, True)


_scratch = _Scratch()


class CDataChannel:
    """One session's data keys, by key id, in C."""

    def __init__(self) -> None:
        self._keys = ffi.new("struct relay_ovpn_key *[]", KEY_IDS)
        self._owners: list[Any] = [None] * KEY_IDS  # keep each key's memory alive

    def install(self, key_id: int, keys: DataKeys) -> None:
        k = lib.relay_ovpn_key_new(_CIPHERS[keys.cipher], keys.encrypt_key, keys.encrypt_iv,
                                   keys.decrypt_key, keys.decrypt_iv)
        if k == ffi.NULL:
            raise RelayError(f"OpenSSL refused the {keys.cipher} data channel key")
        owned = ffi.gc(k, lib.relay_ovpn_key_free)
        self._keys[key_id] = owned
        self._owners[key_id] = owned

    def remove(self, key_id: int) -> None:
        self._keys[key_id] = ffi.NULL
        self._owners[key_id] = None

    def key_state(self, key_id: int) -> tuple[int, int, int]:
        out = ffi.new("uint32_t[2]")
        seen = ffi.new("uint64_t *")
        lib.relay_ovpn_key_state(self._owners[key_id], out, out + 1, seen)
        return out[0], out[1], seen[0]

    def _result(self, plain: bytearray, s: _Scratch) -> Opened:
        r = s.opened
        n = r.n
        return Opened(plain, s.data[:2 * r.n_data], list(r.counts), bytes(s.status[:n]),
                      s.plain[:2 * n], r.end)

    def open(self, buf: bytearray, spans: array[int], max_packet: int) -> Opened:
        n = len(spans) // 2
        s = _scratch
        if n > s.size:
            s.fit(n)
        if _open(self._keys, _from_buffer(_U8, buf, True), len(buf), _from_buffer(_U32, spans),
                 n, max_packet, s.c_status, s.c_plain, s.c_data, s.opened) < 0:
            raise RelayError("OpenSSL failed in the OpenVPN data channel")
        return self._result(buf, s)

    def open_stream(self, buf: bytes | bytearray, start: int, max_packet: int) -> Opened:
        plain = bytearray(len(buf))
        s = _scratch
        if _open_stream(self._keys, _from_buffer(_U8, buf), len(buf), start, max_packet,
                        STREAM_BATCH, _from_buffer(_U8, plain, True), s.c_status, s.c_plain,
                        s.c_data, s.opened) < 0:
            raise RelayError("OpenSSL failed in the OpenVPN data channel")
        return self._result(plain, s)

    def seal(self, key_id: int, peer_id: int, buf: bytes | bytearray, spans: array[int],
             tcp: bool) -> Sealed:
        n = len(spans) // 2
        s = _scratch
        if n > s.size:
            s.fit(n)
        s.fit_sealed(len(buf) + n * (V2_OVERHEAD + TCP_LENGTH.size))
        count = _seal(self._owners[key_id], key_id, peer_id, tcp, _from_buffer(_U8, buf),
                      len(buf), _from_buffer(_U32, spans), n, s.c_sealed, len(s.sealed),
                      s.c_out_spans, s.payload_bytes)
        if count < 0:
            raise RelayError("OpenSSL failed in the OpenVPN data channel")
        out_spans = s.out_spans[:2 * count]
        size = out_spans[-2] + out_spans[-1] if count else 0
        return Sealed(memoryview(s.sealed)[:size], out_spans, count, size,
                      s.payload_bytes[0])


def udp_runs(buf: bytes | bytearray, spans: array[int], addrs: bytes, addr_size: int,
             max_packet: int) -> array[int]:
    n = len(spans) // 2
    runs = array("I", bytes(12 * n))
    count = lib.relay_ovpn_udp_runs(_from_buffer(_U8, buf), len(buf), _from_buffer(_U32, spans),
                                    n, addrs, addr_size, max_packet,
                                    _from_buffer(_U32, runs, True))
    del runs[3 * count:]
    return runs
