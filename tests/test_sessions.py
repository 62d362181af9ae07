"""The connect and disconnect records, built beside the session
(relay.serve.sessions.connect_record / disconnect_record). The exact bytes the
relay writes with them are pinned in tests/test_core.py."""

from __future__ import annotations

from typing import Any

from relay import sessionid
from relay.serve.hotpath import Destination
from relay.serve.sessions import (
    COUNTER_KEYS,
    Session,
    connect_record,
    disconnect_record,
)

SID = sessionid.new()


def session() -> Session:
    return Session(SID, b"\x02" * 6, "10.211.0.2", "198.51.100.7", 51515, "OpenVPN")


def logged_connect() -> dict[str, Any]:
    """A connect record as the connection log returns it (id and time stamped)."""
    rec = connect_record(session(), server_id="relay-1", server_ip="192.0.2.1",
                         server_hostname="relay.test", client_hostname=None,
                         software={"name": "openvpn", "version": "2.6.3"})
    return {"id": "r1", "time": "2026-11-25T21:05:32.123Z", **rec}


def test_connect_record_has_the_format_fields_in_order_and_cleans_client_text() -> None:
    rec = connect_record(session(), server_id="relay-1", server_ip="192.0.2.1",
                         server_hostname=None, client_hostname="c.example",
                         software={"name": "Evil\tClient\x1b[2J\u202e", "id": None})
    assert list(rec) == ["action", "session_id", "server", "client", "protocol",
                         "data_channel", "client_software", "virtual_ip"]
    assert rec == {
        "action": "connect", "session_id": SID,
        "server": {"id": "relay-1", "ip": "192.0.2.1", "hostname": None},
        "client": {"ip": "198.51.100.7", "port": 51515, "hostname": "c.example"},
        "protocol": "OpenVPN", "data_channel": None,
        "client_software": {"name": "Evil Client[2J", "id": None},
        "virtual_ip": "10.211.0.2"}


def test_disconnect_record_repeats_the_connect_and_adds_counters_and_end() -> None:
    s = session()
    s.packets_in, s.bytes_out = 5, 700
    s.add_destination(Destination("example.com", "93.184.216.34", 443, "https"))
    connect = logged_connect()
    rec = disconnect_record(connect, s.counters(), reason="idle-timeout", error=None,
                            end_time=1795640742.623, client_hostname="late.example")
    assert list(rec) == ["action", "session_id", "server", "client", "protocol",
                         "data_channel", "client_software", "virtual_ip", "connect_time",
                         *COUNTER_KEYS,
                         "duration_s", "reason", "error"]
    assert rec["action"] == "disconnect" and rec["session_id"] == SID
    assert rec["connect_time"] == "2026-11-25T21:05:32.123Z"
    assert rec["duration_s"] == 10.5
    assert rec["packets"] == {"in": 5, "out": 0} and rec["bytes"] == {"in": 0, "out": 700}
    assert rec["destinations"] == [{"host": "example.com", "ip": "93.184.216.34",
                                    "port": 443, "scheme": "https"}]
    assert rec["client"]["hostname"] == "late.example"
    # The connect record (the session's, journalled) is not changed through the copy.
    assert connect["client"]["hostname"] is None


def test_the_data_channel_is_in_the_connect_record_and_repeated_at_disconnect() -> None:
    rec = connect_record(session(), server_id="relay-1", server_ip="192.0.2.1",
                         server_hostname=None, client_hostname=None, software={},
                         data_channel="DTLS")
    assert rec["data_channel"] == "DTLS"
    logged = {"id": "r1", "time": "2026-11-25T21:05:32.123Z", **rec}
    end = disconnect_record(logged, session().counters(), reason="r", error=None,
                            end_time=1795640742.623)
    assert end["data_channel"] == "DTLS"


def test_session_counters_are_the_disconnect_records_counters() -> None:
    assert tuple(session().counters()) == COUNTER_KEYS


def test_a_restart_keeps_the_connect_hostname_and_tolerates_a_damaged_journal() -> None:
    connect = {**logged_connect(), "client": {"ip": "198.51.100.7", "port": 51515,
                                              "hostname": "c.example"}}
    rec = disconnect_record(connect, {"packets": {"in": 1, "out": 2}}, reason="relay-restart",
                            error="killed", end_time=1795640733.0)
    assert rec["client"]["hostname"] == "c.example"
    assert rec["bytes"] is None and rec["destinations"] is None  # not in the journal
    # A journal edited or damaged on disk: values copied as they are, nothing raised.
    odd = disconnect_record({"session_id": 7, "client": "x"}, {}, reason="relay-restart",
                            error=None, end_time=1.0)
    assert odd["client"] == "x" and odd["connect_time"] is None and odd["duration_s"] == 0
