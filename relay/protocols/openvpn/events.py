"""What :class:`relay.protocols.openvpn.server.OpenVPNServer` returns: frozen,
slotted dataclasses, as :mod:`relay.protocols.cstp`'s events are."""

from __future__ import annotations

from array import array
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """The client's key-method 2 message of the first key: check the login, then
    call :meth:`OpenVPNServer.auth_failed` to refuse it."""

    username: str
    password: str
    peer_info: dict[str, str]
    dev_type: str  # "tun" or "tap", from the client's options string


@dataclass(frozen=True, slots=True)
class PushRequest:
    """The client asks for its configuration: answer with :meth:`OpenVPNServer.push_reply`."""


@dataclass(frozen=True, slots=True)
class Packets:
    """What the client sent for the tunnel in the data packets that arrived
    together: IP packets (dev tun) or Ethernet frames (dev tap), packet i being
    ``data[spans[2i] : spans[2i] + spans[2i+1]]``. ``data`` is the relay's own,
    writable: its hot path stamps it in place."""

    data: bytearray
    spans: array[int]

    def payloads(self) -> list[bytes]:
        return [bytes(self.data[self.spans[i]:self.spans[i] + self.spans[i + 1]])
                for i in range(0, len(self.spans), 2)]


@dataclass(frozen=True, slots=True)
class Floated:
    """An authenticated data packet came from another address than the
    session's (OpenVPN's float, a NAT rebinding): the session moves there."""


@dataclass(frozen=True, slots=True)
class PeerExit:
    reason: str


@dataclass(frozen=True, slots=True)
class PeerDead:
    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolError:
    message: str
    # The metric label the relay counts it under (relay_handshake_failures_total):
    # "protocol-error", or the cap the peer exceeded.
    reason: str = "protocol-error"


@dataclass(frozen=True, slots=True)
class Closed:
    """What had to reach the client (AUTH_FAILED) did, or its time ran out."""


Event = (ClientAuth | PushRequest | Packets | Floated | PeerExit | PeerDead | ProtocolError
         | Closed)
