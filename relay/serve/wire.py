"""The messages between the control plane of ``relay serve`` and its datapath
workers, sans-IO: frames in, messages out, and the reverse.

The control plane (relay.serve.core) decides what only one place may: admission
and the abuse state, addresses and MACs, the connection log, the capture's and
the steering's maps, bans, the control socket and the metrics. A worker
(relay.serve.worker) runs the listeners, TLS, the protocol machines and the hot
path of the sessions it accepted, and asks the control plane for the rest.

**Transport.** One Unix stream socket per worker (a socketpair the control plane
makes; the worker inherits its end). A frame is a 4-byte big-endian length, then
that many bytes of msgpack (raw strings as UTF-8, bytes as bin): a map whose
``t`` names the message. A *request* carries ``id``, an integer unique among the
sender's requests awaiting an answer, and is answered by ``{"t": "reply", "id":
<the same>, ...}`` with the fields :data:`MESSAGES` lists, or ``{"t": "reply",
"id": ..., "error": TEXT}`` when the handler failed. Messages from one side are
handled in the order they were sent.

**Version.** :data:`VERSION` travels in ``hello``; a worker refuses a control
plane of another version (they are the same installation, but a worker started
from an upgraded tree must not guess).

**Shapes used below.** ``peer``: ``[ip, port]`` as the socket gives it (an IPv4
client of a dual-stack listener is ``::ffff:a.b.c.d``). ``counters``: a session's
``packets``, ``bytes``, ``destinations``, ``destinations_dropped`` as the
disconnect record carries them (relay.serve.sessions.Session.counters, less
``floats``, which the control plane keeps). ``config``: the running
:class:`relay.config.Config` as a map of sections (``dataclasses.asdict``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

VERSION = 1
# The largest frame: a config with a users file of some 100,000 lines, or a
# batch of CHECKPOINT_BATCH sessions whose destination lists are full
# (relay.serve.sessions.DESTINATIONS_MAX_BYTES, ~40 KiB each): both well under.
MAX_FRAME_BYTES = 64 << 20
# Sessions per checkpoint or sessions-page message, so that a frame stays under
# MAX_FRAME_BYTES whatever the sessions carry.
CHECKPOINT_BATCH = 256
HEADER = struct.Struct("!I")

CONTROL, WORKER = "control", "worker"


@dataclass(frozen=True)
class Message:
    sender: str  # CONTROL or WORKER
    request: bool  # answered by a reply
    fields: tuple[str, ...]  # every one present (a value may be nil)
    reply: tuple[str, ...]  # a request's reply's fields
    doc: str


MESSAGES: dict[str, Message] = {
    # -- control plane -> worker ------------------------------------------------------
    "hello": Message(CONTROL, False, (
        "version", "worker", "workers", "config", "users", "tap", "fds", "openvpn_cookie_key"),
        (), "The first message: the worker's index and the number of workers, the config "
            "and its users (a map of name to password, nil when anonymous), the TAP "
            "device (name, mac), the descriptors it inherited (tap: its queue; cstp, "
            "openvpn_tcp: listening TCP sockets; openvpn_udp, dtls: UDP sockets or nil) "
            "and the OpenVPN UDP cookie key shared by every worker. Answered by ready."),
    "config": Message(CONTROL, False, ("config", "users"), (),
                      "A reload: the new config (keys that need a restart keep their "
                      "running values) and users."),
    "ban": Message(CONTROL, False, ("network", "reason"), (),
                   "A ban came into force: end every connection whose peer is in network "
                   "(a CIDR), with the reason for its client."),
    "disconnect": Message(CONTROL, True, ("session_id", "reason", "message"), ("ended",),
                          "End a session: reason goes into its disconnect record, message "
                          "to its client. ended: whether the worker had it."),
    "stop": Message(CONTROL, False, (), (),
                    "The relay stops: end every connection (relay-shutdown), send what "
                    "that produced, and exit."),
    "stats": Message(CONTROL, True, (), ("metrics", "cpu_s", "rss_bytes"),
                     "The worker's metrics: a list of [name, kind, help, [[labels, value], "
                     "...]] (relay.metrics.Metric), its CPU seconds and resident memory."),
    "sessions": Message(CONTROL, True, ("after",), ("sessions", "more"),
                        "The open sessions whose IDs sort after after (nil: from the "
                        "first), at most CHECKPOINT_BATCH of them in ID order: a list of "
                        "[session_id, client hostname or nil, counters]; more when there "
                        "are others after them."),
    # -- worker -> control plane ------------------------------------------------------
    "ready": Message(WORKER, False, ("pid",), (),
                     "The worker serves (its process id), after hello."),
    "admit": Message(WORKER, True, ("ip", "new_session", "steer"), ("refused",),
                     "The abuse defences' admission of a new connection (new_session) or "
                     "of a session's second channel's handshake; steer: nil, or [service, "
                     "peer] whose datagrams must reach this worker once admitted (until "
                     "release). refused: nil, or the reason."),
    "handshake-done": Message(WORKER, False, ("ip",), (),
                              "An admitted connection has its session."),
    "handshake-over": Message(WORKER, False, ("ip", "strike"), (),
                              "A second channel's handshake ended; strike when it failed."),
    "link-ended": Message(WORKER, False, ("ip", "lifetime_s", "had_session"), (),
                          "An admitted connection ended."),
    "release": Message(WORKER, False, ("service", "peer"), (),
                       "A steer given with admit is no longer needed."),
    "open": Message(WORKER, True, (
        "protocol", "peer", "local_ip", "hostname", "software", "mac", "data_channel"),
        ("refused", "session", "lease"),
        "Open a session: its address, MAC, connect record. mac: a bridged client's own, "
        "or nil. refused: the client's message, or nil; then session is {id, mac, "
        "virtual_ip, client_ip, client_port} and lease {netmask, gateway, mtu, dns}."),
    "close": Message(WORKER, False, ("session_id", "reason", "error", "hostname", "counters"),
                     (), "A session ended: its disconnect record."),
    "moved": Message(WORKER, True, ("session_id", "peer", "old"), (),
                     "A session's client sends from peer now, not old (an OpenVPN UDP "
                     "float): its datagrams must follow it to this worker. Answered once "
                     "the capture names peer (the worker holds the client's packets "
                     "until then)."),
    "checkpoint": Message(WORKER, False, ("sessions",), (),
                          "Counters of sessions that changed since the last checkpoint, "
                          "[[session_id, counters], ...], at most CHECKPOINT_BATCH."),
    "cookie-put": Message(WORKER, False, ("cookie", "client"), (),
                          "A CSTP login succeeded: its cookie and what the client said "
                          "(relay.protocols.cstp.ClientInfo's fields)."),
    "cookie-take": Message(WORKER, True, ("cookie",), ("client",),
                           "Redeem a login cookie (once, within its lifetime), from any "
                           "worker's login: the client's fields, or nil."),
}
REPLY = "reply"


class WireError(Exception):
    """A frame or message that breaks this protocol: the connection is ended."""


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise WireError(f"a {message.get('t')} message of {len(body)} bytes is over "
                        f"{MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)) + body


def check(message: Any, sender: str) -> dict[str, Any]:
    """``message`` if it is one ``sender`` may send with every field it needs."""
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise WireError("a frame that is not a message")
    t = message["t"]
    if t == REPLY:
        if not isinstance(message.get("id"), int):
            raise WireError("a reply without an id")
        return message
    spec = MESSAGES.get(t)
    if spec is None or spec.sender != sender:
        raise WireError(f"{t!r} is no message of the {sender}")
    missing = [f for f in spec.fields if f not in message]
    if spec.request and not isinstance(message.get("id"), int):
        missing.append("id")
    if missing:
        raise WireError(f"{t} without {', '.join(missing)}")
    return message


class Decoder:
    """Bytes of the stream in, the messages they complete out."""

    def __init__(self, sender: str) -> None:
        self.sender = sender  # whose messages this decodes
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > MAX_FRAME_BYTES:
                raise WireError(f"a frame of {size} bytes is over {MAX_FRAME_BYTES}")
            end = HEADER.size + size
            if len(self._buf) < end:
                break
            try:
                message = msgpack.unpackb(bytes(self._buf[HEADER.size:end]), raw=False,
                                          strict_map_key=False)
            except (ValueError, msgpack.ExtraData, msgpack.FormatError,
                    msgpack.StackError) as exc:
                raise WireError(f"a frame that is not msgpack: {exc}") from None
            del self._buf[:end]
            out.append(check(message, self.sender))
        return out
