"""The packet log: the C block codec against its Python twin, segments, the
index, rotation, crash recovery, corrupt and truncated segments, file modes and
the bytes per record against pcap."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from packetlog_synth import make_records, to_c

from relay import sessionid
from relay.cext import ffi, lib
from relay.packetlog import segments
from relay.packetlog.blockcodec_py import BlockError, decode_block
from relay.times import parse_rfc3339, rfc3339_ns

T0 = 1_700_000_000.0  # an hour boundary (UTC 22:13:20 is not; see rotation test)
HOUR = 3600


def _trim(r: dict[str, Any]) -> dict[str, Any]:
    out = dict(r)
    out["client_ip"] = r["client_ip"][:16 if r["client_family"] == 6 else 4]
    for k in ("src_ip", "dst_ip"):
        out[k] = r[k][:16 if r["family"] == 6 else 4]
    return out


def _encode(recs: list[dict[str, Any]]) -> bytes:
    arr = to_c(recs)
    cap = lib.relay_block_bound(len(recs))
    buf = ffi.new("uint8_t[]", cap)
    size = lib.relay_block_encode(arr, len(recs), buf, cap)
    assert size > 0
    return bytes(ffi.buffer(buf, size))


# A small block of IPv4 and IPv6 clients for the decoders to disagree on once broken.
CORRUPTIBLE_BLOCK = _encode(make_records(30, sessions=3))


def test_codec_c_encode_python_and_c_decode() -> None:
    recs = make_records(5000, sessions=6)
    raw = _encode(recs)
    assert decode_block(raw) == [_trim(r) for r in recs]
    out = ffi.new("struct relay_record[]", len(recs))
    assert lib.relay_block_decode(raw, len(raw), out, len(recs)) == len(recs)
    assert bytes(ffi.buffer(out)) == bytes(ffi.buffer(to_c(recs)))
    # A truncated or bit-flipped block is refused, never read past its end.
    assert lib.relay_block_decode(raw[:-1], len(raw) - 1, out, len(recs)) == -1
    assert lib.relay_block_decode(raw[:40], 40, out, len(recs)) == -1


record_st = st.fixed_dictionaries({
    "time_ns": st.integers(0, 2**64 - 1), "session_id": st.binary(min_size=16, max_size=16),
    "rflags": st.integers(0, 1), "client_family": st.sampled_from([4, 6]),
    "client_ip": st.binary(min_size=16, max_size=16), "client_port": st.integers(0, 65535),
    "direction": st.integers(0, 1), "family": st.sampled_from([4, 6]),
    "src_ip": st.binary(min_size=16, max_size=16), "dst_ip": st.binary(min_size=16, max_size=16),
    "src_port": st.integers(0, 65535), "dst_port": st.integers(0, 65535),
    "tcp_flags": st.integers(0, 255), "payload_len": st.integers(0, 65535),
    "window": st.integers(0, 65535), "seq": st.integers(0, 2**32 - 1),
    "ack": st.integers(0, 2**32 - 1)})


@settings(max_examples=60, deadline=None)
@given(st.lists(record_st, min_size=1, max_size=40))
def test_codec_any_records(recs: list[dict[str, Any]]) -> None:
    for r in recs:  # the bytes past an address's family length are zero on the wire
        for k, fam in (("client_ip", "client_family"), ("src_ip", "family"),
                       ("dst_ip", "family")):
            r[k] = r[k][:16 if r[fam] == 6 else 4].ljust(16, b"\0")
    assert decode_block(_encode(recs)) == [_trim(r) for r in recs]


def _c_decode(raw: bytes) -> list[dict[str, Any]] | None:
    """The C decoder's reading of ``raw`` in decode_block's form, None if it refuses."""
    n = lib.relay_block_count(raw, len(raw))
    if not 0 <= n <= 4096:
        return None
    out = ffi.new("struct relay_record[]", max(n, 1))
    if lib.relay_block_decode(raw, len(raw), out, n) != n:
        return None
    fields = ("time_ns", "session_id", "rflags", "client_family", "client_ip", "client_port",
              "direction", "family", "src_ip", "dst_ip", "src_port", "dst_port", "tcp_flags",
              "payload_len", "window", "seq", "ack")
    return [_trim({k: bytes(v) if isinstance(v, ffi.CData) else v
                   for k in fields for v in [getattr(out[i], k)]}) for i in range(n)]


def _py_decode(raw: bytes) -> list[dict[str, Any]] | None:
    try:
        return decode_block(raw)
    except BlockError:
        return None


def test_codec_a_payload_length_past_16_bits_is_refused_by_both_decoders() -> None:
    rec = make_records(1)[0] | {"payload_len": 0xFFFF}
    raw = _encode([rec])
    assert raw.count(b"\xff\xff\x03") == 1  # the length's varint, 65535
    bad = raw.replace(b"\xff\xff\x03", b"\x80\x80\x04")  # 65536: no u16 holds it
    assert _c_decode(raw) == _py_decode(raw) == [_trim(rec)]
    assert _c_decode(bad) is None and _py_decode(bad) is None


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_codec_c_and_python_agree_on_corrupt_blocks(data: st.DataObject) -> None:
    block = bytearray(CORRUPTIBLE_BLOCK)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(block) - 1))
        edit = data.draw(st.sampled_from(["set", "delete", "insert"]))
        if edit == "delete":
            del block[at]
        else:
            byte = data.draw(st.integers(0, 255))
            block[at:at + (edit == "set")] = bytes([byte])
    raw = bytes(block)
    assert _c_decode(raw) == _py_decode(raw)


def _write(data: Path, recs: list[dict[str, Any]], clock: list[float],
           audit: list[dict[str, Any]] | None = None) -> segments.PacketLogWriter:
    w = segments.PacketLogWriter(data, clock=lambda: clock[0],
                                  audit=(audit.append if audit is not None else None))
    w.open()
    arr = to_c(recs)
    w.write(arr, len(recs))
    return w


def test_write_read_filters_and_modes(tmp_path: Path) -> None:
    clock = [T0]
    recs = make_records(20000, sessions=4, start_ns=int(T0 * 1e9))
    w = _write(tmp_path, recs, clock)
    w.close()
    d = segments.packets_dir(tmp_path)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    files = list(d.iterdir())
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    got = list(segments.iter_records(tmp_path))
    assert len(got) == len(recs)
    assert got[0]["time"].endswith("Z") and got[0]["flags"] == "SYN"
    sid = sessionid.to_text(recs[0]["session_id"])
    mine = [r for r in got if r["session_id"] == sid]
    assert list(segments.iter_records(tmp_path, session=sid)) == mine
    mid = recs[10000]["time_ns"] / 1e9
    later = list(segments.iter_records(tmp_path, start=mid))
    assert later and all(parse_rfc3339(r["time"]).timestamp() >= mid - 1e-6
                         for r in later)
    assert len(later) + len(list(segments.iter_records(tmp_path, end=mid))) == len(recs)
    idx = segments.segment_index(files[0])
    assert idx and sid in idx["sessions"] and "198.18.1.2" in idx["client_ips"]


def test_index_skips_segments_without_decompressing(tmp_path: Path) -> None:
    clock = [T0]
    w = _write(tmp_path, make_records(3000, sessions=2, seed=1), clock)
    w.close()
    first = next(segments.packets_dir(tmp_path).iterdir())
    clock[0] += HOUR
    w = _write(tmp_path, make_records(3000, sessions=2, seed=2), clock)
    w.close()
    # Break the first segment's blocks but not its index: a query its index rules
    # out must not touch them, one it allows must report them.
    data = bytearray(first.read_bytes())
    data[segments.FILE_HEADER.size + segments.BLOCK_FRAME_LEN + 10] ^= 0xFF
    first.write_bytes(bytes(data))
    other = sessionid.to_text(make_records(10, sessions=2, seed=2)[0]["session_id"])
    errors: list[tuple[str, str]] = []
    got = list(segments.iter_records(tmp_path, session=other,
                                      on_error=lambda p, r: errors.append((p, r))))
    assert got and not errors
    list(segments.iter_records(tmp_path, on_error=lambda p, r: errors.append((p, r))))
    assert errors and "checksum" in errors[0][1]


def test_hourly_rotation(tmp_path: Path) -> None:
    clock = [float(int(T0) // HOUR * HOUR)]
    audit: list[dict[str, Any]] = []
    w = segments.PacketLogWriter(tmp_path, clock=lambda: clock[0], audit=audit.append)
    w.open()
    recs = make_records(100)
    for _ in range(3):
        w.write(to_c(recs), len(recs))
        clock[0] += HOUR
        w.tick()
    names = sorted(p.name for p in segments.packets_dir(tmp_path).iterdir())
    assert len(names) == 3 and all(n.endswith(".rpl") for n in names)
    assert [a["action"] for a in audit] == ["packetlog-rotate"] * 3


def test_crash_loses_only_unsynced_tail_and_is_recovered(tmp_path: Path) -> None:
    clock = [T0]
    recs = make_records(9000)
    w = _write(tmp_path, recs, clock)  # two blocks: 8192 + 808
    clock[0] += 1.5
    w.tick()  # synced
    path = w.current_path
    assert path is not None and path.name.endswith(".rpl.open")
    os.close(w._seg.fd)  # the process dies: no close, no index
    # A torn third block: its header and half its payload reached the disk.
    with open(path, "ab") as f:
        f.write(segments.BLOCK_HEADER.pack(segments.BLOCK_MAGIC, 5, 0, 0, 9, 100, 0)
                + b"\0\0\0\0" + b"x" * 50)
    # Meanwhile the open segment reads fine (torn tail of a live file is normal).
    errors: list[tuple[str, str]] = []
    assert len(list(segments.iter_records(tmp_path, on_error=lambda p, r: errors.append(
        (p, r))))) == 9000 and not errors
    audit: list[dict[str, Any]] = []
    w2 = segments.PacketLogWriter(tmp_path, clock=lambda: clock[0], audit=audit.append)
    recovered = w2.open()
    assert recovered == audit
    assert recovered[0]["action"] == "packetlog-recover" and recovered[0]["records"] == 9000
    assert recovered[0]["truncated_bytes"] == segments.BLOCK_FRAME_LEN + 50
    got = list(segments.iter_records(tmp_path, on_error=lambda p, r: errors.append((p, r))))
    assert len(got) == 9000 and not errors
    assert not list(segments.packets_dir(tmp_path).glob("*.open"))


def test_unrecoverable_open_segment_is_set_aside(tmp_path: Path) -> None:
    d = segments.packets_dir(tmp_path)
    d.mkdir(parents=True)
    (d / "seg-20240101T000000Z.rpl.open").write_bytes(b"garbage")
    audit: list[dict[str, Any]] = []
    segments.PacketLogWriter(tmp_path, audit=audit.append).open()
    assert audit[0]["action"] == "packetlog-corrupt"
    assert (d / "seg-20240101T000000Z.rpl.open.corrupt").exists()


def test_reader_reports_corrupt_and_truncated_segments_and_carries_on(tmp_path: Path) -> None:
    clock = [T0]
    paths = []
    for seed in (1, 2, 3):
        w = _write(tmp_path, make_records(9000, seed=seed), clock)
        w.close()
        paths = sorted(segments.packets_dir(tmp_path).iterdir())
        clock[0] += HOUR
    # Segment 1: a flipped byte in its second block; segment 2: cut mid-block.
    data = bytearray(paths[0].read_bytes())
    second_block = segments.segment_index(paths[0])["blocks"][1][0]
    data[second_block + segments.BLOCK_FRAME_LEN + 5] ^= 0x55
    paths[0].write_bytes(bytes(data))
    size = paths[1].stat().st_size
    with open(paths[1], "r+b") as f:
        f.truncate(size // 2)
    errors: list[tuple[str, str]] = []
    got = list(segments.iter_records(tmp_path, on_error=lambda p, r: errors.append((p, r))))
    reported = {p for p, _ in errors}
    assert str(paths[0]) in reported and str(paths[1]) in reported
    # Segment 1's first block, segment 2's intact blocks, all of segment 3.
    assert 8192 + 9000 <= len(got) < 3 * 9000


def test_bytes_per_record_vs_pcap(tmp_path: Path) -> None:
    clock = [T0]
    recs = make_records(50000, sessions=8)
    w = _write(tmp_path, recs, clock)
    w.close()
    disk = segments.disk_use(tmp_path)
    # pcap: 24-byte file header, 16 bytes per packet, the frame cut at 96 bytes
    # (Ethernet 14 + IPv4 20 + TCP with timestamps 32 + payload).
    pcap = 24 + sum(16 + min(96, 14 + 20 + 32 + r["payload_len"]) for r in recs)
    assert disk * 4 <= pcap, (disk / len(recs), pcap / len(recs))


def _keys(data: Path) -> list[tuple[str, int, int]]:
    return sorted((r["time"], r["seq"], r["src_port"]) for r in segments.iter_records(data))


def _expected(*runs: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    return sorted((rfc3339_ns(r["time_ns"]), r["seq"], r["src_port"])
                  for recs in runs for r in recs)


def test_restart_within_the_hour_then_crash_loses_nothing(tmp_path: Path) -> None:
    """Issue 13 item 7: a clean close, a new writer within the same hour, a crash
    (the writer dropped without close) and a recovering open(): both runs' records
    are all readable, and the first segment was never renamed over."""
    clock = [float(int(T0) // HOUR * HOUR) + 60]
    first = make_records(1000, seed=1, start_ns=int(clock[0] * 1e9))
    w = _write(tmp_path, first, clock)
    w.close()
    [closed] = segments.segment_files(tmp_path)
    digest = closed.read_bytes()

    clock[0] += 600  # the same hour
    second = make_records(3000, seed=2, start_ns=int(clock[0] * 1e9))
    w = _write(tmp_path, second, clock)
    clock[0] += segments.FLUSH_INTERVAL
    w.tick()
    assert w.current_path is not None and w.current_path.name != closed.name + ".open"
    del w  # the crash: no close, no index

    audit: list[dict[str, Any]] = []
    segments.PacketLogWriter(tmp_path, clock=lambda: clock[0], audit=audit.append).open()
    assert [a["action"] for a in audit] == ["packetlog-recover"]
    assert audit[0]["records"] == 3000
    assert closed.read_bytes() == digest
    assert _keys(tmp_path) == _expected(first, second)
    names = [p.name for p in segments.segment_files(tmp_path)]
    # Named by the period, then by the restart's own start: in time order.
    assert names == ["seg-20231114T220000Z.rpl", "seg-20231114T221100Z.rpl"]


def test_recovery_never_renames_over_a_closed_segment(tmp_path: Path) -> None:
    """A leftover .rpl.open beside a closed segment of the same name (as writers
    before the fix made them) is recovered under a new name."""
    clock = [float(int(T0) // HOUR * HOUR)]
    first = make_records(1000, seed=1, start_ns=int(clock[0] * 1e9))
    w = _write(tmp_path, first, clock)
    w.close()
    [closed] = segments.segment_files(tmp_path)
    clock[0] += 300
    second = make_records(2000, seed=2, start_ns=int(clock[0] * 1e9))
    w = _write(tmp_path, second, clock)
    w.sync()
    assert w.current_path is not None
    legacy = closed.with_name(closed.name + ".open")
    os.rename(w.current_path, legacy)
    del w

    audit: list[dict[str, Any]] = []
    segments.PacketLogWriter(tmp_path, clock=lambda: clock[0], audit=audit.append).open()
    assert audit[0]["from"] == str(legacy) and audit[0]["file"] != str(closed)
    assert _keys(tmp_path) == _expected(first, second)
    # The chain holds both segments' own links, and verify finds nothing wrong.
    from relay.investigate import evidence

    report = evidence.verify(tmp_path)
    assert report.ok, report.problems
    assert report.checked["packet-log files"] == 2


def test_interrupted_link_fallback_is_finished_not_duplicated(tmp_path: Path) -> None:
    """On a file system without RENAME_NOREPLACE the close is link + unlink; a crash
    between them leaves one file under both names: recovery drops the open name."""
    clock = [T0]
    recs = make_records(500)
    w = _write(tmp_path, recs, clock)
    w.close()
    [closed] = segments.segment_files(tmp_path)
    os.link(closed, closed.with_name(closed.name + ".open"))
    segments.PacketLogWriter(tmp_path, clock=lambda: clock[0]).open()
    assert [p.name for p in segments.segment_files(tmp_path)] == [closed.name]
    assert len(_keys(tmp_path)) == 500


def test_corrupt_leftover_never_replaces_an_earlier_one(tmp_path: Path) -> None:
    d = segments.packets_dir(tmp_path)
    d.mkdir(parents=True)
    (d / "seg-20240101T000000Z.rpl.open.corrupt").write_bytes(b"first")
    (d / "seg-20240101T000000Z.rpl.open").write_bytes(b"second")
    segments.PacketLogWriter(tmp_path).open()
    assert (d / "seg-20240101T000000Z.rpl.open.corrupt").read_bytes() == b"first"
    assert (d / "seg-20240101T000000Z.rpl.open.1.corrupt").read_bytes() == b"second"


def test_metrics_read_cached_disk_use_without_listing(tmp_path: Path,
                                                      monkeypatch: Any) -> None:
    """Issue 13 item 10: a /metrics scrape lists no directory; the counts follow the
    writer's closes at once and retention's archives after its pass."""
    from relay.config import Config
    from relay.packetlog.recording import Recording
    from relay.packetlog.retention import Retention

    rec = Recording(Config().with_data_dir(tmp_path), "relay0", audit=lambda r: None)
    clock = [float(int(T0) // HOUR * HOUR)]
    rec.writer.clock = lambda: clock[0]
    rec.capture.stats = lambda: {  # type: ignore[method-assign]
        "records": 0, "drops_per_cpu": [0], "drained": 0, "ring_used": 0,
        "ring_bytes": 1, "flush_errors": 0}
    rec.writer.open()
    for seed in (1, 2, 3):
        recs = make_records(2000, seed=seed)
        rec.writer.write(to_c(recs), len(recs))
        clock[0] += HOUR
        rec.writer.tick()
    recs = make_records(2000, seed=4)
    rec.writer.write(to_c(recs), len(recs))  # a fourth, still open

    def gauges() -> dict[str, float]:
        return {m.name: m.samples[0][1] for m in rec.metrics()
                if m.name in ("relay_packetlog_bytes", "relay_packetlog_segments")}

    def no_listing(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a scrape listed a directory")

    with monkeypatch.context() as m:
        for obj, name in ((os, "scandir"), (os, "listdir"), (Path, "iterdir"), (Path, "glob")):
            m.setattr(obj, name, no_listing)
        got = gauges()
    assert got == {"relay_packetlog_bytes": segments.disk_use(tmp_path),
                   "relay_packetlog_segments": 4}

    # Retention archives the three closed ones in its worker thread, then recounts.
    rec.writer.close()
    clock[0] += 15 * 86400
    rec.retention = Retention(tmp_path, audit=lambda r: None, clock=lambda: clock[0],
                              disk_free=lambda: 1 << 40)
    rec._retention_pass()
    assert len(list(segments.packets_dir(tmp_path).glob("*.rpa"))) == 4
    assert gauges() == {"relay_packetlog_bytes": segments.disk_use(tmp_path),
                        "relay_packetlog_segments": 4}
