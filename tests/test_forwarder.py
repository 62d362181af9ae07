"""The forwarder as a real process: rsyslog interop, kill/restart, wrong CA, confirmation."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from pathlib import Path

import pytest
from shiputil import (
    Writer,
    free_port,
    rsyslog_global,
    start_collector,
    start_forwarder,
    start_rsyslog,
    stored_ids,
    wait_until,
    write_records,
)

from relay import syslog5424 as s5
from relay.forwarder import CONFIRM_ALPN, Position, load_position, ship_status


def test_rsyslog_receives_every_record_field_by_field(tmp_path: Path, pki) -> None:
    """Interop with a stock RFC 5425 receiver: Debian's rsyslogd with imtcp + gtls."""
    port = free_port()
    out = tmp_path / "rsyslog-out.log"
    conf = rsyslog_global(tmp_path, pki) + f"""
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode="anon")
input(type="imtcp" port="{port}" address="127.0.0.1")
action(type="omfile" file="{out}" template="RSYSLOG_SyslogProtocol23Format")
"""
    rsyslog = start_rsyslog(tmp_path, conf, [port])
    relay = tmp_path / "relay"
    records = write_records(relay, 500)
    fwd = start_forwarder(tmp_path, relay, port, pki)
    try:
        wait_until(lambda: ship_status(relay)["backlog_records"] == 0, what="backlog drained")
        wait_until(lambda: out.exists() and len(out.read_bytes().splitlines()) >= 500,
                   what="rsyslog output")
        status = ship_status(relay)
    finally:
        fwd.stop()
        rsyslog.stop()
    lines = out.read_bytes().splitlines()
    # A stock receiver confirms by a clean FIN after our close_notify: no resends.
    assert len(lines) == 500, rsyslog.log()
    assert status["confirmation"] == "fin" and status["records_sent"] == 500
    assert status["last_error"] is None and status["state"] == "idle"
    for rec, line in zip(records, lines, strict=True):
        got = s5.parse_message(line)
        want = s5.parse_message(s5.format_record(rec, hostname="relay-1",
                                                 procid=got.procid or "-"))
        assert (got.facility, got.severity, got.version) == (16, want.severity, 1)
        assert got.severity == (6 if rec["action"] in ("connect", "disconnect") else 5)
        assert (got.hostname, got.app_name, got.msgid) == ("relay-1", "relay", rec["action"])
        assert got.procid == str(fwd.p.pid)
        assert got.timestamp is not None and got.timestamp[:23] == rec["time"][:23]
        assert got.sd == want.sd  # every flattened field, escaped hostile strings included
        assert got.sd["relay@32473"]["id"] == rec["id"]
        assert got.sd["relay@32473"]["client.hostname"].startswith('evil"] [relay@32473')
        assert s5.relay_record(got) == rec  # the JSON copy, exactly


def test_forwarder_killed_and_restarted_mid_stream(tmp_path: Path, pki) -> None:
    port = free_port()
    collector = start_collector(tmp_path, port, pki)
    relay = tmp_path / "relay"
    stored = tmp_path / "collector" / "relay-1"
    writer = Writer(relay, 10_000)
    fwd = start_forwarder(tmp_path, relay, port, pki)
    writer.start()
    try:
        wait_until(lambda: len(stored_ids(stored)) > 2000, what="first records")
        fwd.kill()  # SIGKILL, mid-stream: the writer is still appending
        fwd = start_forwarder(tmp_path, relay, port, pki)
        writer.join()
        wait_until(lambda: len(stored_ids(stored)) >= 10_000, what="all 10,000 records")
        wait_until(lambda: ship_status(relay)["backlog_records"] == 0, what="backlog 0")
    finally:
        fwd.stop()
        collector.stop()
    ids = stored_ids(stored)
    assert len(ids) == 10_000 == len(set(ids))  # none lost, duplicates removed
    assert set(ids) == {r["id"] for r in writer.records}
    assert read_back_equal(stored, writer.records)


def read_back_equal(stored: Path, records: list[dict]) -> bool:
    from shiputil import read_day_dir

    by_id = {r["id"]: r for r in read_day_dir(stored)}
    return all(by_id[r["id"]] == r for r in records)


def test_wrong_ca_collector_is_refused_and_records_wait(tmp_path: Path, pki) -> None:
    port = free_port()
    impostor = start_collector(tmp_path, port, pki, cert=pki.wrong_server_cert,
                               key=pki.wrong_server_key)
    relay = tmp_path / "relay"
    records = write_records(relay, 300)
    fwd = start_forwarder(tmp_path, relay, port, pki)
    stored = tmp_path / "collector" / "relay-1"
    try:
        status = wait_until(
            lambda: (s := ship_status(relay)).get("last_error")
            and "certificate verify failed" in s["last_error"] and s,
            what="verify failure in status")
        assert status["backlog_records"] == 300 and status["running"]
        assert status["last_success"] is None and status["consecutive_failures"] >= 1
        # The status file and the log line are written one after the other.
        wait_until(lambda: "certificate verify failed" in fwd.log(), what="refusal in the log")
        wait_until(lambda: "refused: TLS handshake failed" in impostor.log(),
                   what="refusal in the collector's log")
        assert stored_ids(stored) == []
        impostor.stop()
        collector = start_collector(tmp_path, port, pki)
        try:
            wait_until(lambda: len(stored_ids(stored)) >= 300, what="records after fix")
            wait_until(lambda: ship_status(relay)["consecutive_failures"] == 0, what="status")
        finally:
            collector.stop()
    finally:
        fwd.stop()
    assert sorted(stored_ids(stored)) == sorted(r["id"] for r in records)
    status = ship_status(relay)
    assert status["backlog_records"] == 0 and status["last_success"]
    assert status["confirmation"] == "close_notify"


def test_collector_name_is_checked(tmp_path: Path, pki) -> None:
    """The certificate names 127.0.0.1 and localhost; 127.0.0.2 is someone else."""
    port = free_port()
    collector = start_collector(tmp_path, port, pki, host="127.0.0.2")
    relay = tmp_path / "relay"
    write_records(relay, 3)
    fwd = start_forwarder(tmp_path, relay, port, pki, host="127.0.0.2")
    try:
        status = wait_until(lambda: (s := ship_status(relay)).get("last_error") and s,
                            what="an error")
    finally:
        fwd.stop()
        collector.stop()
    assert "IP address mismatch" in status["last_error"]
    assert status["backlog_records"] == 3


class FakeReceiver(threading.Thread):
    """A TLS receiver that reads everything, then closes TCP without close_notify."""

    def __init__(self, pki, alpn: bool) -> None:
        super().__init__(daemon=True)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki.server_cert, pki.server_key)
        if alpn:  # claims to be relay collector, whose close_notify confirms
            self.ctx.set_alpn_protocols([CONFIRM_ALPN])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.connections = 0
        self.messages = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    data = b""
                    while chunk := tls.recv(65536):  # b"" at the peer's close_notify
                        data += chunk
                    self.messages += len(s5.FrameParser().feed(data))
                    self.connections += 1
                    # Leaving the with-block closes the socket: FIN, no close_notify.
            except (OSError, ssl.SSLError):
                continue
        self.sock.close()


@pytest.mark.parametrize("alpn", [True, False], ids=["relay-collector", "stock-receiver"])
def test_confirmation_rules(tmp_path: Path, pki, alpn: bool) -> None:
    receiver = FakeReceiver(pki, alpn)
    receiver.start()
    relay = tmp_path / "relay"
    write_records(relay, 20)
    fwd = start_forwarder(tmp_path, relay, receiver.port, pki)
    try:
        if alpn:
            # Everything read, but never confirmed: sent again and again, the
            # position never moves.
            wait_until(lambda: receiver.connections >= 3, what="resends")
            status = ship_status(relay)
            assert load_position(relay) == Position()
            assert status["backlog_records"] == 20 and status["last_success"] is None
            assert "without TLS close_notify" in status["last_error"]
        else:
            wait_until(lambda: ship_status(relay)["backlog_records"] == 0, what="confirmed")
            assert ship_status(relay)["confirmation"] == "fin"
            assert receiver.connections == 1
    finally:
        fwd.stop()
        receiver.stop.set()
        receiver.join()
    assert receiver.messages == 20 * receiver.connections


def test_status_without_a_running_forwarder(tmp_path: Path) -> None:
    relay = tmp_path / "relay"
    assert ship_status(relay)["state"] == "never-run"
    write_records(relay, 7)
    status = ship_status(relay)
    assert status["backlog_records"] == 7 and status["running"] is False
    assert status["backlog_bytes"] == sum(
        p.stat().st_size for p in (relay / "connlog").iterdir())
    json.dumps(status)
