"""relay collector as a real process: rsyslog forwarding to it, SIGKILL mid-stream,
client certificates, duplicates, other senders; retention in-process."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from shiputil import (
    Writer,
    free_port,
    hostile_record,
    read_day_dir,
    rsyslog_global,
    start_collector,
    start_forwarder,
    start_rsyslog,
    stored_ids,
    wait_until,
    write_records,
)

from relay import syslog5424 as s5
from relay.collector import Collector, Counts
from relay.connlog import rfc3339_ms
from relay.forwarder import ship_status


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def tls_send(port: int, data: bytes, ctx: ssl.SSLContext) -> None:
    """Send, then close with close_notify and wait for the collector's."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(data)
        tls.unwrap()


def client_ctx(pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def relay_frames(records: list[dict]) -> bytes:
    return b"".join(s5.frame(s5.format_record(r, hostname="relay-1")) for r in records)


def test_rsyslog_forwards_to_collector(tmp_path: Path, pki) -> None:
    """forwarder -> rsyslogd (imtcp gtls) -> omfwd gtls octet-counted -> collector
    requiring client certificates; plain senders' messages go the same way."""
    cport, tport, pport = free_port(), free_port(), free_port()
    collector = start_collector(tmp_path, cport, pki, require_client_cert=True)
    conf = rsyslog_global(tmp_path, pki) + f"""
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode="anon")
input(type="imtcp" port="{tport}" address="127.0.0.1")
module(load="imptcp")
input(type="imptcp" port="{pport}" address="127.0.0.1")
action(type="omfwd" target="127.0.0.1" port="{cport}" protocol="tcp"
       streamDriver="gtls" streamDriverMode="1" streamDriverAuthMode="x509/name"
       streamDriverPermittedPeers="collector.test" tcp_framing="octet-counted"
       template="RSYSLOG_SyslogProtocol23Format")
"""
    rsyslog = start_rsyslog(tmp_path, conf, [tport, pport])
    relay = tmp_path / "relay"
    records = write_records(relay, 300)
    fwd = start_forwarder(tmp_path, relay, tport, pki)
    stored = tmp_path / "collector" / "relay-1"
    others = tmp_path / "collector" / "@syslog"
    try:
        with socket.create_connection(("127.0.0.1", pport)) as plain:
            plain.sendall(b'<14>1 2026-11-25T10:00:00.5Z plainhost myapp 77 ID1 '
                          b'[ex@32473 k="v\\"q"] hello world\n'
                          b"<13>Nov 25 12:00:00 oldhost legacy: an RFC 3164 line\n")
        wait_until(lambda: len(stored_ids(stored)) >= 300, what="records via rsyslog")
        wait_until(lambda: len(read_day_dir(others / "oldhost")) >= 1, what="plain senders")
    finally:
        fwd.stop()
        rsyslog.stop()
        collector.stop()
    got = read_day_dir(stored)
    assert got == records  # field by field, in order, no duplicates
    [plain] = read_day_dir(others / "plainhost")
    assert (plain["app_name"], plain["procid"], plain["msgid"]) == ("myapp", "77", "ID1")
    assert (plain["facility"], plain["severity"]) == (1, 6)
    assert plain["sd"] == {"ex@32473": {"k": 'v"q'}}
    assert plain["msg"] == "hello world" and plain["peer"].startswith("127.0.0.1:")
    [legacy] = read_day_dir(others / "oldhost")
    assert "an RFC 3164 line" in legacy["msg"]
    log = collector.log()
    assert "connected (TLS, client certificate CN=collector.test)" in log
    assert "refused" not in log.split("listening", 1)[1].replace(
        "refused: TLS handshake failed: ConnectionResetError", "")  # the port probe only


def test_collector_killed_and_restarted_mid_stream(tmp_path: Path, pki) -> None:
    port = free_port()
    collector = start_collector(tmp_path, port, pki)
    relay = tmp_path / "relay"
    stored = tmp_path / "collector" / "relay-1"
    writer = Writer(relay, 10_000)
    fwd = start_forwarder(tmp_path, relay, port, pki)
    writer.start()
    try:
        wait_until(lambda: len(stored_ids(stored)) > 2000, what="first records")
        collector.kill()  # SIGKILL mid-stream
        wait_until(lambda: ship_status(relay).get("last_error"), what="outage in status")
        collector = start_collector(tmp_path, port, pki)
        writer.join()
        wait_until(lambda: len(stored_ids(stored)) >= 10_000, what="all 10,000 records")
        wait_until(lambda: ship_status(relay)["backlog_records"] == 0, what="backlog 0")
    finally:
        fwd.stop()
        collector.stop()
    ids = stored_ids(stored)
    assert len(ids) == 10_000 == len(set(ids))
    assert read_day_dir(stored) == writer.records  # every record, in order, intact


def test_duplicates_removed_across_restarts(tmp_path: Path, pki) -> None:
    port = free_port()
    records = [{**hostile_record(i), "id": f"{i:024x}", "time": rfc3339_ms(1.8e9 + i)}
               for i in range(5)]
    frames = relay_frames(records)
    collector = start_collector(tmp_path, port, pki)
    try:
        tls_send(port, frames + frames, client_ctx(pki))
    finally:
        collector.stop()
    collector = start_collector(tmp_path, port, pki)  # id sets rebuilt from the files
    try:
        tls_send(port, frames, client_ctx(pki))
    finally:
        collector.stop()
    assert read_day_dir(tmp_path / "collector" / "relay-1") == records
    assert "5 records stored, 5 duplicates" in collector.log()
    assert "0 records stored, 5 duplicates" in collector.log()


def test_client_certificates_required(tmp_path: Path, pki) -> None:
    port = free_port()
    collector = start_collector(tmp_path, port, pki, require_client_cert=True)
    rec = [{**hostile_record(1), "id": "a" * 24, "time": "2026-11-25T00:00:00.000Z"}]
    try:
        for ctx in (client_ctx(pki), client_ctx(pki, pki.wrong_client_cert,
                                                 pki.wrong_client_key)):
            # With TLS 1.3 the client's handshake may complete before the
            # collector refuses it: the proof is the log and the empty store.
            with contextlib.suppress(ssl.SSLError, OSError):
                tls_send(port, relay_frames(rec), ctx)
        wait_until(lambda: collector.log().count("refused: TLS handshake failed") >= 3,
                   what="two refusals logged")
        assert read_day_dir(tmp_path / "collector" / "relay-1") == []
        tls_send(port, relay_frames(rec), client_ctx(pki, pki.client_cert, pki.client_key))
    finally:
        collector.stop()
    log = collector.log()
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in log
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log
    assert "connected (TLS, client certificate CN=relay-1)" in log
    assert read_day_dir(tmp_path / "collector" / "relay-1") == rec


def test_plain_port_other_senders_and_hostile_input(tmp_path: Path, pki) -> None:
    port, plain = free_port(), free_port()
    collector = start_collector(tmp_path, port, pki, plain_port=plain)
    good = {**hostile_record(2), "id": "b" * 24, "time": "2026-11-25T00:00:00.000Z"}
    forged = s5.format_record(good, hostname="relay-1").replace(b'id="' + b"b" * 24,
                                                                 b'id="' + b"c" * 24)
    try:
        with socket.create_connection(("127.0.0.1", plain)) as s:
            s.sendall(relay_frames([good]) + s5.frame(forged)
                      + b"<13>1 - evil/../../host app - - - x\n"
                      + b"not syslog at all\n"
                      + s5.frame(b'<13>1 - h a - - - multi\nline\x00\xc2\x85msg\xff'))
        with socket.create_connection(("127.0.0.1", plain)) as s:
            s.sendall(b"99999999 ")  # over the limit: the connection is dropped
            wait_until(lambda: "bad framing" in collector.log(), what="framing error")
    finally:
        collector.stop()
    root = tmp_path / "collector"
    assert read_day_dir(root / "relay-1") == [good]
    assert "connected (plain TCP)" in collector.log()
    # Everything stored is one JSON object per line, whatever came in.
    lines = [line for p in root.rglob("*.jsonl") for line in p.read_bytes().splitlines()]
    assert all(isinstance(json.loads(line), dict) for line in lines)
    [mismatch] = read_day_dir(root / "@syslog" / "relay-1")
    assert "does not match" in mismatch["error"]
    assert read_day_dir(root / "@syslog" / "evil_.._.._host")[0]["msg"] == "x"
    [unparsed] = read_day_dir(root / "@syslog" / "_unknown")
    assert unparsed["raw"] == "not syslog at all" and "not an RFC 5424" in unparsed["error"]
    [multi] = read_day_dir(root / "@syslog" / "h")
    assert multi["msg"] == "multi\nline\x00\x85msg\\xff"  # invalid UTF-8 shown, not lost
    assert not any(b"\xc2\x85" in line or b"\x00" in line for line in lines)
    for p in root.rglob("*"):
        assert p.stat().st_mode & 0o777 == (0o700 if p.is_dir() else 0o600), p


NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC).timestamp()


def day(n: int) -> str:
    return (datetime.fromtimestamp(NOW, UTC) - timedelta(days=n)).date().isoformat()


def rec_on(n: int, i: int) -> dict:
    return {"id": f"{n:04d}{i:020d}", "time": f"{day(n)}T01:00:00.000Z", "action": "connect",
            "server": {"id": "relay-7"}}


def test_collector_retention_and_late_records(tmp_path: Path) -> None:
    c = Collector(tmp_path, keep_days=90, clock=lambda: NOW)
    counts = Counts()

    def send(*records: dict) -> None:
        for r in records:
            c.message(s5.format_record(r, hostname="relay-7"), "127.0.0.1:1", counts)
        c.store.sync()

    send(rec_on(0, 1), rec_on(5, 1), rec_on(120, 1))
    c.retention_pass()
    d = tmp_path / "relay-7"
    assert sorted(p.name for p in d.iterdir()) == [f"{day(5)}.jsonl.zst", f"{day(0)}.jsonl"]
    # A late duplicate for a compressed day is still recognised; a late new
    # record lands beside the .zst and is merged on the next pass.
    send(rec_on(5, 1), rec_on(5, 2))
    assert (counts.records, counts.duplicates) == (4, 1)
    c.retention_pass()
    assert sorted(p.name for p in d.iterdir()) == [f"{day(5)}.jsonl.zst", f"{day(0)}.jsonl"]
    assert [r["id"] for r in read_day_dir(d)] == [rec_on(5, 1)["id"], rec_on(5, 2)["id"],
                                                  rec_on(0, 1)["id"]]
    c.store.close()
    with pytest.raises(ValueError, match="at least 90"):
        Collector(tmp_path, keep_days=30)
