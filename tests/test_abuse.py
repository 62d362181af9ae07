"""The abuse policy with a fake clock: rates, caps, strikes, growing bans, summaries."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from relay.abuse import Abuse, parse_network
from relay.config import AbuseConfig
from relay.errors import RelayError


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path: Path, **kw: Any) -> tuple[Abuse, Clock, list[dict[str, Any]]]:
    clock = Clock()
    audit: list[dict[str, Any]] = []
    return Abuse(AbuseConfig(**kw), tmp_path, audit.append, clock), clock, audit


def cycle(a: Abuse, ip: str, lifetime: float = 0.1) -> str | None:
    reason = a.admit(ip)
    if reason is None:
        a.connection_closed(ip, lifetime, had_session=False)
    return reason


def test_rate_per_ip_refills(tmp_path: Path) -> None:
    a, clock, _ = make(tmp_path, rate_per_ip=2.0, burst_per_ip=3, strikes=1000)
    assert [a.admit("192.0.2.1") for _ in range(4)] == [None, None, None, "rate-per-ip"]
    assert a.admit("192.0.2.2") is None  # others unaffected
    clock.t += 0.5
    assert a.admit("192.0.2.1") is None
    assert a.admit("192.0.2.1") == "rate-per-ip"


def test_handshake_caps_and_release(tmp_path: Path) -> None:
    a, _, _ = make(tmp_path, handshakes_per_ip=2, handshakes_total=3, strikes=1000,
                   burst_per_ip=100, rate_per_ip=100.0)
    assert a.admit("192.0.2.1") is None and a.admit("192.0.2.1") is None
    assert a.admit("192.0.2.1") == "handshakes-per-ip"
    assert a.admit("192.0.2.2") is None
    assert a.admit("192.0.2.3") == "handshakes-total"
    a.handshake_done("192.0.2.1")  # became a session: frees a handshake slot
    assert a.admit("192.0.2.3") is None


def test_sessions_per_ip(tmp_path: Path) -> None:
    a, _, _ = make(tmp_path, sessions_per_ip=2, strikes=1000, burst_per_ip=100,
                   rate_per_ip=100.0)
    for _ in range(2):
        assert a.admit("192.0.2.1") is None
        a.handshake_done("192.0.2.1")
    assert a.admit("192.0.2.1") == "sessions-per-ip"
    a.connection_closed("192.0.2.1", 100.0, had_session=True)
    assert a.admit("192.0.2.1") is None


def test_short_sessions_ban_with_growing_duration(tmp_path: Path) -> None:
    a, clock, audit = make(tmp_path, strikes=5, strike_window="60s", ban="10m", ban_max="25m",
                           burst_per_ip=1000, rate_per_ip=1000.0)
    for _ in range(4):
        assert cycle(a, "192.0.2.9") is None
    assert not a.banned("192.0.2.9")
    assert cycle(a, "192.0.2.9") is None  # the 5th short session: banned now
    ban = a.banned("192.0.2.9")
    assert ban is not None and ban.until == clock.t + 600
    assert a.admit("192.0.2.9") == "banned"
    assert audit[-1]["action"] == "ban" and audit[-1]["network"] == "192.0.2.9/32"
    # Long sessions are not strikes.
    for _ in range(10):
        assert cycle(a, "192.0.2.10", lifetime=3600) is None
    assert not a.banned("192.0.2.10")
    # Expiry writes an unban record; a repeat offence doubles, capped by ban_max.
    clock.t += 601
    a.expire()
    assert audit[-1] == {"action": "unban", "network": "192.0.2.9/32", "reason": "expired",
                         "by": "relay"}
    for _ in range(5):
        cycle(a, "192.0.2.9")
    assert a.banned("192.0.2.9").until == clock.t + 1200  # type: ignore[union-attr]
    clock.t += 1201
    for _ in range(5):
        cycle(a, "192.0.2.9")
    assert a.banned("192.0.2.9").until == clock.t + 1500  # type: ignore[union-attr]


def test_strikes_outside_the_window_do_not_add_up(tmp_path: Path) -> None:
    a, clock, _ = make(tmp_path, strikes=3, strike_window="10s", burst_per_ip=100,
                       rate_per_ip=100.0)
    for _ in range(10):
        cycle(a, "192.0.2.1")
        clock.t += 6
    assert not a.banned("192.0.2.1")


def test_bans_persist_privately_and_cover_cidrs(tmp_path: Path) -> None:
    a, clock, audit = make(tmp_path)
    a.add_ban("203.0.113.77/24", 3600, "manual", by="operator")
    path = tmp_path / "bans.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())[0]["network"] == "203.0.113.0/24"
    b = Abuse(AbuseConfig(), tmp_path, audit.append, clock)
    assert b.admit("203.0.113.200") == "banned"
    assert b.admit("203.0.114.1") is None
    assert b.remove_ban("203.0.113.0/24")
    assert audit[-1]["action"] == "unban" and b.admit("203.0.113.200") is None
    assert not b.remove_ban("198.51.100.0/24")


def test_refusals_are_summarised_not_logged_one_by_one(tmp_path: Path) -> None:
    a, _, audit = make(tmp_path, rate_per_ip=1.0, burst_per_ip=1, strikes=10**6)
    for _ in range(500):
        a.admit("192.0.2.1")
    for i in range(100):
        a.admit(f"198.51.100.{i}")
        a.admit(f"198.51.100.{i}")
    assert audit == []
    summary = a.summarise()
    assert summary is not None and summary["action"] == "refusals"
    assert summary["total"] == 499 + 100
    assert summary["sources"]["192.0.2.1"] == {"rate-per-ip": 499}
    assert len(summary["sources"]) == 50 and summary["other_sources"]["count"] == 51
    assert a.summarise() is None


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(RelayError):
        parse_network("999.1.1.1")
    (tmp_path / "bans.json").write_text("{not json")
    with pytest.raises(RelayError, match="unreadable ban list"):
        make(tmp_path)
