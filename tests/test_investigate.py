"""relay logs search / export-pcap / verify / disclose / verify-bundle on a data
directory with planted sessions and traffic around Europe/Berlin's 2026 spring
DST change (2026-03-29 01:00Z: 02:00 CET became 03:00 CEST)."""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from packetlog_synth import to_c

from relay import chain, cli, sessionid
from relay.connlog import daylog, retention
from relay.investigate.pcapng import tcp_flags
from relay.packetlog import segments
from relay.times import rfc3339_ms


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


SID = {"A": "AAAAAAAAAAAAAAAAAAAAAA", "B": "BBBBBBBBBBBBBBBBBBBBBA",
       "C": "CCCCCCCCCCCCCCCCCCCCCA", "D": "DDDDDDDDDDDDDDDDDDDDDA"}
SESSIONS: dict[str, dict[str, Any]] = {
    # A: 00:30-01:30Z from 198.51.100.10 via 192.0.2.1; 203.0.113.7:443 at 00:45Z
    # (01:45 CET, 09:45 JST) and 203.0.113.8:80 at 01:10Z (03:10 CEST).
    "A": {"connect": "2026-03-29 00:30:00", "disconnect": "2026-03-29 01:30:00",
          "client": ("198.51.100.10", 40001), "server": "192.0.2.1", "vip": "10.211.0.2",
          "software": ("OpenConnect", "9.12"), "protocol": "cstp", "hosts": ["a.example"],
          "flows": [("2026-03-29 00:45:00", "203.0.113.7", 443),
                    ("2026-03-29 01:10:00", "203.0.113.8", 80)]},
    # B: 00:50-02:30Z from 198.51.100.20 via 192.0.2.2, visits example.org.
    "B": {"connect": "2026-03-29 00:50:00", "disconnect": "2026-03-29 02:30:00",
          "client": ("198.51.100.20", 40002), "server": "192.0.2.2", "vip": "10.211.0.3",
          "software": ("OpenVPN", "2.6.3"), "protocol": "openvpn-udp",
          "hosts": ["example.org"],
          "flows": [("2026-03-29 01:10:30", "203.0.113.9", 443),
                    ("2026-03-29 02:00:00", "203.0.113.7", 443)]},
    # C: the day before, same server and destination as A.
    "C": {"connect": "2026-03-28 10:00:00", "disconnect": "2026-03-28 11:00:00",
          "client": ("198.51.100.30", 40003), "server": "192.0.2.1", "vip": "10.211.0.4",
          "software": ("OpenConnect", "9.01"), "protocol": "cstp", "hosts": [],
          "flows": [("2026-03-28 10:30:00", "203.0.113.7", 443)]},
    # D: filler traffic hours later, in segments no window here touches.
    "D": {"connect": "2026-03-29 05:00:00", "disconnect": "2026-03-29 08:00:00",
          "client": ("198.51.100.40", 40004), "server": "192.0.2.1", "vip": "10.211.0.5",
          "software": ("OpenConnect", "9.12"), "protocol": "cstp", "hosts": [],
          "flows": [("2026-03-29 05:30:00", "203.0.113.7", 443),
                    ("2026-03-29 06:30:00", "203.0.113.7", 443),
                    ("2026-03-29 07:30:00", "203.0.113.7", 443)]},
}
PACKETS_PER_FLOW = 7  # SYN, SYN-ACK, ACK, request, two data, ACK


def _addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


def flow(s: dict[str, Any], sid: str, when: str, dst: str, port: int) -> list[dict[str, Any]]:
    t = int(ts(when) * 1e9)
    cip, cport = s["client"]
    base = {"session_id": sessionid.to_raw(sid), "rflags": 0, "client_family": 4,
            "client_ip": _addr(cip), "client_port": cport, "family": 4}
    out_, in_ = (_addr(s["vip"]), _addr(dst), 50000, port), (_addr(dst), _addr(s["vip"]), port,
                                                            50000)
    steps = [(0, 0x02, 1000, 0, 0), (1, 0x12, 5000, 1001, 0), (0, 0x10, 1001, 5001, 0),
             (0, 0x18, 1001, 5001, 300), (1, 0x10, 5001, 1301, 1448),
             (1, 0x18, 6449, 1301, 900), (0, 0x10, 1301, 7349, 0)]
    recs = []
    for i, (direction, flags, seq, ack, length) in enumerate(steps):
        src, dst_ip, sp, dp = out_ if direction == 0 else in_
        recs.append({**base, "time_ns": t + i * 1_000_000, "direction": direction,
                     "src_ip": src, "dst_ip": dst_ip, "src_port": sp, "dst_port": dp,
                     "tcp_flags": flags, "payload_len": length, "window": 500 + i,
                     "seq": seq, "ack": ack})
    return recs


def build(data: Path, sessions: dict[str, dict[str, Any]] = SESSIONS,
          sids: dict[str, str] = SID) -> None:
    """Connection log and packet log of ``sessions``, days sealed into the chain.
    A session without "disconnect" is still open; one without "connect" has
    packets only (its connection-log days lost)."""
    now = [0.0]
    log = daylog.ConnectionLog(data, clock=lambda: now[0])
    events = []
    for name, s in sessions.items():
        for action in ("connect", "disconnect"):
            if s.get(action):
                events.append((ts(s[action]), action, name))
    for t, action, name in sorted(events):
        s = sessions[name]
        now[0] = t
        rec: dict[str, Any] = {
            "action": action, "session_id": sids[name],
            "server": {"id": "relay-1", "ip": s["server"], "hostname": "relay.test"},
            "client": {"ip": s["client"][0], "port": s["client"][1],
                       "hostname": f"host-{name.lower()}.isp.test"},
            "protocol": s["protocol"],
            "client_software": {"name": s["software"][0], "version": s["software"][1]},
            "virtual_ip": s["vip"]}
        if action == "disconnect":
            rec["connect_time"] = rfc3339_ms(ts(s["connect"]))
            rec["destinations"] = [{"host": h, "ip": "203.0.113.50", "port": 443,
                                    "scheme": "https"} for h in s["hosts"]]
        log.append(rec)
    log.append({"action": "packetlog-rotate", "file": "x"})  # an audit record
    log.close()
    flows = sorted((when, name, dst, port) for name, s in sessions.items()
                   for when, dst, port in s["flows"])
    clock = [0.0]
    w = segments.PacketLogWriter(data, clock=lambda: clock[0])
    w.open()
    for when, name, dst, port in flows:
        recs = flow(sessions[name], sids[name], when, dst, port)
        clock[0] = ts(when) + 1
        w.write(to_c(recs), len(recs))
    w.close()
    retention.seal_days(data / daylog.SUBDIR,
                                chain.chain_path(data, chain.CONNLOG_CHAIN),
                                clock=lambda: ts("2026-04-01 00:00:00"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("relaydata")
    build(data)
    return data


@pytest.fixture
def data(built: Path, tmp_path: Path) -> Path:
    """A fresh copy per test, as an investigator's copy on another machine."""
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    return copy


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def search(capsys: pytest.CaptureFixture[str], data: Path, *argv: str) -> list[dict]:
    code, out, err = run(capsys, "logs", "search", "--data-dir", str(data), "--json", *argv)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == (0 if rows else 1), err  # 1: nothing found
    assert "warning" not in err, err
    return rows


def names(rows: list[dict]) -> list[str]:
    inv = {v: k for k, v in SID.items()}
    return sorted(inv[r["session_id"]] for r in rows)


# ------------------------------------------------------------------ search


def test_search_tokyo(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    rows = search(capsys, data, "--at", "2026-03-29 09:45", "--tz", "Asia/Tokyo",
                  "--dst", "203.0.113.7:443")
    assert names(rows) == ["A"]
    r = rows[0]
    assert r["packets"] == PACKETS_PER_FLOW
    assert r["client_ip"] == "198.51.100.10" and r["client_port"] == 40001
    assert r["client_hostname"] == "host-a.isp.test"
    assert r["client_software"] == "OpenConnect 9.12" and r["protocol"] == "cstp"
    assert r["connect"] == "2026-03-29T09:30:00.000+09:00"
    assert r["connect_utc"] == "2026-03-29T00:30:00.000Z"
    assert r["disconnect"] == "2026-03-29T10:30:00.000+09:00"
    assert r["first_packet_utc"] == "2026-03-29T00:45:00.000Z"
    assert r["last_packet_utc"] == "2026-03-29T00:45:00.006Z"
    # Without --dst: every session connected then, B not yet (00:50Z).
    assert names(search(capsys, data, "--at", "2026-03-29T09:45:00", "--tz", "Asia/Tokyo")) \
        == ["A"]


def test_search_utc(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    assert names(search(capsys, data, "--from", "2026-03-28 00:00", "--to",
                        "2026-03-29 00:00")) == ["C"]
    assert names(search(capsys, data, "--at", "2026-03-29T01:10:00Z")) == ["A", "B"]
    assert names(search(capsys, data, "--dst", "203.0.113.7:443", "--server-ip",
                        "192.0.2.1")) == ["A", "C", "D"]
    assert names(search(capsys, data, "--dst", "203.0.113.7")) == ["A", "B", "C", "D"]
    assert names(search(capsys, data, "--host", "Example.ORG.")) == ["B"]
    assert names(search(capsys, data, "--client-ip", "198.51.100.20")) == ["B"]
    assert names(search(capsys, data, "--session", SID["C"][:8])) == ["C"]
    rows = search(capsys, data, "--session", SID["D"], "--from", "2026-03-29 06:00",
                  "--to", "2026-03-29 07:00")
    assert names(rows) == ["D"] and rows[0]["packets"] == PACKETS_PER_FLOW
    assert search(capsys, data, "--dst", "203.0.113.8:80", "--server-ip", "192.0.2.2") == []


def test_search_by_a_mapped_address_finds_the_ipv4_session(
        capsys: pytest.CaptureFixture[str], data: Path) -> None:
    """A dual-stack listener's ::ffff:a.b.c.d is logged, and so searched, as a.b.c.d."""
    assert names(search(capsys, data, "--client-ip", "::ffff:198.51.100.20")) == ["B"]
    assert names(search(capsys, data, "--client-ip", "::ffff:c633:6414")) == ["B"]
    assert names(search(capsys, data, "--dst", "203.0.113.7:443", "--server-ip",
                        "::ffff:192.0.2.1")) == ["A", "C", "D"]


def test_search_across_dst_change(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    berlin = ("--tz", "Europe/Berlin")
    rows = search(capsys, data, "--at", "2026-03-29 01:45", *berlin)  # CET, 00:45Z
    assert names(rows) == ["A"]
    assert rows[0]["connect"] == "2026-03-29T01:30:00.000+01:00"
    assert rows[0]["disconnect"] == "2026-03-29T03:30:00.000+02:00"  # CEST by then
    rows = search(capsys, data, "--at", "2026-03-29 03:10", *berlin, "--dst",
                  "203.0.113.8:80")  # CEST, 01:10Z
    assert names(rows) == ["A"] and rows[0]["packets"] == PACKETS_PER_FLOW
    assert names(search(capsys, data, "--at", "2026-03-29 03:10", *berlin)) == ["A", "B"]
    # Local 01:00 to 04:00 is two hours of real time that night (00:00Z-02:00Z):
    # B's 02:00Z flow is just outside, a minute later it is in.
    rows = search(capsys, data, "--from", "2026-03-29 01:00", "--to", "2026-03-29 04:00",
                  *berlin, "--dst", "203.0.113.7")
    assert names(rows) == ["A"]
    rows = search(capsys, data, "--from", "2026-03-29 01:00", "--to", "2026-03-29 04:01",
                  *berlin, "--dst", "203.0.113.7")
    assert names(rows) == ["A", "B"]
    code, _, err = run(capsys, "logs", "search", "--data-dir", str(data), "--at",
                       "2026-03-29 02:30", *berlin)
    assert code == 2 and "does not exist in Europe/Berlin" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run(capsys, "logs", "search", "--data-dir", str(data), "--at",
                       "2026-10-25 02:30", *berlin)
    assert code == 2 and "ambiguous in Europe/Berlin" in err and "2026-10-25T00:30:00Z" in err
    code, _, err = run(capsys, "logs", "search", "--data-dir", str(data), "--at",
                       "2026-02-30 10:00", *berlin)
    assert code == 2 and "not a valid time" in err


def test_search_formats(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    base = ("logs", "search", "--data-dir", str(data), "--at", "2026-03-29T01:10:00Z")
    code, out, _ = run(capsys, *base, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert sorted(r["session_id"] for r in rows) == [SID["A"], SID["B"]]
    code, out, _ = run(capsys, *base, "--format", "table", "--tz", "Asia/Tokyo")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("session") and len(lines) == 3
    assert "198.51.100.10:40001" in out and "2026-03-29T09:30:00.000+09:00" in out
    target = data / "out.json"
    code, out, _ = run(capsys, *base, "--json", "-o", str(target))
    assert code == 0 and out == "" and len(target.read_text().splitlines()) == 2


def test_a_session_filter_that_names_no_session_is_a_one_line_error(
        capsys: pytest.CaptureFixture[str], data: Path) -> None:
    """--session takes an ID or its start (a tag), in every command: anything else
    is said in one line, not answered with nothing or a traceback."""
    # Not URL-safe base64; past 22 characters; 22 characters that spell no ID (the
    # last one's unused bits set: it would decode to session A's bytes).
    for bad in ("A B", SID["A"] + "A", SID["A"][:-1] + "B"):
        code, out, err = run(capsys, "logs", "search", "--data-dir", str(data),
                             "--session", bad)
        assert code == 2 and out == "" and "Traceback" not in err
        assert err.startswith("relay: error: --session") and err.count("\n") == 1, err
    # logs packets takes the same option: a tag and the whole ID give the same packets.
    for session in (SID["A"][:8], SID["A"]):
        code, out, err = run(capsys, "logs", "packets", "--data-dir", str(data), "--json",
                             "--session", session)
        rows = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and len(rows) == 2 * PACKETS_PER_FLOW, err
        assert {r["session_id"] for r in rows} == {SID["A"]}
    code, out, err = run(capsys, "logs", "packets", "--data-dir", str(data), "--session", "A B")
    assert code == 2 and out == "" and err.count("\n") == 1 and "--session" in err, err
    assert {r["session_id"] for r in rows} == {SID["A"]}


# ------------------------------------------------------------------ --at: exact answers

# T is 2026-03-29 23:59:50Z (2026-03-30 08:59:50 in Tokyo, 01:59:50 CEST in Berlin,
# 19:59:50 EDT in New York): a session that begins 28 s later is on the next UTC day.
AT = "2026-03-29 23:59:50"
AT_ZONES = (("2026-03-29T23:59:50Z", "UTC"), ("2026-03-30 08:59:50", "Asia/Tokyo"),
            ("2026-03-30 01:59:50", "Europe/Berlin"), ("2026-03-29 19:59:50", "America/New_York"))
DST7 = ("203.0.113.7", 443)


def at_plus(seconds: float) -> str:
    return datetime.fromtimestamp(ts(AT) + seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def at_session(i: int, connect: float | None, disconnect: float | None,
               flows: list[tuple[float, tuple[str, int]]]) -> dict[str, Any]:
    return {"connect": at_plus(connect) if connect is not None else None,
            "disconnect": at_plus(disconnect) if disconnect is not None else None,
            "client": (f"198.51.100.{100 + i}", 41000 + i), "server": "192.0.2.1",
            "vip": f"10.211.1.{i}", "software": ("OpenConnect", "9.12"), "protocol": "cstp",
            "hosts": [], "flows": [(at_plus(t), *d) for t, d in flows]}


AT_SESSIONS = {
    # Began 28 s after T (the innocent user the old 60 s slack named).
    "late": at_session(1, 28, 600, [(30, DST7)]),
    # Ended 5 s before T.
    "early": at_session(2, -3600, -5, [(-10, DST7)]),
    # The boundaries: connected exactly at T; disconnected exactly at T.
    "starts": at_session(3, 0, 3600, [(20, DST7)]),
    "ends": at_session(4, -3600, 0, [(-20, DST7)]),
    # Still open (no disconnect record at all).
    "open": at_session(5, -7200, None, [(5, DST7)]),
    # Covers T but talked only to another destination near T.
    "other": at_session(6, -1800, 1800, [(10, ("203.0.113.9", 443))]),
    # Known only by its packets (its connection-log days lost): packets on both
    # sides of T prove it was connected at T; packets only after T do not.
    "pkts_both": at_session(7, None, None, [(-10, DST7), (10, DST7)]),
    "pkts_after": at_session(8, None, None, [(20, DST7)]),
    # The connection log says it began 12 s after T (the next UTC day), its packets
    # (another clock) straddle T: the log decides, packets never bring back a
    # session it ruled out.
    "skewed": at_session(9, 12, 600, [(-1, DST7), (13, DST7)]),
}
AT_SID = {name: f"{name.upper():_<21}A"[:21] + "A" for name in AT_SESSIONS}
COVER_T = ["ends", "open", "other", "pkts_both", "starts"]


@pytest.fixture(scope="module")
def at_built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("atdata")
    build(data, AT_SESSIONS, AT_SID)
    return data


def at_search(capsys: pytest.CaptureFixture[str], data: Path, *argv: str,
              at: tuple[str, str] = AT_ZONES[0]) -> dict[str, dict]:
    """name -> row of ``search --at`` (asserting the names are unique)."""
    inv = {v: k for k, v in AT_SID.items()}
    rows = search(capsys, data, "--at", at[0], "--tz", at[1], *argv)
    out = {inv[r["session_id"]]: r for r in rows}
    assert len(out) == len(rows)
    return out


def test_at_is_exact(capsys: pytest.CaptureFixture[str], at_built: Path) -> None:
    for at in AT_ZONES:
        rows = at_search(capsys, at_built, at=at)
        assert sorted(rows) == COVER_T, at
        assert {r["match"] for r in rows.values()} == {"exact"}
        # With --dst: those of them that talked to it near T, and nobody else,
        # though "late" and "early" sent packets to it within the packet window.
        rows = at_search(capsys, at_built, "--dst", "203.0.113.7:443", at=at)
        assert sorted(rows) == ["ends", "open", "pkts_both", "starts"], at
        assert rows["starts"]["packets"] == PACKETS_PER_FLOW
        assert rows["pkts_both"]["packets"] == 2 * PACKETS_PER_FLOW
        assert not rows["pkts_both"]["in_connection_log"]
        assert rows["open"]["disconnect"] is None
    assert sorted(at_search(capsys, at_built, "--dst", "203.0.113.9")) == ["other"]
    # A second after T: "ends" is gone, nothing else changes.
    rows = search(capsys, at_built, "--at", at_plus(1))
    assert names_at(rows) == ["open", "other", "pkts_both", "starts"]
    rows = search(capsys, at_built, "--at", at_plus(-1))
    assert names_at(rows) == ["ends", "open", "other", "pkts_both"]


def names_at(rows: list[dict]) -> list[str]:
    inv = {v: k for k, v in AT_SID.items()}
    return sorted(inv[r["session_id"]] for r in rows)


def test_at_slack_marks_near_matches(capsys: pytest.CaptureFixture[str],
                                     at_built: Path) -> None:
    for at in AT_ZONES:
        rows = at_search(capsys, at_built, "--slack", "30s", at=at)
        assert {n: r["match"] for n, r in rows.items()} == {
            **dict.fromkeys(COVER_T, "exact"),
            "late": "near", "early": "near", "pkts_after": "near", "skewed": "near"}, at
        rows = at_search(capsys, at_built, "--slack", "10s", "--dst", "203.0.113.7:443", at=at)
        assert {n: r["match"] for n, r in rows.items()} == {
            "ends": "exact", "open": "exact", "pkts_both": "exact", "starts": "exact",
            "early": "near"}, at
    base = ("logs", "search", "--data-dir", str(at_built), "--at", AT, "--slack", "30s")
    code, out, _ = run(capsys, *base, "--format", "csv")
    assert code == 0
    got = {r["session_id"]: r["match"] for r in csv.DictReader(io.StringIO(out))}
    assert got[AT_SID["late"]] == "near" and got[AT_SID["starts"]] == "exact"
    code, out, _ = run(capsys, *base)
    assert code == 0 and out.splitlines()[0].split()[:2] == ["session", "match"]
    line = next(x for x in out.splitlines() if x.startswith(AT_SID["late"]))
    assert line.split()[1] == "near"


def test_at_bad_slack(capsys: pytest.CaptureFixture[str], at_built: Path) -> None:
    for argv in (("--at", AT, "--slack=-1s"), ("--at", AT, "--slack", "nan"),
                 ("--at", AT, "--slack", "inf"), ("--at", AT, "--slack", "30"),
                 ("--at", AT, "--slack", "8d"), ("--from", AT, "--slack", "5s")):
        code, _, err = run(capsys, "logs", "search", "--data-dir", str(at_built), *argv)
        assert code == 2 and err.startswith("relay: error: --slack") and \
            err.count("\n") == 1, err


def test_at_export_and_disclose_only_named_sessions(capsys: pytest.CaptureFixture[str],
                                                    at_built: Path, tmp_path: Path) -> None:
    want = {AT_SID[n] for n in ("ends", "open", "pkts_both", "starts")}
    pcap = tmp_path / "at.pcapng"
    code, _, err = run(capsys, "logs", "export-pcap", "--data-dir", str(at_built), "--at", AT,
                       "--dst", "203.0.113.7:443", "-o", str(pcap))
    assert code == 0, err
    comments = [r[0] for r in tshark_fields(pcap, "frame.comment")]
    assert len(comments) == 5 * PACKETS_PER_FLOW
    assert {c.split()[1] for c in comments} == want
    bundle = tmp_path / "at.tar"
    code, _, err = run(capsys, "logs", "disclose", "--data-dir", str(at_built), "--at", AT,
                       "--dst", "203.0.113.7:443", "-o", str(bundle))
    assert code == 0, err
    with tarfile.open(bundle) as tar:
        sessions = json.load(tar.extractfile("sessions.json"))  # type: ignore[arg-type]
        packets = [json.loads(x) for x in tar.extractfile("packets.jsonl")]  # type: ignore[union-attr]
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert {s["session_id"]: s["match"] for s in sessions} == dict.fromkeys(want, "exact")
    assert {p["session_id"] for p in packets} == want
    assert manifest["query"]["at"] == ts(AT) and manifest["query"]["slack"] == 0.0


def test_out_of_window_segments_are_never_opened(capsys: pytest.CaptureFixture[str],
                                                  data: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    segs = sorted(segments.packets_dir(data).glob("*.rpl"))
    late = [p for p in segs if p.name >= "seg-20260329T050000Z"]
    assert len(late) == 3
    # Overwrite D's segments with garbage of the same size (the chain link's size
    # still matches): a search before them must not notice, because it never
    # opens them; one whose window covers them must report them.
    for p in late:
        p.write_bytes(b"\xff" * p.stat().st_size)
    opened: list[str] = []
    real_open = open

    def spy(file: Any, *a: Any, **k: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    rows = search(capsys, data, "--from", "2026-03-29 00:00", "--to", "2026-03-29 03:00",
                  "--dst", "203.0.113.7:443")
    monkeypatch.undo()
    assert names(rows) == ["A", "B"]
    seg_opens = {Path(p).name for p in opened if "/packets/" in p}
    # The window's three hours (01:00 is opened for its index, which rules it out by
    # address); neither the day before nor D's hours.
    assert seg_opens == {"seg-20260329T000000Z.rpl", "seg-20260329T010000Z.rpl",
                         "seg-20260329T020000Z.rpl"}
    code, _, err = run(capsys, "logs", "search", "--data-dir", str(data), "--from",
                       "2026-03-29 05:00", "--to", "2026-03-29 06:00")
    assert code == 3 and "bad or missing file header" in err  # 3: incomplete


# ------------------------------------------------------------------ pcapng


def tshark_fields(pcap: Path, *fields: str, prefs: tuple[str, ...] = ()) -> list[list[str]]:
    tshark = shutil.which("tshark")
    assert tshark, "tshark is required (Debian package tshark)"
    args = [tshark, "-r", str(pcap), "-T", "fields", "-E", "separator=|"]
    for pref in prefs:
        args += ["-o", pref]
    for f in fields:
        args += ["-e", f]
    res = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120)
    return [line.split("|") for line in res.stdout.splitlines()]


def test_export_pcap_matches_records(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    pcap = data / "a.pcapng"
    code, _, err = run(capsys, "logs", "export-pcap", "--data-dir", str(data), "--from",
                       "2026-03-29 00:00", "--to", "2026-03-29 03:00", "--dst",
                       "203.0.113.7:443", "-o", str(pcap))
    assert code == 0, err
    expect = [r for r in segments.iter_records(data)
              if r["session_id"] in (SID["A"], SID["B"])
              and "203.0.113.7" in (r["src_ip"], r["dst_ip"])]
    assert len(expect) == 2 * PACKETS_PER_FLOW
    got = tshark_fields(
        pcap, "frame.time_epoch", "ip.src", "ip.dst", "tcp.srcport", "tcp.dstport",
        "tcp.seq_raw", "tcp.ack_raw", "tcp.flags", "tcp.window_size_value", "tcp.len",
        "frame.len", "frame.cap_len", "frame.comment", "ip.checksum.status",
        "tcp.checksum.status",
        prefs=("ip.check_checksum:TRUE", "tcp.check_checksum:TRUE",
               "tcp.analyze_sequence_numbers:FALSE"))
    assert len(got) == len(expect)
    for row, r in zip(got, expect, strict=True):
        (epoch, src, dst, sport, dport, seq, ack, flags, win, tcplen, flen, caplen, comment,
         ipck, tcpck) = row
        assert epoch.replace(".", "")[:19] == str(int(
            datetime.fromisoformat(r["time"][:19]).replace(tzinfo=UTC).timestamp())) + \
            r["time"][20:29]
        assert (src, dst, int(sport), int(dport)) == (r["src_ip"], r["dst_ip"], r["src_port"],
                                                      r["dst_port"])
        assert (int(seq), int(ack), int(win)) == (r["seq"], r["ack"], r["window"])
        assert int(flags, 16) == tcp_flags(r["flags"])
        assert int(tcplen) == r["len"]
        assert int(flen) == 54 + r["len"] and int(caplen) == 54
        assert comment.startswith(f"session {r['session_id']} client {r['client_ip']}:")
        assert ipck == "1"  # PROTO_CHECKSUM_E_GOOD (0 bad, 2 unverified)
        assert tcpck == ("1" if r["len"] == 0 else "2")


# ------------------------------------------------------------------ evidence


def verify(capsys: pytest.CaptureFixture[str], data: Path) -> tuple[int, dict]:
    code, out, _ = run(capsys, "logs", "verify", "--data-dir", str(data), "--json")
    return code, json.loads(out)


def kinds(report: dict) -> set[tuple[str, str]]:
    return {(p["kind"], p["file"]) for p in report["problems"]}


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_verify_clean_copy(data: Path) -> None:
    # In a real process on a copy: exit status and text.
    res = subprocess.run([sys.executable, "-m", "relay.cli", "logs", "verify", "--data-dir",
                          str(data)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1].startswith("OK: checked 2 connection-log days")
    assert "7 packet-log files" in res.stdout


def test_verify_detects_tampering(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    segs = sorted(segments.packets_dir(data).glob("*.rpl"))
    day = data / daylog.SUBDIR / "2026-03-29.jsonl"
    flip(segs[1], 100)
    flip(day, 50)
    segs[2].unlink()
    segs[3].write_bytes(segs[3].read_bytes()[:-30])
    a, b = segs[4].read_bytes(), segs[5].read_bytes()
    segs[4].write_bytes(b)
    segs[5].write_bytes(a)
    shutil.copy(segs[0], segs[0].with_name("seg-20260330T000000Z.rpl"))
    code, report = verify(capsys, data)
    assert code == 3
    assert kinds(report) == {
        ("modified", segs[1].name), ("modified", "connlog 2026-03-29"),
        ("missing", segs[2].name), ("truncated", segs[3].name),
        ("reordered", segs[4].name), ("reordered", segs[5].name),
        ("reordered", "seg-20260330T000000Z.rpl")}
    code, out, _ = run(capsys, "logs", "verify", "--data-dir", str(data))
    assert code == 3 and out.splitlines()[-1].startswith("FAILED")


def test_verify_detects_chain_edits(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    path = chain.chain_path(data, chain.PACKETS_CHAIN)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2], lines[3] = lines[3], lines[2]
    path.write_bytes(b"".join(lines))
    code, report = verify(capsys, data)
    assert code == 3 and {p["kind"] for p in report["problems"]} == {"broken-chain"}
    # Cutting the chain back: the files of the dropped links are unchained.
    path.write_bytes(b"".join(sorted(lines[:5], key=lambda x: json.loads(x)["n"])))
    code, report = verify(capsys, data)
    assert code == 3 and {p["kind"] for p in report["problems"]} == {"unchained"}
    # ... and a head recorded by the connection log (shipped off the relay) is gone.
    log = daylog.ConnectionLog(data, clock=lambda: ts("2026-03-29 09:00:00"))
    log.append({"action": "packetlog-rotate", "chain_link":
                chain.line_digest(lines[6])})
    log.close()
    code, report = verify(capsys, data)
    assert ("missing" in {p["kind"] for p in report["problems"]})


def test_archives_and_compression_stay_verifiable(capsys: pytest.CaptureFixture[str],
                                                  data: Path) -> None:
    from relay.packetlog.retention import Retention

    audit: list[dict] = []
    later = ts("2026-04-20 00:00:00")
    done = Retention(data, audit=audit.append, clock=lambda: later,
                     disk_free=lambda: 1 << 40).run()
    assert len([a for a in done if a["action"] == "packetlog-archive"]) == 7
    retention.apply_retention(data / daylog.SUBDIR, clock=lambda: later,
                                      chain_file=chain.chain_path(data, chain.CONNLOG_CHAIN))
    assert sorted(p.name for p in (data / daylog.SUBDIR).iterdir()) == \
        ["2026-03-28.jsonl.zst", "2026-03-29.jsonl.zst"]
    code, report = verify(capsys, data)
    assert code == 0, report
    rows = search(capsys, data, "--at", "2026-03-29 09:45", "--tz", "Asia/Tokyo",
                  "--dst", "203.0.113.7:443")
    assert names(rows) == ["A"] and rows[0]["packets"] == PACKETS_PER_FLOW
    arch = sorted(segments.packets_dir(data).glob("*.rpa"))
    flip(arch[0], 60)
    code, report = verify(capsys, data)
    assert code == 3 and kinds(report) == {("modified", arch[0].name)}


def rewrite_member(bundle: Path, name: str, change: Any) -> None:

    with tarfile.open(bundle) as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    blobs[name] = change(blobs[name])
    with tarfile.open(bundle, "w") as tar:
        for n, blob in blobs.items():
            info = tarfile.TarInfo(n)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_disclose_and_verify_bundle(capsys: pytest.CaptureFixture[str], data: Path,
                                    tmp_path: Path) -> None:
    bundle = tmp_path / "case.tar"
    code, _, err = run(capsys, "logs", "disclose", "--data-dir", str(data), "--at",
                       "2026-03-29 03:10", "--tz", "Europe/Berlin", "--dst", "203.0.113.8:80",
                       "-o", str(bundle))
    assert code == 0, err
    assert "1 sessions, 7 packets" in err
    code, out, err = run(capsys, "logs", "verify-bundle", str(bundle), "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"], report
    assert report["checked"] == {"members": 4, "packets chain links": 5,
                                 "connlog chain links": 1, "packet records": 7,
                                 "connection-log records": 2}
    code, out, err = run(capsys, "logs", "verify-bundle", str(bundle), "--data-dir",
                         str(data))
    assert code == 0, out + err
    pcap = tmp_path / "p.pcapng"
    with tarfile.open(bundle) as tar:
        pcap.write_bytes(tar.extractfile("packets.pcapng").read())  # type: ignore[union-attr]
        packets = [json.loads(x) for x in tar.extractfile("packets.jsonl")]  # type: ignore[union-attr]
    rows = tshark_fields(pcap, "tcp.dstport", "frame.comment")
    assert len(rows) == 7 and all(SID["A"] in r[1] for r in rows)
    assert {p["session_id"] for p in packets} == {SID["A"]}
    # The data directory changed since the disclosure: the bundle no longer matches it.
    flip(data / daylog.SUBDIR / "2026-03-29.jsonl", 200)
    code, out, _ = run(capsys, "logs", "verify-bundle", str(bundle), "--data-dir", str(data))
    assert code == 3 and "connlog 2026-03-29" in out
    # A member edited after the fact.
    rewrite_member(bundle, "packets.jsonl", lambda b: b.replace(b'"len": 300', b'"len": 301'))
    code, out, _ = run(capsys, "logs", "verify-bundle", str(bundle))
    assert code == 3 and "MODIFIED: packets.jsonl" in out
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"nonsense")
    code, _, err = run(capsys, "logs", "verify-bundle", str(bad))
    assert code == 2 and err.startswith("relay: error:") and err.count("\n") == 1


def test_verify_reports_a_deleted_or_replaced_segment(capsys: pytest.CaptureFixture[str],
                                                      data: Path) -> None:
    """Issue 13 item 7: a chained segment that is gone, or whose content is not the
    chained content any more, is reported with the link that chains it."""
    segs = sorted(segments.packets_dir(data).glob("*.rpl"))
    segs[0].unlink()
    segs[1].write_bytes(segs[6].read_bytes()[:100] + segs[1].read_bytes()[100:])
    code, report = verify(capsys, data)
    assert code == 3
    assert kinds(report) == {("missing", segs[0].name), ("modified", segs[1].name)}
    detail = {p["file"]: p["detail"] for p in report["problems"]}
    assert "chain link 0 (close, " in detail[segs[0].name]
    assert "no delete link" in detail[segs[0].name]
    assert "content replaced or modified since chain link 1 (close, " in detail[segs[1].name]


def test_verify_reports_a_segment_renamed_over_a_chained_one(
        capsys: pytest.CaptureFixture[str], data: Path) -> None:
    """What recovery did before it learnt not to: a second segment closed under the
    name of a chained one, its own link appended. Every file then matches its
    newest link; verify must still see that the first segment was lost."""
    first = sorted(segments.packets_dir(data).glob("*.rpl"))[0]
    link0 = chain.read_links(chain.chain_path(data, chain.PACKETS_CHAIN))[0][1]
    assert link0 is not None and link0["file"] == first.name
    # The old close: a new segment of the same period, renamed over the first.
    clock = [ts("2026-03-29 09:00:00")]
    w = segments.PacketLogWriter(data, clock=lambda: clock[0])
    recs = flow(SESSIONS["D"], SID["D"], "2026-03-29 09:00:00", "203.0.113.7", 443)
    w.write(to_c(recs), len(recs))
    seg = w._seg
    assert seg is not None
    w._seg = None
    seg.finish()
    os.rename(seg.path, first)
    segments.link_closed(seg, first, lambda: clock[0])
    code, report = verify(capsys, data)
    assert code == 3 and kinds(report) == {("replaced", first.name)}
    [problem] = report["problems"]
    assert "chain link 0 (close, " in problem["detail"] and "overwritten" in problem["detail"]


def test_torn_chain_line_is_reported_once_and_appends_go_on(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Issue 13 item 7: a crash mid-append leaves a torn last chain line. The next
    append must work, chain to the last good link, and leave the torn bytes as one
    line that verify reports."""
    clock = [ts("2026-03-29 00:00:00")]
    for seed in (1, 2):
        w = segments.PacketLogWriter(tmp_path, clock=lambda: clock[0])
        recs = flow(SESSIONS["A"], SID["A"], "2026-03-29 00:45:00", "203.0.113.7", 443 + seed)
        w.write(to_c(recs), len(recs))
        w.close()
        clock[0] += 3600
    path = chain.chain_path(tmp_path, chain.PACKETS_CHAIN)
    good = path.read_bytes()
    torn = good.splitlines(keepends=True)[-1][:40]
    path.write_bytes(good + torn)  # the third link's first 40 bytes, no newline

    w = segments.PacketLogWriter(tmp_path, clock=lambda: clock[0])
    recs = flow(SESSIONS["B"], SID["B"], "2026-03-29 02:00:00", "203.0.113.7", 443)
    w.write(to_c(recs), len(recs))
    w.close()
    lines = path.read_bytes().splitlines()
    assert lines[2] == torn
    new = json.loads(lines[3])
    assert new["n"] == 2 and new["prev"] == chain.line_digest(lines[1])
    code, report = verify(capsys, tmp_path)
    assert code == 3
    assert report["problems"] == [{
        "kind": "broken-chain", "file": "packets chain line 3",
        "detail": "not a link (after link 1): a write cut short by a crash, or an edit"}]
    assert report["checked"]["packet-log files"] == 3
