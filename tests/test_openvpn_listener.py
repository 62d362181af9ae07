"""The OpenVPN UDP listener's stateless side against a flood: what a forger can make
it do before any peer has proved its address is bounded by a budget per second
(bench/hostile.py measures the flood's cost to an honest session)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_link import FakeHost

from relay import config
from relay.metrics import render
from relay.protocols.openvpn.cookie import Peer
from relay.protocols.openvpn.wire import OPCODE_SHIFT, Opcode
from relay.serve import openvpn_link
from relay.serve.datapath import Datapath
from relay.serve.openvpn_link import STATELESS_BURST, STATELESS_PER_S, OpenVPNListener


def client_reset() -> bytes:
    """Written by hand from ssl_pkt.h: opcode 7 << 3 with key id 0, a random session
    id, no ACK, packet id 0 (the stock client's 14 bytes)."""
    return bytes([Opcode.CONTROL_HARD_RESET_CLIENT_V2 << OPCODE_SHIFT]) + os.urandom(8) \
        + b"\x00" + bytes(4)


def forged(i: int) -> Peer:
    return (f"198.18.{128 + i // 250}.{i % 250 + 1}", 40000 + i % 1000)


def test_stateless_answers_have_a_budget_per_second(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(openvpn_link.time, "monotonic", lambda: clock[0])
    listener = OpenVPNListener(FakeHost(), Datapath(SimpleNamespace(fd=-1)),  # type: ignore[arg-type]
                               config.Config().with_data_dir(tmp_path), 0, os.urandom(32))
    answered: list[Peer] = []
    listener.sendto = lambda pkt, addr: answered.append(addr)  # type: ignore[method-assign]

    flood = STATELESS_BURST + 500
    for i in range(flood):
        listener.datagram(client_reset(), forged(i))
    # The burst is answered, one reply each; the rest get no look at all.
    assert answered == [forged(i) for i in range(STATELESS_BURST)]
    assert listener.counts["unanswered"] == 500
    assert not listener.udp_links and not listener.udp_pending  # no state either way

    # A second later the budget has grown back by its rate, no more.
    clock[0] += 1.0
    for i in range(flood, 2 * flood):
        listener.datagram(client_reset(), forged(i))
    assert len(answered) == STATELESS_BURST + int(STATELESS_PER_S)
    text = render(listener.metrics())
    assert f"relay_openvpn_unanswered_total {float(2 * flood - len(answered))!r}" in text
