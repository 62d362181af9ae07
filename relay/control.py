"""The control socket of a running relay: ``DATA_DIR/control.sock``.

Unix stream socket, mode 0600 (root's tools only), one JSON request line and one
JSON response line per connection. Commands that change state (bans, reload)
go through the running relay, so it stays the only writer of its files and logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relay.errors import RelayError

SOCKET_NAME = "control.sock"
# Requests are small JSON objects; anything bigger is not one of ours.
MAX_REQUEST_BYTES = 64 * 1024
# A client that does not send its request line within this time is dropped.
REQUEST_TIMEOUT_S = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class NotRunning(RelayError):
    """No relay listens on the control socket of this data directory."""


async def serve_control(data_dir: Path, handler: Handler) -> asyncio.AbstractServer:
    path = Path(data_dir) / SOCKET_NAME
    path.unlink(missing_ok=True)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
            response = await handler(request)
        except (ValueError, TimeoutError, asyncio.LimitOverrunError) as exc:
            response = {"ok": False, "error": f"bad request: {exc}"}
        except RelayError as exc:
            response = {"ok": False, "error": str(exc)}
        with contextlib.suppress(ConnectionError):
            writer.write(json.dumps(response).encode() + b"\n")
            await writer.drain()
        writer.close()

    old_umask = os.umask(0o077)
    try:
        server = await asyncio.start_unix_server(client, path, limit=MAX_REQUEST_BYTES)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


def request(data_dir: Path, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one command to the relay running on ``data_dir``."""
    path = Path(data_dir) / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"no relay is running on {data_dir} ({path})") from None
        buf = b""
        try:
            s.sendall(json.dumps(payload).encode() + b"\n")
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise RelayError(f"the relay running on {data_dir} did not answer within "
                             f"{timeout:.0f} s (is it overloaded or stuck? see its log)") \
                from None
    response = json.loads(buf or b"{}")
    if not response.get("ok"):
        raise RelayError(response.get("error", "the relay gave no answer"))
    return response
