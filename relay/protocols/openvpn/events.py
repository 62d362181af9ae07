"""What :class:`relay.protocols.openvpn.server.OpenVPNServer` returns: frozen,
slotted dataclasses, as :mod:`relay.protocols.cstp`'s events are."""

from __future__ import annotations

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
class Packet:
    # An IP packet (dev tun) or an Ethernet frame (dev tap), writable: the relay's
    # hot path stamps it in place.
    data: bytearray


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


Event = ClientAuth | PushRequest | Packet | PeerExit | PeerDead | ProtocolError | Closed
