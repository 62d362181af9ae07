"""The asyncio side of relay.serve.wire: one end of a worker's control socket.

:class:`Peer` sends messages, awaits the replies to its requests, and hands each
message it receives to the handler of its type, in order: a handler returns the
reply's fields (a request's), None, or an awaitable of either, which runs as a
task (its reply goes when it ends; the next message does not wait for it).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import socket
from collections.abc import Callable
from typing import Any, cast

from relay.errors import RelayError
from relay.serve import wire

log = logging.getLogger("relay")

Handler = Callable[[dict[str, Any]], Any]


class PeerLost(RelayError):
    """The other end is gone: no answer will come."""


class RemoteError(RelayError):
    """The other end's handler failed; the message is its one line."""


class Peer(asyncio.Protocol):
    def __init__(self, me: str, handlers: dict[str, Handler],
                 on_lost: Callable[[Exception | None], None]) -> None:
        self.me = me
        self.handlers = handlers
        self.on_lost = on_lost
        self.decoder = wire.Decoder(wire.WORKER if me == wire.CONTROL else wire.CONTROL)
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def connect(self, sock: socket.socket) -> None:
        """Talk over a connected Unix stream socket (which the peer then owns);
        messages may be handled before this returns."""
        await asyncio.get_running_loop().create_unix_connection(lambda: self, sock=sock)

    @property
    def alive(self) -> bool:
        return self.transport is not None and not self.lost.done()

    # -- out --------------------------------------------------------------------------

    def send(self, t: str, **fields: Any) -> None:
        """A message that needs no answer; dropped when the peer is gone."""
        if self.alive:
            assert self.transport is not None
            self.transport.write(wire.encode({"t": t, **fields}))

    async def request(self, t: str, timeout: float | None = None,
                      **fields: Any) -> dict[str, Any]:
        """Send a request and await its reply's fields: :class:`PeerLost` when the
        peer goes first, :class:`RemoteError` when its handler failed,
        TimeoutError after ``timeout``."""
        if not self.alive:
            raise PeerLost("the other end of the control socket is gone")
        rid = next(self._ids)
        future = self._waiting[rid] = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(wire.encode({"t": t, "id": rid, **fields}))
        try:
            reply = await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(rid, None)
        if "error" in reply:
            raise RemoteError(str(reply["error"]))
        return reply

    def close(self) -> None:
        """Close once what was sent has gone (``lost`` is done then)."""
        if self.transport is not None:
            self.transport.close()

    # -- in ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except wire.WireError as exc:
            log.error("control socket: %s; closing it", exc)
            assert self.transport is not None
            self.transport.abort()
            return
        for message in messages:
            if message["t"] == wire.REPLY:
                future = self._waiting.get(message["id"])
                if future is not None and not future.done():
                    future.set_result(message)
                continue
            self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        t = message["t"]
        request = wire.MESSAGES[t].request
        handler = self.handlers.get(t)
        try:
            if handler is None:
                raise RelayError(f"no handler for {t}")
            result = handler(message)
        except Exception as exc:  # one line, and the peer is told
            self._failed(message, exc, request)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(lambda done: self._finished(done, message, request))
        elif request:
            self._reply(message, result or {})

    def _finished(self, task: asyncio.Future[Any], message: dict[str, Any],
                  request: bool) -> None:
        self._tasks.discard(task)  # type: ignore[arg-type]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._failed(message, exc, request)
        elif request:
            self._reply(message, task.result() or {})

    def _failed(self, message: dict[str, Any], exc: BaseException, request: bool) -> None:
        text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RelayError) else str(exc)
        log.debug("handling %s failed", message["t"], exc_info=exc)
        if request:
            self._reply(message, {"error": text})
        else:
            log.error("internal error handling %s: %s", message["t"], text)

    def _reply(self, message: dict[str, Any], fields: dict[str, Any]) -> None:
        self.send(wire.REPLY, id=message["id"], **fields)

    def connection_lost(self, exc: Exception | None) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(PeerLost("the other end of the control socket is gone"))
        self._waiting.clear()
        for task in list(self._tasks):
            task.cancel()
        if not self.lost.done():
            self.lost.set_result(None)
        self.on_lost(exc)
