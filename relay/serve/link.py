"""The seam between a worker of ``relay serve`` and its protocol links.

A worker (:mod:`relay.serve.worker`) runs the listeners and calls every client
connection through :class:`Link`; a link calls the worker only through
:class:`LinkHost`, which the worker implements (asking the control plane,
:mod:`relay.serve.core`, for what only it decides), and hands its client's packets
to the datapath (:mod:`relay.serve.datapath`). The links import this module and
the datapath, never the worker: the import graph runs one way, worker -> links ->
seam.

:class:`LinkBase` is the lifecycle every protocol link has in common: counted in
and out with the worker (abuse accounting at the end), the reverse lookup of the
client's address, the login deadline, the common half of opening a session,
ending it, and one timer driven by the sans-IO machine's ``next_timeout()`` /
``handle_timeout(now)``. :class:`StreamLink` adds what a link over a TCP stream
(CSTP, OpenVPN over TCP) has in common: the write high-water mark, pausing, and
the end of the connection.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import socket
import ssl
import time
from array import array
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from relay.serve import rdns
from relay.serve.sessions import Session, SessionRefused

log = logging.getLogger("relay")

# Bytes queued towards a slow client before further packets to it are dropped,
# as a router's queue would: 1 MiB is ~700 full-size packets, several hundred ms
# at typical client rates, more than TCP's congestion control needs.
CLIENT_WRITE_HIGH_WATER = 1024 * 1024

E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """The ``[server]`` timeouts links read; a reload replaces them at once."""

    login_timeout_s: int  # from TCP accept (or UDP proof) to an open session
    handshake_timeout_s: int  # the TLS handshake of a CSTP connection
    dpd_s: int  # the DPD interval announced to CSTP clients
    keepalive_s: int  # the keepalive interval announced to CSTP clients


@dataclass(frozen=True, slots=True)
class Lease:
    """An open session and what its client is told to configure."""

    session: Session
    address: str  # the session's virtual IP
    netmask: str
    gateway: str  # the relay's address in the pool
    mtu: int
    dns: tuple[str, ...]


class Link(Protocol):
    """What the worker and the datapath need of a client connection, whatever its
    protocol."""

    peer_ip: str
    peer_port: int
    local_ip: str
    session: Session | None

    def client_hostname(self) -> str | None:
        """The reverse lookup of the client's address, if it has answered."""

    def from_kernel_batch(self, buf: bytearray, spans: array[int]) -> None:
        """Frames the kernel sent to this link's session MAC, ``buf[spans[2i] :
        spans[2i] + spans[2i+1]]``; ``buf`` is the datapath's, reused once this
        returns."""

    def terminate(self, reason: str, message: str) -> None:
        """End from the relay's side (shutdown, ban): tell the client, then close."""


class LinkHost(Protocol):
    """What a worker offers its links (relay.serve.worker): admission, logins,
    sessions and their leases, tasks, and the counters a link bumps. What only
    the control plane may decide (admission, sessions, login cookies) it asks the
    control plane for (relay.serve.wire). Nothing else of the relay is theirs."""

    @property
    def settings(self) -> LinkSettings: ...

    async def admit(self, ip: str) -> str | None:
        """The abuse defences' admission of a new peer (UDP: once it proved its
        address; TCP peers are admitted by the worker's accept loop): None to let
        it in, else the reason it is refused."""

    def link_began(self, link: Link) -> asyncio.Future[Any] | None:
        """Count ``link`` in (shutdown and bans reach it) and start the reverse
        lookup of its address; the lookup (None when too many are pending)."""

    def link_ended(self, link: Link, lifetime_s: float, had_session: bool) -> None:
        """Count ``link`` out, and into the abuse defences' accounting."""

    def spawn(self, coro: Awaitable[None], link: Link | None = None) -> None:
        """Run a task; one that fails is logged and ends ``link``."""

    def check_login(self, link: Link, username: str, password: str) -> bool: ...

    async def open_session(self, link: Link, protocol: str, software: dict[str, Any],
                           mac: bytes | None = None, data_channel: str | None = None) -> Lease:
        """A session for ``link``: :class:`SessionRefused` (with the reason for the
        client) when the relay refuses it (full, no address, no disk to log it).
        ``data_channel`` goes into the connect record (CSTP: "DTLS" or "TLS")."""

    def handshake_done(self, link: Link) -> None:
        """``link`` has its session: it no longer counts as a handshake."""

    async def admit_handshake(self, peer: tuple[str, int]) -> str | None:
        """The abuse defences' admission of a handshake for a session that exists
        (its DTLS channel, once the peer answered a cookie): bans, rates and
        handshakes in progress, as for a new connection, but no new session. None
        to let it in (end it with :meth:`handshake_over`), and from then on the
        peer's datagrams to the DTLS port reach this worker until
        :meth:`release_peer`; else the reason."""

    def handshake_over(self, ip: str, strike: bool) -> None:
        """A handshake :meth:`admit_handshake` let in has ended; ``strike`` when it
        was abandoned or failed (a strike against the source, as a half-finished
        TLS handshake is)."""

    def release_peer(self, peer: tuple[str, int]) -> None:
        """The DTLS channel :meth:`admit_handshake` admitted from ``peer`` is gone."""

    def look_up(self, link: Link) -> asyncio.Future[Any] | None:
        """Start the reverse lookup of ``link``'s address (None when too many are
        pending)."""

    async def client_moved(self, link: Link, old: tuple[str, int]) -> None:
        """``link``'s client now sends from ``link.peer_ip``, ``link.peer_port``
        instead of ``old`` (an OpenVPN float): the session's address, the capture's
        attribution, the abuse accounting and the steering of its datagrams follow,
        and an audit record says so. Returns once the control plane has done so:
        the capture names the new address for every packet written after that."""

    def close_session(self, link: Link, s: Session, reason: str, error: str | None) -> None: ...

    def keep_login(self, cookie: str, client: dict[str, Any]) -> None:
        """A CSTP login succeeded: its cookie, and what the client said about
        itself, for the tunnel request that redeems it (on any worker)."""

    async def redeem_login(self, cookie: str) -> dict[str, Any] | None:
        """What :meth:`keep_login` kept for ``cookie``, once and within the
        cookie's lifetime; else None."""

    def count_handshake_failure(self, reason: str) -> None: ...

    def count_peer_closed(self, cap: str) -> None: ...


class TimedMachine(Protocol[E]):
    """The time half of a sans-IO protocol machine."""

    def next_timeout(self) -> float | None: ...

    def handle_timeout(self, now: float) -> list[E]: ...


class LinkBase(abc.ABC, Generic[E]):
    """One client, from its first packet to its end, whatever its protocol."""

    # What the client waits for, in log lines and records: "tunnel" or "session".
    opens = "session"
    proto: TimedMachine[E]

    def __init__(self, host: LinkHost, peer: tuple[str, int], local_ip: str) -> None:
        self.host = host
        self.loop = asyncio.get_running_loop()
        self.peer_ip, self.peer_port = peer[0], peer[1]
        self.local_ip = local_ip
        self.session: Session | None = None
        self.accepted = time.monotonic()
        self.had_session = False
        self.paused = False
        self.closed = False
        self._lookup: asyncio.Future[Any] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def begin(self) -> None:
        """The link exists: counted in, its address looked up, its login timed."""
        self._lookup = self.host.link_began(self)
        self._deadline = self.loop.call_later(self.host.settings.login_timeout_s,
                                              self._login_deadline)

    def client_hostname(self) -> str | None:
        return rdns.name(self._lookup)

    def _login_deadline(self) -> None:
        if self.session is None and not self.closed:
            log.warning("refused %s: no %s within %d s of connecting", self, self.opens,
                        self.host.settings.login_timeout_s)
            self._close()

    # -- the protocol's side ----------------------------------------------------------

    @abc.abstractmethod
    def _handle(self, events: list[E]) -> None:
        """Act on the machine's events, then send what it queued."""

    @abc.abstractmethod
    def _refusal(self, message: str) -> list[E]:
        """Tell the client its session is refused (the machine closes)."""

    def _gone(self) -> bool:
        """The client is gone or its machine closed: no session is wanted any more."""
        return self.closed

    # -- opening ----------------------------------------------------------------------

    async def _open(self, protocol: str, software: dict[str, Any],
                    data_channel: str | None = None) -> Lease | None:
        """Open the session: its lease, or None when it was refused (the client
        was told) or the client went away meanwhile (the session is closed again)."""
        try:
            lease = await self.host.open_session(self, protocol, software,
                                                 data_channel=data_channel)
        except SessionRefused as exc:
            self._refuse(str(exc))
            return None
        if self._gone():
            self.host.close_session(self, lease.session, "connection-closed",
                                    f"closed during {self.opens} set-up")
            return None
        self.session = lease.session
        self.had_session = True
        self.host.handshake_done(self)
        if self._deadline is not None:
            self._deadline.cancel()
        return lease

    def _refuse(self, message: str) -> None:
        log.error("refused a session from %s: %s", self, message)
        self._handle(self._refusal(message))

    # -- time -------------------------------------------------------------------------

    def _arm(self) -> None:
        """Make sure the timer fires by the machine's next deadline. Called after
        whatever may bring that deadline earlier, and after the timer fired; a
        later deadline (more traffic) just lets the timer fire early and re-arm."""
        when = self.proto.next_timeout()
        if when is None or self.closed or when >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if not self.closed:
            self._handle(self.proto.handle_timeout(self.loop.time()))
            self._arm()

    # -- ending -----------------------------------------------------------------------

    def _peer_dead(self, reason: str) -> None:
        """The machine found the client silent too long."""
        log.warning("%s: %s", self, reason)
        self._end("dead-peer", reason)
        self._close()

    def _end(self, reason: str, error: str | None, detail: str | None = None) -> None:
        """Close the session, if there is one (the connection may stay a moment)."""
        s, self.session = self.session, None
        if s is not None:
            full_reason = f"{reason}: {detail}" if detail else reason
            self.host.close_session(self, s, full_reason, error)

    def _close(self) -> None:
        """Close the connection."""
        self._forget()

    def _forget(self) -> None:
        """The connection is over: nothing more is sent or timed."""
        if self.closed:
            return
        self.closed = True
        for timer in (self._timer, self._deadline):
            if timer is not None:
                timer.cancel()
        self.host.link_ended(self, time.monotonic() - self.accepted, self.had_session)


class StreamLink(LinkBase[E], asyncio.Protocol):
    """A link over a TCP stream (TLS or not), as an asyncio protocol."""

    def __init__(self, host: LinkHost, peer: tuple[str, int], local_ip: str) -> None:
        super().__init__(host, peer, local_ip)
        self.transport: asyncio.Transport | None = None

    async def start(self, sock: socket.socket, tls: ssl.SSLContext | None = None) -> None:
        """Begin on an accepted socket: the TLS handshake (with ``tls``), then this
        protocol takes over; a failure is the subclass's to tell (:meth:`_start_failed`)."""
        self.begin()
        timeout = self.host.settings.handshake_timeout_s if tls is not None else None
        started = self.loop.time()
        try:
            await self.loop.connect_accepted_socket(lambda: self, sock, ssl=tls,
                                                    ssl_handshake_timeout=timeout)
        except OSError as exc:  # ssl.SSLError, ConnectionError and TimeoutError are too
            self._start_failed(exc, self.loop.time() - started)
            sock.close()
            self._forget()

    @abc.abstractmethod
    def _start_failed(self, exc: OSError, elapsed_s: float) -> None:
        """Count and log a connection that failed ``elapsed_s`` (by the loop's
        clock) into its start."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.closed:  # the login deadline passed meanwhile (a slow TLS handshake)
            transport.close()
            return
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=CLIENT_WRITE_HIGH_WATER)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._end("connection-closed", None)
        else:
            self._end("connection-lost", str(exc) or type(exc).__name__)
        self._forget()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._forget()
