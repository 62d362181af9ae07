"""Durable small-file writes and listening sockets, shared by the relay's parts."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from relay.errors import RelayError

# Private by default: everything the relay writes names users' addresses.
PRIVATE_FILE = 0o600
# Pending connections the kernel queues for a listener: the kernel's somaxconn
# default (4096 since Linux 5.4); floods are refused by the relay, not by a full
# queue.
LISTEN_BACKLOG = 4096


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = PRIVATE_FILE) -> None:
    """Replace ``path`` with ``data``: readers see the old or the new content,
    never a torn one, and the new one is on disk when this returns."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def listen_tcp(host: str, port: int, backlog: int = LISTEN_BACKLOG,
               reuseport: bool = False) -> socket.socket:
    """A non-blocking listening socket, or one clear error line; with
    ``reuseport``, one of a group of sockets on the same port (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RelayError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
