"""relay.central.directory without the network: the sans-IO request parser, the
registration checks, the list formats, score and partial lists, the records."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.central import directory as d
from relay.protocols.cstp import MAX_BODY_BYTES, MAX_HEAD_BYTES, Request


def registration(**over: Any) -> dict[str, Any]:
    body = {"id": "relay-1", "address": "198.51.100.7",
            "ports": {"cstp": 443, "openvpn-udp": 1194, "openvpn-tcp": 1194},
            "uptime_s": 3600, "sessions_active": 3, "sessions_total": 40,
            "traffic_bytes": 10 ** 9, "throughput_bps": 50_000_000,
            "operator": "Volunteer, Inc.", "message": 'say "hi"\x1b[31m',
            "country": "JP", "country_name": "Japan",
            "log_policy": {"packet_log_searchable": "14d", "connlog_keep": "90d"},
            "ovpn": "client\ndev tun\nremote 198.51.100.7 1194\n"}
    body.update(over)
    return body


def post(body: dict[str, Any] | bytes) -> Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Request("POST", d.REGISTER_PATH, {"content-length": str(len(raw))}, raw)


def get(path: str, ua: str | None = "test-agent/1.0") -> Request:
    return Request("GET", path, {"user-agent": ua} if ua else {})


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


# --- the parser ------------------------------------------------------------------------


def test_parser_reads_a_request_given_byte_by_byte() -> None:
    raw = (b"POST /api/register HTTP/1.1\r\nHost: x\r\nUser-Agent: a b\r\n"
           b"Content-Length: 4\r\n\r\nbody")
    p = d.RequestParser()
    results = [p.feed(raw[i:i + 1]) for i in range(len(raw))]
    assert results[:-1] == [None] * (len(raw) - 1)
    req = results[-1]
    assert isinstance(req, Request)
    assert (req.method, req.path, req.headers["user-agent"], req.body) == \
        ("POST", "/api/register", "a b", b"body")


def test_parser_caps_and_errors() -> None:
    def parse(raw: bytes) -> d.Request | d.HttpError | None:
        return d.RequestParser().feed(raw)

    too_long = parse(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES)
    assert isinstance(too_long, d.HttpError) and too_long.status == 431
    assert parse(b"\x16\x03\x01junk").status == 400  # type: ignore[union-attr]
    assert parse(b"GET /\x7f HTTP/1.1\r\n\r\n").status == 400  # type: ignore[union-attr]
    assert parse(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n").status == 400  # type: ignore[union-attr]
    chunked = parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert chunked.status == 411  # type: ignore[union-attr]
    big = parse(f"POST / HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode())
    assert big.status == 413  # type: ignore[union-attr]
    many = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n"
    assert parse(many).status == 431  # type: ignore[union-attr]
    assert parse(b"GET / HTTP/1.1\r\nHost: x\r\n") is None  # head still arriving


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_parser_never_raises(chunks: list[bytes]) -> None:
    p = d.RequestParser()
    for chunk in [b"GET / HTTP/1.1\r\n", *chunks]:
        p.feed(chunk)
    assert p.pending <= MAX_HEAD_BYTES + MAX_BODY_BYTES + 8 * 200 + 16


# --- registrations ---------------------------------------------------------------------


def test_registration_is_checked_against_the_certificate() -> None:
    body = json.dumps(registration()).encode()
    entry = d.parse_registration(body, "relay-1", "203.0.113.5")
    assert (entry.id, entry.ip, entry.ports["openvpn-udp"]) == ("relay-1", "198.51.100.7", 1194)
    assert entry.message == 'say "hi"[31m'  # control characters cleaned (clienttext)
    for identity, expected in ((None, "client certificate"), ("relay-2", "proves the relay id")):
        try:
            d.parse_registration(body, identity, "203.0.113.5")
        except d.RegistrationError as exc:
            assert expected in str(exc)
        else:
            raise AssertionError(f"accepted with identity {identity}")


def test_registration_with_a_host_name_lists_the_heartbeats_address() -> None:
    entry = d.parse_registration(json.dumps(registration(address="vpn.example.org")).encode(),
                                 "relay-1", "::ffff:203.0.113.5")
    assert (entry.address, entry.ip) == ("vpn.example.org", "203.0.113.5")


def test_bad_registrations_are_one_line_errors() -> None:
    bad = [b"not json", b"[1]", registration(id="../x"), registration(ports={}),
           registration(ports={"cstp": 0}), registration(ports={"ssh": 22}),
           registration(uptime_s=-1), registration(sessions_active=True),
           registration(ovpn="no remote here"), registration(ovpn="remote x 1\n" + "é"),
           registration(country="jp"), registration(log_policy={"a": 1}),
           registration(address="a b")]
    for body in bad:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            d.parse_registration(raw, "relay-1", "203.0.113.5")
        except d.RegistrationError as exc:
            assert "\n" not in str(exc)
        else:
            raise AssertionError(f"accepted {raw[:80]!r}")


# --- the directory: lists, records, expiry ------------------------------------------------


def make(tmp_path: Path, **kw: Any) -> tuple[d.Directory, Clock]:
    clock = Clock()
    return d.Directory(tmp_path, "dir-1", clock=clock, **kw), clock


def test_register_list_and_expire(tmp_path: Path) -> None:
    directory, clock = make(tmp_path, window_s=30)
    first = directory.handle(post(registration()), "198.51.100.7", 40000, "relay-1", 12)
    assert first.payload.startswith(b"HTTP/1.1 200 ")
    assert first.record is not None and first.record["action"] == "relay-register"
    clock.now += 10
    again = directory.handle(post(registration()), "198.51.100.7", 40001, "relay-1", 12)
    assert again.record is None  # a heartbeat of a listed relay writes no record
    refused = directory.handle(post(registration(id="relay-1")), "192.0.2.9", 5555,
                               "relay-9", 3)
    assert refused.payload.startswith(b"HTTP/1.1 403 ")
    assert refused.record == {"action": "relay-refused",
                              "client": {"ip": "192.0.2.9", "port": 5555},
                              "certificate_id": "relay-9", "status": 403,
                              "reason": "the certificate proves the relay id 'relay-9', "
                                        "not 'relay-1'"}
    served = directory.handle(get(d.CSV_PATH, "Agent\x1b[2J/1"), "::ffff:203.0.113.8", 61000,
                              None, None)
    rec = served.record
    assert rec is not None
    assert rec["action"] == "list-download" and rec["status"] == 200
    assert rec["client"] == {"ip": "203.0.113.8", "port": 61000}
    assert rec["user_agent"] == "Agent[2J/1"
    assert rec["served"]["relays"] == ["relay-1"] and rec["format"] == "csv"
    assert rec["served"]["bytes"] == len(served.payload.partition(b"\r\n\r\n")[2])
    clock.now += 30.5
    assert directory.expire()[0]["action"] == "relay-expire"
    assert directory.listed("203.0.113.8") == []
    assert directory.stats.registrations == {"new": 1, "refused": 1}
    assert directory.stats.heartbeats == 2 and directory.stats.expired == 1


def test_every_other_request_is_a_list_record_too(tmp_path: Path) -> None:
    directory, _ = make(tmp_path)
    for req, status in ((get("/etc/passwd"), 404),
                        (Request("DELETE", d.CSV_PATH, {}), 405),
                        (d.HttpError(408, "timeout", "slow"), 408)):
        served = directory.handle(req, "203.0.113.8", 1, None, None)
        assert served.payload.startswith(f"HTTP/1.1 {status} ".encode())
        assert served.record is not None and served.record["action"] == "list-download"
        assert served.record["status"] == status and served.record["served"] is None
    assert directory.handle(Request("GET", d.REGISTER_PATH, {}), "203.0.113.8", 1, None,
                            None).payload.startswith(b"HTTP/1.1 405 ")


def test_csv_is_what_vpn_gate_clients_parse(tmp_path: Path) -> None:
    directory, _ = make(tmp_path)
    for i in range(3):
        directory.handle(post(registration(id=f"relay-{i}", sessions_active=i)), "198.51.100.7",
                         1, f"relay-{i}", 20)
    body = directory.handle(get(d.CSV_PATH), "203.0.113.8", 1, None, None).payload
    text = body.partition(b"\r\n\r\n")[2].decode()
    lines = text.split("\r\n")
    assert lines[0] == "*vpn_servers" and lines[1] == d.CSV_HEADER
    assert lines[-2:] == ["*", ""]
    rows = lines[2:-2]
    assert len(rows) == 3
    header = lines[1][1:].split(",")
    for line in rows:  # a naive split(",") parser and the csv module agree
        assert next(csv.reader(io.StringIO(line))) == line.split(",")
        row = dict(zip(header, line.split(","), strict=True))
        assert row["Operator"] == "Volunteer_ Inc." and row["Message"] == "say 'hi'[31m"
        ovpn = base64.b64decode(row["OpenVPN_ConfigData_Base64"]).decode()
        assert "remote 198.51.100.7 1194" in ovpn
        assert (row["LogType"], row["CountryShort"], row["Ping"]) == ("2weeks", "JP", "20")
        assert row["Uptime"] == "3600000" and row["Speed"] == "50000000"
    # Score order: fewer sessions share the same throughput among fewer users.
    assert [r.split(",")[0] for r in rows] == ["relay-0", "relay-1", "relay-2"]
    js = json.loads(directory.handle(get(d.JSON_PATH), "203.0.113.8", 1, None, None)
                    .payload.partition(b"\r\n\r\n")[2])
    assert [r["id"] for r in js["relays"]] == ["relay-0", "relay-1", "relay-2"]
    assert js["relays"][0]["score"] > js["relays"][1]["score"]


def test_score_rules() -> None:
    body = json.dumps(registration(uptime_s=int(3.5 * 86400))).encode()
    base = d.parse_registration(body, "relay-1", "192.0.2.1")
    base.ping_ms = 0

    def variant(**over: Any) -> int:
        return d.score(d.RelayEntry(**{**base.__dict__, **over}))

    # 50 Mbit/s shared by 3 sessions + the newcomer, half a week up, no delay.
    assert d.score(base) == 50_000_000 // 4 // 2
    assert variant(uptime_s=0.0) == int(50_000_000 / 4 * d.MIN_STABILITY)
    assert variant(uptime_s=30 * 86400.0) == 50_000_000 // 4  # stability capped at 1
    assert variant(ping_ms=100) == 50_000_000 // 4 // 2 // 2
    assert variant(sessions_active=99) == 50_000_000 // 100 // 2
    assert variant(throughput_bps=None) == d.DEFAULT_SPEED_BPS // 4 // 2


def test_partial_lists_differ_by_network_and_hold_for_a_day(tmp_path: Path) -> None:
    directory, clock = make(tmp_path, partial_n=3)
    assert (tmp_path / d.PARTIAL_KEY_FILE).stat().st_mode & 0o777 == 0o600
    for i in range(12):
        directory.handle(post(registration(id=f"relay-{i:02d}")), "198.51.100.7", 1,
                         f"relay-{i:02d}", 5)

    def ids(ip: str) -> set[str]:
        return {e.id for e in directory.listed(ip)}

    seen = ids("203.0.113.8")
    assert len(seen) == 3
    assert ids("203.0.113.200") == seen  # the same /24
    others = [ids(f"198.18.{n}.1") for n in range(10)]
    assert any(o != seen for o in others)
    assert len(set().union(*others, seen)) > 3
    clock.now += 86400
    assert any(ids(f"198.18.{n}.1") != o for n, o in enumerate(others))
    again = d.Directory(tmp_path, "dir-1", clock=clock, partial_n=3)  # same key file
    again.relays = directory.relays
    assert {e.id for e in again.listed("203.0.113.8")} == ids("203.0.113.8")


def test_snapshot_has_no_ovpn_and_escapes_nothing_away(tmp_path: Path) -> None:
    directory, _ = make(tmp_path)
    directory.handle(post(registration()), "198.51.100.7", 1, "relay-1", 5)
    snap = json.loads(directory.snapshot())
    assert snap["relays"][0]["id"] == "relay-1" and "ovpn" not in snap["relays"][0]
    assert snap["relays"][0]["age_s"] == 0


# --- [directory] config and relay logs access ---------------------------------------------


def test_directory_config_errors_are_one_line_naming_the_key() -> None:
    from relay import config as configmod

    good = {"url": "https://dir.example.org:8443", "cert": "c.pem", "key": "c.key"}
    assert configmod.from_dict({"directory": good}).directory.heartbeat == "60s"
    for over, key in (({"url": "http://dir.example.org"}, "[directory] url"),
                      ({"url": "https://dir/path"}, "[directory] url"),
                      ({"heartbeat": "0s"}, "[directory] heartbeat"),
                      ({"heartbeat": "soon"}, "[directory] heartbeat"),
                      ({"cert": ""}, "[directory] cert"),
                      ({"address": "a b"}, "[directory] address"),
                      ({"country": "Japan"}, "[directory] country"),
                      ({"operator": "x\n"}, "[directory] operator"),
                      ({"message": "m" * 257}, "[directory] message")):
        with pytest.raises(configmod.ConfigError) as exc:
            configmod.from_dict({"directory": {**good, **over}})
        assert str(exc.value).startswith(key) and "\n" not in str(exc.value)


def test_access_search_by_time_and_address(tmp_path: Path) -> None:
    from relay.connlog import daylog
    from relay.investigate.access import search_access

    clock = Clock()
    log = daylog.ConnectionLog(tmp_path, clock=clock)
    directory = d.Directory(tmp_path, "dir-1", clock=clock)
    for i, ip in enumerate(("203.0.113.8", "::ffff:203.0.113.9", "203.0.113.8")):
        clock.now = 1_800_000_000.0 + 3600 * i
        served = directory.handle(get(d.CSV_PATH, f"agent-{i}"), ip, 1000 + i, None, None)
        assert served.record is not None
        log.append(served.record)
    log.append({"action": "connect", "client": {"ip": "203.0.113.8", "port": 1}})  # not access
    log.close()
    errors: list[str] = []
    at = 1_800_000_000.0 + 3600 * 2

    def found(**kw: Any) -> list[str | None]:
        return [r.get("user_agent") for r in search_access(tmp_path, on_error=errors.append,
                                                           **kw)]

    assert found(lo=None, hi=None, client_ip="203.0.113.8") == ["agent-0", "agent-2"]
    assert found(lo=at - 60, hi=at + 60, client_ip="203.0.113.8") == ["agent-2"]
    assert found(lo=None, hi=None, client_ip="203.0.113.9") == ["agent-1"]
    assert found(lo=at + 61, hi=None, client_ip=None) == []
    assert errors == []


def test_the_rendered_list_follows_every_change(tmp_path: Path) -> None:
    directory, clock = make(tmp_path, window_s=30)

    def csv_rows() -> list[str]:
        body = directory.handle(get(d.CSV_PATH), "203.0.113.8", 1, None, None).payload
        return body.partition(b"\r\n\r\n")[2].decode().split("\r\n")[2:-2]

    assert csv_rows() == []
    directory.handle(post(registration(sessions_active=1)), "198.51.100.7", 1, "relay-1", 5)
    assert csv_rows()[0].split(",")[7] == "1"
    assert csv_rows() is not None and directory.version == 1  # served from the cache
    directory.handle(post(registration(sessions_active=9)), "198.51.100.7", 1, "relay-1", 5)
    assert csv_rows()[0].split(",")[7] == "9"
    clock.now += 31
    directory.expire()
    assert csv_rows() == []
