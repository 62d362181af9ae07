"""relay collector as a real process: rsyslog forwarding to it, SIGKILL mid-stream,
client certificates, duplicates, other senders; retention in-process."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard
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

from relay.central.collector import Collector, Counts
from relay.connlog import reader
from relay.connlog.forwarder import ship_status
from relay.protocols import syslog5424 as s5
from relay.times import rfc3339_ms


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
    collector = start_collector(tmp_path, cport, pki, accept_syslog=True)
    conf = rsyslog_global(tmp_path, pki, relay_cert=True) + f"""
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
    assert "connected (TLS, client certificate CN=relay-1, relay relay-1)" in log
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
    records = [{**hostile_record(i), "id": f"{i:024x}", "time": rfc3339_ms(time.time() - 60)}
               for i in range(5)]
    frames = relay_frames(records)
    relay1 = client_ctx(pki, pki.client_cert, pki.client_key)
    collector = start_collector(tmp_path, port, pki)
    try:
        tls_send(port, frames + frames, relay1)
    finally:
        collector.stop()
    collector = start_collector(tmp_path, port, pki)  # id sets rebuilt from the files
    try:
        tls_send(port, frames, relay1)
    finally:
        collector.stop()
    assert read_day_dir(tmp_path / "collector" / "relay-1") == records
    assert "5 records stored, 5 duplicates" in collector.log()
    assert "0 records stored, 5 duplicates" in collector.log()


def test_client_certificates_required_by_default(tmp_path: Path, pki) -> None:
    port = free_port()
    collector = start_collector(tmp_path, port, pki)
    rec = [{**hostile_record(1), "id": "a" * 24, "time": rfc3339_ms(time.time())}]
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
    assert "connected (TLS, client certificate CN=relay-1, relay relay-1)" in log
    assert read_day_dir(tmp_path / "collector" / "relay-1") == rec


def test_plain_port_other_senders_and_hostile_input(tmp_path: Path, pki) -> None:
    port, plain = free_port(), free_port()
    collector = start_collector(tmp_path, port, pki, plain_port=plain, accept_syslog=True)
    good = {**hostile_record(2), "id": "b" * 24, "time": rfc3339_ms(time.time())}
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
    # A sender without a certificate proves no relay id: its relay record is refused.
    assert read_day_dir(root / "relay-1") == []
    assert "1 refused: relay records without a relay certificate" in collector.log()
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
            c.message(s5.format_record(r, hostname="relay-7"), "127.0.0.1:1", counts,
                      "relay-7")
        c.store.sync()

    send(rec_on(0, 1), rec_on(5, 1), rec_on(120, 1))
    c.retention_pass()
    d = tmp_path / "relay-7"
    # 120 days back is past the retention: filed under the day it came, flagged.
    assert sorted(p.name for p in d.iterdir()) == [f"{day(5)}.jsonl.zst", f"{day(0)}.jsonl"]
    # A late duplicate for a compressed day is still recognised; a late new
    # record lands beside the .zst and is merged on the next pass.
    send(rec_on(5, 1), rec_on(5, 2))
    assert (counts.records, counts.duplicates, counts.out_of_window) == (4, 1, 1)
    c.retention_pass()
    assert sorted(p.name for p in d.iterdir()) == [f"{day(5)}.jsonl.zst", f"{day(0)}.jsonl"]
    assert [r["id"] for r in read_day_dir(d)] == [rec_on(5, 1)["id"], rec_on(5, 2)["id"],
                                                  rec_on(0, 1)["id"], rec_on(120, 1)["id"]]
    assert read_day_dir(d)[3]["out_of_window"]["reason"] == \
        "time older than the retention of 90 days"
    c.store.close()
    with pytest.raises(ValueError, match="at least 90"):
        Collector(tmp_path, keep_days=30)


def test_a_torn_last_line_is_not_a_stored_record(tmp_path: Path) -> None:
    """A collector killed mid-write leaves the start of a record, its id whole,
    without its LF; the batch was not confirmed, so the relay sends the record
    again. relay/connlog/reader.py's rule (a line without its LF is no record)
    keeps the resend from being dropped as a duplicate of the torn bytes."""
    d = tmp_path / "relay-7"
    d.mkdir(mode=0o700)
    kept, torn = rec_on(0, 1), rec_on(0, 2)
    line = s5.dumps_json(torn).encode()
    (d / f"{day(0)}.jsonl").write_bytes(s5.dumps_json(kept).encode() + b"\n"
                                        + line[: len(line) // 2])
    c = Collector(tmp_path, keep_days=90, clock=lambda: NOW)
    counts = Counts()
    for r in (kept, torn):
        c.message(s5.format_record(r, hostname="relay-7"), "127.0.0.1:1", counts, "relay-7")
    c.store.close()
    assert (counts.records, counts.duplicates) == (1, 1)
    stored = (d / f"{day(0)}.jsonl").read_bytes().splitlines()
    assert stored[1] == line[: len(line) // 2]  # ended with LF: one bad line
    assert [json.loads(x)["id"] for x in (stored[0], stored[2])] == [kept["id"], torn["id"]]


# -- the collector believes certificates, not claims (issue 13 item 6) -------------


def stored_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_a_sender_can_only_write_its_own_store(tmp_path: Path, pki) -> None:
    """relay-2's certificate, claiming relay-1: nothing lands in relay-1's store, not
    even the ids of relay-1's real records sent first; impossible and far-future
    days are filed under the day of arrival, flagged."""
    port = free_port()
    now = time.time()
    real = [{**hostile_record(i), "id": f"{i:024x}", "time": rfc3339_ms(now - 60)}
            for i in range(3)]
    as_relay2 = [{**r, "server": {"id": "relay-2"}} for r in real]
    odd_days = [{**as_relay2[0], "id": f"d{i:023x}", "time": t}
                for i, t in enumerate(("9999-12-31T00:00:00.000Z", "2026-02-30T00:00:00.000Z",
                                       rfc3339_ms(now + 3 * 86400), "yesterday"))]
    relay2 = client_ctx(pki, pki.other_relay_cert, pki.other_relay_key)
    collector = start_collector(tmp_path, port, pki)
    try:
        # Claims relay-1, with its real record ids and with odd days.
        tls_send(port, relay_frames(real + [{**r, "server": {"id": "relay-1"}}
                                            for r in odd_days]), relay2)
        # As itself: the ids relay-1 is about to use, and the odd days.
        tls_send(port, relay_frames(as_relay2 + odd_days), relay2)
        tls_send(port, relay_frames(real), client_ctx(pki, pki.client_cert, pki.client_key))
    finally:
        collector.stop()
    root = tmp_path / "collector"
    today = datetime.fromtimestamp(now, UTC).date().isoformat()
    assert read_day_dir(root / "relay-1") == real  # every real record, none forged
    mine = read_day_dir(root / "relay-2")
    assert [r["id"] for r in mine[:3]] == [r["id"] for r in real]
    flagged = [r for r in mine if "out_of_window" in r]
    assert len(flagged) == 4 and all(r["out_of_window"]["received"][:10] == today
                                     for r in flagged)
    assert {r["out_of_window"]["reason"] for r in flagged} == {
        "time more than 24 h in the future", "time is not RFC 3339"}
    assert set(stored_files(root / "relay-2")) <= {f"{today}.jsonl", f"{real_day(now)}.jsonl"}
    log = collector.log()
    assert "(relay-2): closed: 0 records stored, 0 duplicates, 0 other messages, " \
           "0 unparsable, 7 refused: claimed another relay id" in log
    assert "(relay-2): closed: 7 records stored" in log and \
           "4 filed under the receive day (time out of window)" in log
    assert "(relay-1): closed: 3 records stored, 0 duplicates" in log


def real_day(ts: float) -> str:
    return datetime.fromtimestamp(ts - 60, UTC).date().isoformat()


def test_over_quota_records_are_refused_and_the_batch_not_confirmed(
        tmp_path: Path, pki) -> None:
    port = free_port()
    relay = tmp_path / "relay"
    records = write_records(relay, 20)
    quota = 5 * len(json.dumps(records[0]))
    collector = start_collector(tmp_path, port, pki, quota=quota)
    fwd = start_forwarder(tmp_path, relay, port, pki)
    stored = tmp_path / "collector" / "relay-1"
    try:
        wait_until(lambda: "not confirmed: over the daily quota" in collector.log(),
                   what="the refusal")
        status = wait_until(lambda: (st := ship_status(relay))["consecutive_failures"] >= 2
                            and st, what="the forwarder to see it")
    finally:
        fwd.stop()
        collector.stop()
    got = read_day_dir(stored)
    assert 1 <= len(got) < 20 and got == records[:len(got)]
    assert sum(p.stat().st_size for p in stored.iterdir()) <= quota
    # Not confirmed: the relay keeps every record and sends them again later.
    assert status["backlog_records"] == 20 and "not confirmed" in status["last_error"]
    log = collector.log()
    assert f"relay-1: over the daily quota of {quota} bytes" in log
    assert f"{20 - len(got)} refused: over the daily quota" in log


def test_each_batch_mark_is_acknowledged_once_its_lines_are_on_disk(
        tmp_path: Path, pki) -> None:
    """Under ACK_ALPN the collector answers each batch mark on the connection,
    in order, and only after the records before it are in the day file."""
    from relay.connlog.forwarder import ACK_ALPN

    port = free_port()
    collector = start_collector(tmp_path, port, pki)
    records = [{"id": f"{i:024x}", "time": f"{today()}T00:00:{i:02d}.000Z",
                "action": "connect", "session_id": "s" * 26, "server": {"id": "relay-1"}}
               for i in range(20)]
    stored = tmp_path / "collector" / "relay-1"
    ctx = client_ctx(pki, pki.client_cert, pki.client_key)
    ctx.set_alpn_protocols([ACK_ALPN])
    acked: list[tuple[bytes, list[str]]] = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == ACK_ALPN
            parser = s5.AckParser()
            for seq, part in ((1, records[:10]), (2, records[10:])):
                tls.sendall(relay_frames(part) + s5.batch_mark(seq, hostname="relay-1"))
                got: list[int] = []
                while not got:
                    got = parser.feed(tls.recv(100))
                acked.append((bytes(got), [r["id"] for r in read_day_dir(stored)]))
    finally:
        collector.stop()
    ids = [r["id"] for r in records]
    assert acked == [(bytes([1]), ids[:10]), (bytes([2]), ids)]
    assert "20 records stored" in collector.log()


def test_plain_syslog_is_refused_unless_accepted(tmp_path: Path, pki) -> None:
    port = free_port()
    plain = b"<14>1 2026-11-25T10:00:00.5Z applianceA app 1 ID - hello\n"
    relay1 = client_ctx(pki, pki.client_cert, pki.client_key)
    collector = start_collector(tmp_path, port, pki)
    try:
        tls_send(port, plain, relay1)
    finally:
        collector.stop()
    assert not (tmp_path / "collector" / "@syslog").exists()
    assert "1 refused: plain syslog (no --accept-syslog)" in collector.log()
    # Senders without a certificate only with --accept-syslog, and only plain syslog.
    collector = start_collector(tmp_path, port, pki, accept_syslog=True,
                                allow_no_client_cert=True)
    rec = {**hostile_record(1), "id": "c" * 24, "time": rfc3339_ms(time.time())}
    try:
        tls_send(port, plain + relay_frames([rec]), client_ctx(pki))
    finally:
        collector.stop()
    [got] = read_day_dir(tmp_path / "collector" / "@syslog" / "applianceA")
    assert got["msg"] == "hello" and got["identity"] is None
    assert read_day_dir(tmp_path / "collector" / "relay-1") == []
    assert "1 refused: relay records without a relay certificate" in collector.log()
    out = subprocess.run([sys.executable, "-m", "relay.cli", "collector", "--cert",
                          str(pki.server_cert), "--key", str(pki.server_key), "--ca",
                          str(pki.ca), "--listen", f"127.0.0.1:{port}", "--data-dir",
                          str(tmp_path / "c2"), "--plain-listen", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "add --accept-syslog" in out.stderr
    assert "Traceback" not in out.stderr


# -- the collector's chain and relay collector verify ------------------------------


def verify_cli(root: Path) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, "-m", "relay.cli", "collector", "verify",
                          "--data-dir", str(root), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert "Traceback" not in out.stderr
    return out.returncode, json.loads(out.stdout)


def kinds(report: dict) -> set[tuple[str, str]]:
    return {(p["kind"], p["file"]) for p in report["problems"]}


def chained_store(root: Path) -> Collector:
    c = Collector(root, keep_days=90, clock=lambda: NOW)
    counts = Counts()
    for n in (100, 3, 2, 1, 0):  # day(100) is sent while still in the window
        clock = NOW - n * 86400 + 3600 if n == 100 else NOW
        c.clock = c.quota.clock = lambda clock=clock: clock
        for i in range(3):
            c.message(s5.format_record(rec_on(n, i), hostname="relay-7"), "p", counts,
                      "relay-7")
    c.store.sync()
    c.clock = c.quota.clock = lambda: NOW - 10 * 86400
    c.retention_pass()  # compresses (and seals) day(100)
    c.clock = c.quota.clock = lambda: NOW
    c.retention_pass()  # deletes day(100) (a link), seals day(3) and day(2)
    return c


def test_verify_passes_an_untouched_store_and_late_records(tmp_path: Path) -> None:
    c = chained_store(tmp_path)
    d = tmp_path / "relay-7"
    assert stored_files(d) == [f"{day(3)}.jsonl.zst", f"{day(2)}.jsonl.zst",
                               f"{day(1)}.jsonl", f"{day(0)}.jsonl"]
    links = [json.loads(x) for x in (tmp_path / "@chain" / "relay-7.jsonl").read_text()
             .splitlines()]
    assert [(lk["event"], lk["day"]) for lk in links] == [
        ("close", day(100)), ("delete", day(100)), ("close", day(3)), ("close", day(2))]
    rc, report = verify_cli(tmp_path)
    assert rc == 0 and report["ok"], report
    assert report["checked"]["collector days"] == 4
    # A late record for a sealed day: pending, then merged and sealed again.
    counts = Counts()
    c.message(s5.format_record(rec_on(3, 9), hostname="relay-7"), "p", counts, "relay-7")
    c.store.sync()
    rc, report = verify_cli(tmp_path)
    assert rc == 0 and any("late records" in n for n in report["notes"])
    c.retention_pass()
    c.store.close()
    rc, report = verify_cli(tmp_path)
    assert rc == 0 and report["ok"] and not any("late" in n for n in report["notes"])


def test_verify_reports_tampering(tmp_path: Path) -> None:
    c = chained_store(tmp_path)
    c.store.close()
    d = tmp_path / "relay-7"
    z3, z2 = d / f"{day(3)}.jsonl.zst", d / f"{day(2)}.jsonl.zst"
    pack = zstandard.ZstdCompressor().compress
    original = reader.uncompressed(z3)
    z3.write_bytes(pack(original.replace(b"relay-7", b"relay-X", 1)))
    rc, report = verify_cli(tmp_path)
    assert rc == 3 and kinds(report) == {("modified", f"relay-7/{day(3)}")}
    z3.write_bytes(pack(original[: len(original) // 2]))
    assert kinds(verify_cli(tmp_path)[1]) == {("truncated", f"relay-7/{day(3)}")}
    a, b = reader.uncompressed(z2), original
    z3.write_bytes(pack(a))
    z2.write_bytes(pack(b))
    assert kinds(verify_cli(tmp_path)[1]) == {("reordered", f"relay-7/{day(3)}"),
                                              ("reordered", f"relay-7/{day(2)}")}
    z3.unlink()
    z2.write_bytes(pack(a))
    assert kinds(verify_cli(tmp_path)[1]) == {("missing", f"relay-7/{day(3)}")}
    (d / "2026-02-30.jsonl.zst").write_bytes(pack(b'{"id":"forged"}\n'))
    assert ("unchained", "relay-7/2026-02-30") in kinds(verify_cli(tmp_path)[1])
    chain = tmp_path / "@chain" / "relay-7.jsonl"
    lines = chain.read_bytes().splitlines(keepends=True)
    chain.write_bytes(b"".join(lines[:1] + lines[2:]))  # a link dropped
    assert ("broken-chain", "relay-7 chain link 1") in kinds(verify_cli(tmp_path)[1])
    chain.write_bytes(b"".join(lines[:-1]))  # the chain cut back: day(2) unchained
    assert ("unchained", f"relay-7/{day(2)}") in kinds(verify_cli(tmp_path)[1])


def test_day_window(tmp_path: Path) -> None:
    c = Collector(tmp_path, keep_days=90, clock=lambda: NOW)  # 2026-06-01T12:00Z

    def filed(time_text: str) -> tuple[str, str | None]:
        got, flag = c._day({"time": time_text})
        return got, flag and flag["reason"]

    assert filed("2026-05-31T23:30:00-05:00") == ("2026-06-01", None)  # its UTC day
    assert filed("2026-06-02T11:00:00.000Z") == ("2026-06-02", None)  # 23 h ahead
    assert filed("2026-06-02T13:00:00.000Z") == ("2026-06-01", "time more than 24 h in "
                                                               "the future")
    assert filed("2026-03-04T00:00:00Z") == ("2026-03-04", None)  # 89 days back
    assert filed("2026-03-02T00:00:00Z") == ("2026-06-01", "time older than the "
                                                           "retention of 90 days")
    for bad in ("2026-06-01T10:00:00", "2026-02-30T00:00:00Z", "", "None"):
        assert filed(bad) == ("2026-06-01", "time is not RFC 3339"), bad


def test_nested_json_is_counted_not_raised(tmp_path: Path) -> None:
    """Issue 13 item 8: a relay message whose JSON nests 100,000 deep raised
    RecursionError out of the collector's message handling."""
    c = Collector(tmp_path, keep_days=90, clock=lambda: NOW)
    counts = Counts()
    raw = b'<13>1 - relay-7 relay - - [relay@32473 id="a"] ' + s5.BOM + b"[" * 100_000
    c.message(raw, "p", counts, "relay-7")
    assert counts.rejected == 1 and counts.records == 0
    assert "1 unparsable" in counts.summary()


@pytest.mark.parametrize("json_text", [
    # The collector's parser keeps the last "server", ClickHouse's JSONExtract the
    # first: relay-7 would file a record under relay-1's id in the fleet store.
    '{"id":"a","server":{"id":"relay-1"},"server":{"id":"relay-7"},"time":"%s"}',
    '{"id":"a","server":{"id":"relay-1","id":"relay-7"},"time":"%s"}',
    '{"id":"a","serv\\u0065r":{"id":"relay-1"},"server":{"id":"relay-7"},"time":"%s"}',
    '{"id":"a","server":{"id":"relay-7"},"time":"2001-01-01T00:00:00.000Z","time":"%s"}',
    '{"id":"a","server":{"id":"relay-7"},"time":"%s","packets":{"in":NaN}}',
])
def test_json_that_parsers_read_differently_is_refused(tmp_path: Path, json_text: str) -> None:
    c = Collector(tmp_path, keep_days=90, clock=lambda: NOW)
    counts = Counts()
    body = (json_text % rfc3339_ms(NOW)).encode()
    for sd in (b'[relay@32473 id="a"] ', b'[relay@32473 id="a" action="connect"] '):
        c.message(b"<134>1 - relay-7 relay 1 - " + sd + s5.BOM + body, "p", counts, "relay-7")
    c.store.close()
    assert counts.rejected == 2 and counts.records == 0
    assert not (tmp_path / "relay-7").exists() and not (tmp_path / "relay-1").exists()
    # The same record said once is stored.
    c = Collector(tmp_path, keep_days=90, clock=lambda: NOW)
    plain = json.dumps({"id": "a", "server": {"id": "relay-7"}, "time": rfc3339_ms(NOW)})
    c.message(b'<134>1 - relay-7 relay 1 - [relay@32473 id="a"] ' + s5.BOM + plain.encode(),
              "p", counts, "relay-7")
    c.store.close()
    assert counts.records == 1


@pytest.mark.parametrize("raw_text", ['{"id":"b","server":{"id":"relay-7"},\t"time":"%s"}',
                                      '{"id":"b","server":{"id":"relay-7"},"x":"\x7f","time":"%s"}',
                                      '{"id":"b","server":{"id":"relay-7"},"x":"\u2028\x85",'
                                      '"time":"%s"}'])
def test_raw_controls_and_line_separators_are_stored_escaped(tmp_path: Path,
                                                              raw_text: str) -> None:
    c = Collector(tmp_path, keep_days=90, clock=lambda: NOW)
    counts = Counts()
    text = raw_text % rfc3339_ms(NOW)
    c.message(b'<134>1 - relay-7 relay 1 - [relay@32473 id="b"] ' + s5.BOM + text.encode(),
              "p", counts, "relay-7")
    c.store.close()
    [stored] = (tmp_path / "relay-7").glob("*.jsonl")
    line = stored.read_text()
    assert counts.records == 1 and line.count("\n") == 1
    assert not set(line[:-1]) & {"\t", "\x7f", "\u2028", "\x85"}
    assert json.loads(line) == json.loads(text)
