"""The forwarder as a real process: rsyslog interop, kill/restart, wrong CA, confirmation."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import zstandard
from shiputil import (
    WAIT_S,
    Writer,
    free_port,
    hostile_record,
    rsyslog_global,
    start_collector,
    start_forwarder,
    start_rsyslog,
    stored_ids,
    wait_shipped,
    wait_until,
    write_records,
)

from relay import config
from relay.connlog import daylog, reader
from relay.connlog.forwarder import (
    ACK_ALPN,
    CONFIRM_ALPN,
    MAX_IN_FLIGHT,
    PIPELINE_BATCH_BYTES,
    Position,
    load_position,
    make_forwarder,
    run_forwarder,
    ship_status,
)
from relay.connlog.retention import apply_retention
from relay.connlog.shipping import Shipping
from relay.protocols import syslog5424 as s5


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
        status = wait_shipped(relay)
        wait_until(lambda: out.exists() and len(out.read_bytes().splitlines()) >= 500,
                   what="rsyslog output")
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
            status = wait_shipped(relay)
        finally:
            collector.stop()
    finally:
        fwd.stop()
    assert sorted(stored_ids(stored)) == sorted(r["id"] for r in records)
    assert status["last_success"] and status["consecutive_failures"] == 0
    assert status["confirmation"] == "ack"  # relay collector acknowledges each batch


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
    """A TLS receiver that reads everything, then closes TCP without close_notify,
    or with it (a confirmation) when ``confirm`` says so of the messages read."""

    def __init__(self, pki, alpn: bool,
                 confirm: Callable[[list[bytes]], bool] | None = None) -> None:
        super().__init__(daemon=True)
        self.confirm = confirm
        self.confirmed: list[bytes] = []
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
                    messages = s5.FrameParser(s5.COLLECTOR_MAX_MESSAGE_SIZE).feed(data)
                    self.messages += len(messages)
                    self.connections += 1
                    if self.confirm is not None and self.confirm(messages):
                        self.confirmed += messages
                        tls.unwrap()  # our close_notify: the batch is confirmed
                    # Else leaving the with-block closes the socket: FIN, no close_notify.
            except (OSError, ssl.SSLError):
                continue
        self.sock.close()


class AckReceiver(threading.Thread):
    """relay collector's side of ACK_ALPN, scripted: it acknowledges nothing
    until ``hold`` batch marks have arrived on a connection (a forwarder that
    waited for each ack would stall there), then each mark as it comes; its
    first connection, with ``drop_after``, is closed right after that many
    acks, with batches still unacknowledged."""

    def __init__(self, pki, hold: int, drop_after: int | None = None) -> None:
        super().__init__(daemon=True)
        self.hold, self.drop_after = hold, drop_after
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki.server_cert, pki.server_key)
        self.ctx.set_alpn_protocols([ACK_ALPN])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.received: list[str] = []  # record ids, in arrival order, resends too
        self.confirmed: list[str] = []  # the ids of acknowledged batches
        self.marks_before_first_ack: list[int] = []  # per connection
        self.connections = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.serve(tls)
            except (OSError, ssl.SSLError):
                continue
        self.sock.close()

    def serve(self, tls: ssl.SSLSocket) -> None:
        parser = s5.FrameParser(s5.COLLECTOR_MAX_MESSAGE_SIZE)
        batches: list[list[str]] = []
        current: list[str] = []
        acked = 0
        first = self.connections == 1
        while chunk := tls.recv(65536):
            for message in parser.feed(chunk):
                seq = s5.batch_seq(message)
                if seq is None:
                    rid = s5.relay_record(s5.parse_message(message))["id"]
                    current.append(rid)
                    self.received.append(rid)
                    continue
                assert seq == len(batches) + 1
                batches.append(current)
                current = []
                if len(batches) < self.hold and acked == 0:
                    continue
                if acked == 0:
                    self.marks_before_first_ack.append(len(batches))
                while acked < len(batches):
                    acked += 1
                    self.confirmed += batches[acked - 1]
                    tls.sendall(s5.format_ack(acked))
                    if first and self.drop_after == acked:
                        return  # closed with batches in flight
        if current or acked < len(batches):
            # The sender closed before acks it waits for: never happens.
            self.marks_before_first_ack.append(-1)


def ack_records(relay: Path, n: int) -> list[str]:
    """``n`` records of ~1.4 kB: a few pipelined batches of PIPELINE_BATCH_BYTES."""
    log = daylog.ConnectionLog(relay)
    try:
        return [log.append({**hostile_record(i), "padding": "p" * 1000})["id"]
                for i in range(n)]
    finally:
        log.close()


def test_several_batches_are_in_flight_before_the_first_ack(tmp_path: Path, pki) -> None:
    receiver = AckReceiver(pki, hold=MAX_IN_FLIGHT)
    receiver.start()
    relay = tmp_path / "relay"
    ids = ack_records(relay, 4000)
    fwd = start_forwarder(tmp_path, relay, receiver.port, pki)
    try:
        status = wait_shipped(relay)
    finally:
        fwd.stop()
        receiver.stop.set()
        receiver.join()
    assert status["confirmation"] == "ack" and status["consecutive_failures"] == 0
    # One connection, the whole window sent before the first ack came back.
    assert receiver.connections == 1
    assert receiver.marks_before_first_ack == [MAX_IN_FLIGHT]
    assert receiver.received == receiver.confirmed == ids


def test_batches_in_flight_when_the_connection_drops_are_sent_again(
        tmp_path: Path, pki) -> None:
    receiver = AckReceiver(pki, hold=3, drop_after=1)
    receiver.start()
    relay = tmp_path / "relay"
    ids = ack_records(relay, 4000)
    fwd = start_forwarder(tmp_path, relay, receiver.port, pki)
    try:
        wait_until(lambda: ship_status(relay)["backlog_records"] == 0, what="all acknowledged")
    finally:
        fwd.stop()
        receiver.stop.set()
        receiver.join()
    assert receiver.connections >= 2
    # Nothing lost, in order; resent: at most the window in flight when the
    # connection dropped (its ack may be lost with it: at least once, not
    # exactly once), each batch whole, the duplicates the collector drops.
    assert sorted(set(receiver.received)) == sorted(ids)
    assert list(dict.fromkeys(receiver.confirmed)) == ids
    resent = len(receiver.received) - len(ids)
    per_batch = len(ids) * PIPELINE_BATCH_BYTES // ship_status(relay)["position"]["offset"]
    assert 0 < resent <= (MAX_IN_FLIGHT + 1) * per_batch


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
            assert wait_shipped(relay)["confirmation"] == "fin"
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


# -- shipping is never stopped by one record (issue 13 item 5) ---------------------


def shipped_ids(messages: list[bytes]) -> list[str]:
    return [s5.relay_record(s5.parse_message(m))["id"] for m in messages]


def test_a_record_the_collector_refuses_is_set_aside_and_shipping_goes_on(
        tmp_path: Path, pki) -> None:
    relay = tmp_path / "relay"
    records = write_records(relay, 40)
    poison = records[13]["id"]
    receiver = FakeReceiver(pki, alpn=True,
                            confirm=lambda msgs: poison not in shipped_ids(msgs))
    receiver.start()
    fwd = start_forwarder(tmp_path, relay, receiver.port, pki)
    try:
        # Every other record, and the audit record of the set-aside after them.
        wait_until(lambda: {r["id"] for r in records} - {poison}
                   <= set(shipped_ids(receiver.confirmed)), what="the other records")
        audit = wait_until(lambda: [m for m in receiver.confirmed
                                    if b"ship-set-aside" in m], what="the audit record")
        status = wait_until(lambda: (st := ship_status(relay))["backlog_records"] == 0
                            and st, what="an empty backlog")
    finally:
        fwd.stop()
        receiver.stop.set()
        receiver.join()
    assert poison not in shipped_ids(receiver.confirmed)
    path = relay / "ship" / "set-aside.jsonl"
    assert path.stat().st_mode & 0o777 == 0o600
    [entry] = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert entry["reason"] == "refused-by-collector" and entry["record"] == records[13]
    [rec] = [s5.relay_record(s5.parse_message(m)) for m in audit]
    assert rec["count"] == 1 and rec["records"][0]["id"] == poison
    assert status["set_aside"] == 1
    assert "sending" in fwd.log() and "at a time to find the record" in fwd.log()


def test_a_collector_that_refuses_everything_gets_nothing_set_aside(
        tmp_path: Path, pki) -> None:
    relay = tmp_path / "relay"
    write_records(relay, 6)
    receiver = FakeReceiver(pki, alpn=True, confirm=lambda msgs: False)
    receiver.start()
    fwd = start_forwarder(tmp_path, relay, receiver.port, pki)
    try:
        # 6 -> 3 -> 1 records, three refusals each, then the probe of the next one.
        wait_until(lambda: "refuses everything for now" in fwd.log(), what="the probe")
    finally:
        fwd.stop()
        receiver.stop.set()
        receiver.join()
    assert not (relay / "ship" / "set-aside.jsonl").exists()
    assert load_position(relay) == Position()
    assert ship_status(relay)["backlog_records"] == 6


def test_lines_that_are_not_this_relays_records_are_set_aside(tmp_path: Path, pki) -> None:
    relay = tmp_path / "relay"
    records = write_records(relay, 3)
    [day_file] = (relay / "connlog").iterdir()
    other = {**records[0], "id": "f" * 24, "server": {"id": "relay-9"}}
    with open(day_file, "ab") as f:
        f.write(b"not json\n" + b'{"id":"x","a":' + b"[" * 20 + b"]" * 20 + b"}\n"
                + json.dumps(other).encode() + b"\n")
    later = write_records(relay, 2, start=3)
    receiver = FakeReceiver(pki, alpn=True, confirm=lambda msgs: True)
    receiver.start()
    fwd = start_forwarder(tmp_path, relay, receiver.port, pki)
    try:
        wait_until(lambda: len(receiver.confirmed) >= 6, what="the records and the audit")
    finally:
        fwd.stop()
        receiver.stop.set()
        receiver.join()
    got = [s5.relay_record(s5.parse_message(m)) for m in receiver.confirmed]
    assert [r["id"] for r in got[:5]] == [r["id"] for r in records + later]
    assert got[5]["action"] == "ship-set-aside" and got[5]["count"] == 3
    entries = [json.loads(x) for x in (relay / "ship" / "set-aside.jsonl").read_bytes()
               .splitlines()]
    assert [e["reason"] for e in entries] == ["not-a-record", "not-a-record",
                                              "other-server-id"]
    assert entries[0]["line"] == "not json" and entries[2]["record"] == other
    assert "nested deeper" in entries[1]["detail"]


# -- no stalls on the event loop (issue 13 item 10) --------------------------------


def compressed_backlog(relay: Path, days: int, per_day: int) -> int:
    """``days`` finished days, compressed as retention leaves them, and today's
    records; returns how many records wait."""
    now = time.time()
    for n in range(days, -1, -1):
        log = daylog.ConnectionLog(relay, clock=lambda n=n: now - n * 86400)
        for i in range(per_day):
            log.append(hostile_record(i))
        log.close()
    apply_retention(relay / "connlog", clock=lambda: now, compress_after_days=0)
    assert len(list((relay / "connlog").glob("*.zst"))) == days
    return (days + 1) * per_day


def test_a_compressed_backlog_is_never_decompressed_on_the_event_loop(
        tmp_path: Path, pki, monkeypatch: pytest.MonkeyPatch) -> None:
    relay = tmp_path / "relay"
    total = compressed_backlog(relay, 3, 200)
    real = zstandard.ZstdDecompressor
    threads: list[bool] = []  # per decompressor made: on the loop's thread?

    def spy(*args: object, **kwargs: object) -> zstandard.ZstdDecompressor:
        threads.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(zstandard, "ZstdDecompressor", spy)
    receiver = FakeReceiver(pki, alpn=True, confirm=lambda msgs: True)
    receiver.start()
    cfg = SimpleNamespace(collector=f"localhost:{receiver.port}", ca=str(pki.ca), cert="",
                          key="")
    fwd = make_forwarder(cfg, relay, "relay-1", lambda record: None, backoff_max=1.0)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_forwarder(fwd, stop))
        deadline = time.monotonic() + WAIT_S
        while len(receiver.confirmed) < total and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await task

    try:
        asyncio.run(main())
    finally:
        receiver.stop.set()
        receiver.join()
    assert len(receiver.confirmed) == total
    assert threads and not any(threads), "decompressed on the event loop's thread"


def test_metrics_read_counters_not_files(tmp_path: Path, pki,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A scrape costs O(1): the shipping gauges come from the forwarder's
    counters, kept as it works, with no file opened or listed."""
    relay = tmp_path / "relay"
    total = compressed_backlog(relay, 2, 50)
    cfg = config.load(None).with_data_dir(relay)
    cfg = dataclasses.replace(cfg, forward=dataclasses.replace(
        cfg.forward, collector=f"127.0.0.1:{free_port()}", ca=str(pki.ca)))  # nobody there

    def no_files(*args: object, **kwargs: object) -> None:
        raise AssertionError("a scrape touched the disk")

    async def main() -> dict[str, float]:
        shipping = Shipping(cfg, lambda record: None)
        shipping.start()
        assert shipping.forwarder is not None
        deadline = time.monotonic() + WAIT_S
        status = shipping.forwarder.status
        # The backlog counted and the first attempt failed (nobody listens): in
        # either order.
        while (status["backlog_records"] < total or not status.get("consecutive_failures")) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with monkeypatch.context() as m:
            for name in ("open", "stat", "scandir", "listdir"):
                m.setattr(os, name, no_files)
            m.setattr("builtins.open", no_files)
            got = {metric.name: metric.samples[0][1] for metric in shipping.metrics()}
        await shipping.close()
        return got

    got = asyncio.run(main())
    assert got["relay_ship_backlog_records"] == total
    assert got["relay_ship_backlog_bytes"] == sum(
        len(b) for b in connlog_bytes(relay))
    assert got["relay_ship_last_success_timestamp_seconds"] == 0
    assert got["relay_ship_consecutive_failures"] >= 1
    assert got["relay_ship_set_aside_total"] == 0


def connlog_bytes(relay: Path) -> list[bytes]:
    return [reader.uncompressed(p) if p.name.endswith(".zst") else p.read_bytes()
            for p in (relay / "connlog").iterdir()]


class Dropper(threading.Thread):
    """A TLS receiver that reads a little of each batch, then closes TCP: the
    forwarder is still writing (a collector refusing a frame does the same)."""

    def __init__(self, pki) -> None:
        super().__init__(daemon=True)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki.server_cert, pki.server_key)
        self.ctx.set_alpn_protocols([CONFIRM_ALPN])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.connections = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1024)
                    self.connections += 1
                    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                   struct.pack("ii", 1, 0))  # RST on close
            except (OSError, ssl.SSLError):
                continue
        self.sock.close()


def test_a_connection_dropped_mid_batch_is_a_failure_not_the_end(tmp_path: Path, pki) -> None:
    relay = tmp_path / "relay"
    write_records(relay, 3000)
    receiver = Dropper(pki)
    receiver.start()
    fwd = start_forwarder(tmp_path, relay, receiver.port, pki)
    try:
        wait_until(lambda: receiver.connections >= 4, what="repeated attempts")
        assert fwd.p.poll() is None
    finally:
        fwd.stop()
        receiver.stop.set()
        receiver.join()
    assert "shipping task failed" not in fwd.log() and "Traceback" not in fwd.log()
    assert "batch not confirmed" in fwd.log()
