"""The control socket's client (relay/control.py) against peers that misbehave."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from relay import control
from relay.errors import RelayError


def test_a_relay_that_never_answers_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(tmp_path / control.SOCKET_NAME))
        server.listen()
        held: list[socket.socket] = []
        threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
        with pytest.raises(RelayError, match="did not answer within 1 s"):
            control.request(tmp_path, {"cmd": "status"}, timeout=1.0)
        for conn in held:
            conn.close()


def test_no_relay_running_is_said(tmp_path: Path) -> None:
    with pytest.raises(control.NotRunning, match="no relay is running"):
        control.request(tmp_path, {"cmd": "status"})
