"""The abuse policy with a fake clock: rates, caps, strikes, growing bans, summaries."""

from __future__ import annotations

import ipaddress
import json
import random
import stat
from pathlib import Path
from typing import Any

import pytest

from relay import config
from relay.config import AbuseConfig
from relay.errors import RelayError
from relay.serve import abuse
from relay.serve.abuse import Abuse, parse_network


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path: Path, **kw: Any) -> tuple[Abuse, Clock, list[dict[str, Any]]]:
    clock = Clock()
    audit: list[dict[str, Any]] = []
    tmp_path.mkdir(exist_ok=True)
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
    path = tmp_path / "bans.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["network"] == "203.0.113.0/24"
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
    (tmp_path / "bans.json").unlink()
    # A bad line that is not the last one is not a torn append: refuse to guess.
    (tmp_path / "bans.jsonl").write_text('{"op":"add"}\n{"op":"remove","network":"x"}\n')
    with pytest.raises(RelayError, match=r"bans.jsonl:1: unreadable ban record"):
        make(tmp_path)
    (tmp_path / "bans.jsonl").write_text('{"op":"drop","network":"192.0.2.1/32"}\n')
    with pytest.raises(RelayError, match="unknown op"):
        make(tmp_path)
    (tmp_path / "bans.jsonl").write_text(
        '{"op":"add","network":"192.0.2.300/32","until":2e6,"reason":"x"}\n')
    with pytest.raises(RelayError, match=r"not an IP address or CIDR: '192\.0\.2\.300/32'; fix"):
        make(tmp_path)
    # A hand-edited spelling is read as the canonical network.
    (tmp_path / "bans.jsonl").write_text(
        '{"op":"add","network":"::FFFF:192.0.2.1","until":2e6,"reason":"x"}\n')
    a, _, _ = make(tmp_path)
    assert a.admit("192.0.2.1") == "banned" and a.remove_ban("192.0.2.1/32")


def test_ipv6_prefix_is_validated() -> None:
    assert config.from_dict({"abuse": {"ipv6_prefix": 48}}).abuse.ipv6_prefix == 48
    assert config.Config().abuse.ipv6_prefix == 64
    for bad in (31, 129, 16):
        with pytest.raises(RelayError, match=r"\[abuse\] ipv6_prefix: expected 32..128"):
            config.from_dict({"abuse": {"ipv6_prefix": bad}})


# -- keys: IPv6 prefixes and IPv4-mapped addresses ------------------------------------


def test_ipv6_sources_are_keyed_by_prefix(tmp_path: Path) -> None:
    a, _, _ = make(tmp_path, rate_per_ip=1.0, burst_per_ip=2, strikes=1000,
                   handshakes_per_ip=1000)
    # Two addresses of one /64 share one bucket: the third connection is refused.
    assert a.admit("2001:db8:1:2::1") is None
    assert a.admit("2001:db8:1:2:ffff:ffff:ffff:fffe") is None
    assert a.admit("2001:db8:1:2::3") == "rate-per-ip"
    # The next /64 is someone else.
    assert a.admit("2001:db8:1:3::1") is None
    summary = a.summarise()
    assert summary is not None and summary["sources"] == {"2001:db8:1:2::/64": {"rate-per-ip": 1}}
    # A wider key lumps the /64s of a /48 together.
    b, _, _ = make(tmp_path / "48", rate_per_ip=1.0, burst_per_ip=2, strikes=1000,
                   ipv6_prefix=48)
    assert b.admit("2001:db8:1:2::1") is None and b.admit("2001:db8:1:3::1") is None
    assert b.admit("2001:db8:1:4::1") == "rate-per-ip"


def test_ipv6_handshakes_and_sessions_count_per_prefix(tmp_path: Path) -> None:
    a, _, _ = make(tmp_path, handshakes_per_ip=2, sessions_per_ip=1, strikes=1000,
                   burst_per_ip=100, rate_per_ip=100.0)
    assert a.admit("2001:db8::1") is None and a.admit("2001:db8::2") is None
    assert a.admit("2001:db8::3") == "handshakes-per-ip"
    a.handshake_done("2001:db8::1")  # one session for the /64 now
    a.connection_closed("2001:db8::2", 100.0, had_session=False)
    assert a.admit("2001:db8::4") == "sessions-per-ip"
    a.connection_closed("2001:db8::1", 100.0, had_session=True)
    assert a.admit("2001:db8::5") is None


def test_ipv6_offender_is_banned_by_prefix(tmp_path: Path) -> None:
    a, _, audit = make(tmp_path, strikes=4, burst_per_ip=1000, rate_per_ip=1000.0)
    # A client that rotates through its /64 still adds up to one offender.
    for i in range(1, 5):
        assert cycle(a, f"2001:db8:1:2::{i:x}") is None
    assert audit[-1]["action"] == "ban" and audit[-1]["network"] == "2001:db8:1:2::/64"
    assert a.admit("2001:db8:1:2:dead:beef:0:1") == "banned"
    assert a.admit("2001:db8:1:3::1") is None
    # Operators can still ban any CIDR, and a single address.
    a.add_ban("2001:db8:2::/48", 60, "manual")
    a.add_ban("2001:db8:3::7", 60, "manual")
    assert a.admit("2001:db8:2:ffff::1") == "banned"
    assert a.admit("2001:db8:3::7") == "banned" and a.admit("2001:db8:3::8") is None


def test_mapped_and_plain_ipv4_are_one_source(tmp_path: Path) -> None:
    a, _, _ = make(tmp_path, rate_per_ip=1.0, burst_per_ip=2, strikes=1000,
                   handshakes_per_ip=1000)
    assert a.admit("192.0.2.1") is None
    assert a.admit("::ffff:192.0.2.1") is None
    assert a.admit("::ffff:c000:201") == "rate-per-ip"
    assert a.admit("192.0.2.1") == "rate-per-ip"
    # Accounting under either spelling hits the same source.
    a.handshake_done("::ffff:192.0.2.1")
    a.connection_closed("192.0.2.1", 100.0, had_session=True)
    a.connection_closed("::ffff:192.0.2.1", 100.0, had_session=False)
    assert list(a.sources) == ["192.0.2.1"] and a.sources["192.0.2.1"].handshakes == 0
    assert a.handshakes == 0
    assert a.summarise()["sources"] == {"192.0.2.1": {"rate-per-ip": 2}}  # type: ignore[index]


def test_a_ban_holds_every_spelling_of_an_ipv4_address(tmp_path: Path) -> None:
    a, _, audit = make(tmp_path)
    a.add_ban("198.51.100.7", 60, "manual")
    assert a.admit("::ffff:198.51.100.7") == "banned"
    # A ban given in the mapped form is the ban on the IPv4 address ...
    ban = a.add_ban("::ffff:203.0.113.9", 60, "manual")
    assert ban.network == "203.0.113.9/32" and audit[-1]["network"] == "203.0.113.9/32"
    assert a.admit("203.0.113.9") == "banned" and a.admit("::ffff:203.0.113.9") == "banned"
    a.add_ban("::ffff:192.0.2.0/120", 60, "manual")
    assert a.admit("192.0.2.200") == "banned"
    # ... and is lifted by either spelling.
    assert a.remove_ban("203.0.113.9") and a.admit("::ffff:203.0.113.9") is None
    assert a.remove_ban("::ffff:198.51.100.7") and a.admit("198.51.100.7") is None
    # A mapped offender is banned as its IPv4 address.
    b, _, audit = make(tmp_path / "b", strikes=3, burst_per_ip=1000, rate_per_ip=1000.0)
    for _ in range(3):
        cycle(b, "::ffff:192.0.2.50")
    assert audit[-1]["network"] == "192.0.2.50/32" and b.admit("192.0.2.50") == "banned"


def test_refuse_counts_a_refusal_without_a_strike(tmp_path: Path) -> None:
    a, _, audit = make(tmp_path, strikes=2)
    for _ in range(5):
        a.refuse("::ffff:192.0.2.1", "no-disk")
    a.refuse("2001:db8::1", "no-disk")
    assert audit == [] and not a.banned("192.0.2.1")
    assert a.refused_total["no-disk"] == 6
    assert a.summarise()["sources"] == {  # type: ignore[index]
        "192.0.2.1": {"no-disk": 5}, "2001:db8::/64": {"no-disk": 1}}


# -- the ban index --------------------------------------------------------------------


def test_ban_lookup_agrees_with_a_linear_scan(tmp_path: Path) -> None:
    a, clock, _ = make(tmp_path)
    rng = random.Random(7)
    bans = []
    for _ in range(300):
        if rng.random() < 0.5:
            net = ipaddress.ip_network((rng.getrandbits(32) & 0xFF0FFFFF | 0x0A000000,
                                        rng.choice((8, 16, 20, 24, 28, 32))), strict=False)
        else:
            net = ipaddress.ip_network((0x20010DB8 << 96 | rng.getrandbits(64) << 32,
                                        rng.choice((32, 48, 56, 64, 128))), strict=False)
        bans.append(a.add_ban(str(net), rng.uniform(1, 100), "t", force=True))
    clock.t += 30  # some have ended
    probes = [ipaddress.ip_address(int(ipaddress.ip_network(b.network).network_address)
                                   + rng.randrange(4)) for b in bans]
    probes += [ipaddress.ip_address(rng.getrandbits(32)) for _ in range(300)]
    for addr in probes:
        covering = [b for b in a.bans.values()
                    if b.until > clock.t and addr in ipaddress.ip_network(b.network)]
        expected = max(covering, key=lambda b: b.until) if covering else None
        assert a.banned(str(addr)) is expected


def test_the_longest_ban_in_force_is_reported(tmp_path: Path) -> None:
    a, clock, audit = make(tmp_path)
    a.add_ban("198.51.100.0/24", 100, "wide, short")
    a.add_ban("198.51.100.7", 1000, "narrow, long")
    a.add_ban("198.51.0.0/16", 500, "wider, middle")
    assert a.banned("198.51.100.7").reason == "narrow, long"  # type: ignore[union-attr]
    assert a.banned("198.51.100.8").reason == "wider, middle"  # type: ignore[union-attr]
    # A shorter ban never shortens a longer one on the same network: it stays as it is.
    written = len(journal(tmp_path))
    assert a.add_ban("198.51.100.7", 10, "narrow, now short").reason == "narrow, long"
    assert len(journal(tmp_path)) == written and audit[-1]["reason"] == "wider, middle"
    clock.t += 11
    assert a.banned("198.51.100.7").reason == "narrow, long"  # type: ignore[union-attr]
    # A longer one replaces it, and the old end time does not cut it short.
    a.add_ban("203.0.113.1", 10, "short")
    a.add_ban("203.0.113.1", 1000, "long")
    clock.t += 20
    a.expire()
    assert a.banned("203.0.113.1").reason == "long"  # type: ignore[union-attr]
    assert len(a.bans) == 4 and audit[-1]["action"] == "ban"


# -- the ban journal ------------------------------------------------------------------


def journal(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "bans.jsonl").read_text().splitlines()]


def test_journal_replays_adds_and_removes(tmp_path: Path) -> None:
    a, clock, audit = make(tmp_path)
    a.add_ban("192.0.2.1", 60, "one")
    a.add_ban("192.0.2.2", 60, "two")
    a.add_ban("2001:db8::/64", 60, "three")
    a.remove_ban("192.0.2.1")
    a.add_ban("192.0.2.2", 120, "two again", offences=2)
    # One appended record per change, never a rewrite of the others.
    assert [(r["op"], r["network"]) for r in journal(tmp_path)] == [
        ("add", "192.0.2.1/32"), ("add", "192.0.2.2/32"), ("add", "2001:db8::/64"),
        ("remove", "192.0.2.1/32"), ("add", "192.0.2.2/32")]
    b = Abuse(AbuseConfig(), tmp_path, audit.append, clock)
    assert {n: (x.until, x.reason, x.offences) for n, x in b.bans.by_network.items()} == {
        "192.0.2.2/32": (clock.t + 120, "two again", 2),
        "2001:db8::/64": (clock.t + 60, "three", 1)}
    assert b.admit("2001:db8::99") == "banned" and b.admit("192.0.2.1") is None


def test_journal_survives_a_torn_last_line(tmp_path: Path) -> None:
    a, clock, audit = make(tmp_path)
    a.add_ban("192.0.2.1", 60, "one")
    a.add_ban("192.0.2.2", 60, "two")
    path = tmp_path / "bans.jsonl"
    whole = path.read_bytes()
    # A crash in the middle of the third append.
    path.write_bytes(whole + b'{"op":"add","network":"192.0.2.3/32","unt')
    b = Abuse(AbuseConfig(), tmp_path, audit.append, clock)
    assert sorted(b.bans.by_network) == ["192.0.2.1/32", "192.0.2.2/32"]
    assert path.read_bytes() == whole  # cut off, so the next append starts a clean line
    b.add_ban("192.0.2.4", 60, "four")
    c = Abuse(AbuseConfig(), tmp_path, audit.append, clock)
    assert sorted(c.bans.by_network) == ["192.0.2.1/32", "192.0.2.2/32", "192.0.2.4/32"]


def test_journal_is_compacted_into_the_live_set(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    minimum = 64  # the real minimum takes thousands of fdatasyncs to reach
    monkeypatch.setattr(abuse, "COMPACT_MIN_RECORDS", minimum)
    a, clock, audit = make(tmp_path)
    for i in range(10):
        a.add_ban(f"198.51.100.{i}", 10**6, "keep")
    # Churn: bans added and lifted.
    n = 0
    while a.journal.records < minimum - 2:
        a.add_ban(f"10.0.{n}.1", 60, "churn")
        a.remove_ban(f"10.0.{n}.1")
        n += 1
    assert len(journal(tmp_path)) == minimum - 2
    a.add_ban("192.0.2.1", 60, "expires")
    assert len(journal(tmp_path)) == minimum - 1
    a.add_ban("192.0.2.2", 60, "expires")
    # The record that reached the minimum rewrote the journal as the live set.
    assert a.journal.records == 12 == len(journal(tmp_path))
    assert stat.S_IMODE((tmp_path / "bans.jsonl").stat().st_mode) == 0o600
    assert {r["op"] for r in journal(tmp_path)} == {"add"}
    # Expired bans leave the file at the compaction after their expiry.
    clock.t += 61
    for i in range(minimum):
        a.add_ban(f"10.255.0.{i}", 30, "short")
    clock.t += 31
    a.expire()
    assert sorted(r["network"] for r in journal(tmp_path)) == sorted(
        f"198.51.100.{i}/32" for i in range(10))
    b = Abuse(AbuseConfig(), tmp_path, audit.append, clock)
    assert sorted(b.bans.by_network) == sorted(f"198.51.100.{i}/32" for i in range(10))


def test_bans_json_is_migrated_on_first_start(tmp_path: Path) -> None:
    clock = Clock()
    legacy = [{"network": "203.0.113.0/24", "until": clock.t + 3600, "reason": "manual",
               "offences": 1},
              {"network": "192.0.2.9/32", "until": clock.t + 600, "reason": "strikes",
               "offences": 3}]
    (tmp_path / "bans.json").write_text(json.dumps(legacy))
    audit: list[dict[str, Any]] = []
    a = Abuse(AbuseConfig(), tmp_path, audit.append, clock)
    assert not (tmp_path / "bans.json").exists()
    assert stat.S_IMODE((tmp_path / "bans.jsonl").stat().st_mode) == 0o600
    assert [{k: v for k, v in r.items() if k != "op"} for r in journal(tmp_path)] == legacy
    assert a.admit("203.0.113.5") == "banned" and a.banned("192.0.2.9").offences == 3  # type: ignore[union-attr]
    # A start that crashed after writing the journal but before removing the old
    # file: the journal (which may have moved on since) wins.
    a.remove_ban("203.0.113.0/24")
    (tmp_path / "bans.json").write_text(json.dumps(legacy))
    b = Abuse(AbuseConfig(), tmp_path, audit.append, clock)
    assert sorted(b.bans.by_network) == ["192.0.2.9/32"]
    assert not (tmp_path / "bans.json").exists()


def test_ipv6_prefix_needs_a_restart(tmp_path: Path) -> None:
    """Live connections are counted under their key; a reload must not re-key them."""
    import asyncio

    from relay.connlog import daylog
    from relay.serve.core import Relay

    base = config.Config().with_data_dir(tmp_path)
    relay = Relay(base, lambda: config.from_dict(
        {"logs": {"data_dir": str(tmp_path)}, "abuse": {"ipv6_prefix": 48, "strikes": 7}}))
    daylog.ensure_dir(tmp_path)
    relay.connlog = daylog.ConnectionLog(tmp_path)
    relay.abuse = Abuse(base.abuse, tmp_path, relay.audit, Clock())
    assert relay.abuse.admit("2001:db8:1:2::1") is None
    message = asyncio.run(relay.reload())
    relay.connlog.close()
    assert "[abuse] ipv6_prefix changed but need a restart" in message
    assert relay.abuse.cfg.ipv6_prefix == 64 and relay.abuse.cfg.strikes == 7
    relay.abuse.handshake_done("2001:db8:1:2::1")  # still found under its /64
    assert relay.abuse.sources["2001:db8:1:2::/64"].sessions == 1


def test_ban_cli_on_the_files_takes_any_spelling(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """relay ban add|list|remove with no relay running works on the journal."""
    from relay import cli
    from relay.connlog import reader

    data = ["--data-dir", str(tmp_path)]
    assert cli.main(["ban", "add", "::ffff:198.51.100.7", "--for", "1h", *data]) == 0
    assert cli.main(["ban", "add", "2001:db8:1:2::9/64", *data]) == 0
    capsys.readouterr()
    assert cli.main(["ban", "list", "--json", *data]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [b["network"] for b in listed] == ["198.51.100.7/32", "2001:db8:1:2::/64"]
    assert cli.main(["ban", "remove", "198.51.100.7", *data]) == 0
    assert "removed the ban on 198.51.100.7/32" in capsys.readouterr().out
    assert cli.main(["ban", "remove", "::ffff:198.51.100.7", *data]) == 1
    assert "no ban on 198.51.100.7/32" in capsys.readouterr().err
    assert [r["action"] for r in reader.iter_records(tmp_path)] == ["ban", "ban", "unban"]
    assert stat.S_IMODE((tmp_path / "bans.jsonl").stat().st_mode) == 0o600


def test_wide_bans_need_force_and_every_ban_has_a_duration(tmp_path: Path) -> None:
    """A typo must not ban a continent: /0 to /8 (IPv6 up to /31) only with force;
    a ban of 0s (or beyond a year) is refused, not recorded."""
    from relay.errors import RelayError
    from relay.serve.abuse import BAN_MAX_S

    a, _, audit = make(tmp_path)
    for net in ("0.0.0.0/0", "10.0.0.0/8", "::/0", "2001:db8::/31"):
        with pytest.raises(RelayError, match="only with --force"):
            a.add_ban(net, 60, "typo")
    for seconds in (0, -5, BAN_MAX_S + 1):
        with pytest.raises(RelayError, match="give a duration from 1s to 366d"):
            a.add_ban("192.0.2.1", seconds, "t")
    assert audit == [] and not (tmp_path / "bans.jsonl").exists()
    assert a.add_ban("10.0.0.0/9", 60, "narrower").network == "10.0.0.0/9"
    assert a.add_ban("2001:db8::/32", 60, "one ISP").network == "2001:db8::/32"
    assert a.add_ban("10.0.0.0/8", 60, "meant", force=True).network == "10.0.0.0/8"
    assert [r["network"] for r in audit] == ["10.0.0.0/9", "2001:db8::/32", "10.0.0.0/8"]


def test_ban_cli_show_keeps_longer_and_refuses_wide(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """relay ban show IP names every ban over the address, the longest first; a
    shorter ban add keeps the longer ban and says so; --force for a wide range."""
    from relay import cli

    data = ["--data-dir", str(tmp_path)]
    assert cli.main(["ban", "add", "198.51.100.0/24", "--for", "2h", *data]) == 0
    assert cli.main(["ban", "add", "198.51.100.7", "--for", "7d", *data]) == 0
    capsys.readouterr()
    assert cli.main(["ban", "add", "198.51.100.7", "--for", "1h", "--json", *data]) == 0
    captured = capsys.readouterr()
    assert "a longer ban on 198.51.100.7/32 is in force until" in captured.err
    assert json.loads(captured.out)["reason"] == "added by operator"
    assert cli.main(["ban", "show", "::ffff:198.51.100.7", "--json", *data]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [b["network"] for b in shown] == ["198.51.100.7/32", "198.51.100.0/24"]
    assert cli.main(["ban", "show", "198.51.100.9", *data]) == 0
    assert "198.51.100.0/24" in capsys.readouterr().out
    assert cli.main(["ban", "show", "192.0.2.1", *data]) == 1
    assert capsys.readouterr().err == "relay: no ban covers 192.0.2.1\n"
    assert cli.main(["ban", "add", "198.0.0.0/8", *data]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["ban", "add", "198.0.0.0/8", "--force", *data]) == 0
