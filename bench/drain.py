"""Drain benchmark: records/s moved from the BPF ring buffer by the C drain, and
through the whole packet-log pipeline (drain + block encode + zstd + write); bytes
per record on disk (hot segment, archive) against pcap with snaplen 96 and CSV.

The ring is filled by the real capture program run in the kernel with
BPF_PROG_TEST_RUN (repeat = one ring's worth), so the drain reads real records
without a traffic generator being the bottleneck. Needs root and bcc. Writes
bench/results/drain.json and prints a table.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from packetlog_synth import make_records, to_c  # noqa: E402

from bench.common import Row  # noqa: E402
from relay.cext import lib  # noqa: E402
from relay.packetlog import segments  # noqa: E402
from relay.packetlog.capture import Capture  # noqa: E402
from relay.packetlog.segments import BLOCK_RECORDS  # noqa: E402

BPF_PROG_TEST_RUN = 10
NR_BPF = 321  # x86_64
# 64 MiB ring: 645k records per fill, enough that timer noise is negligible.
RING_BYTES = 64 << 20
RECORD_SLOT = 112  # 104-byte record + 8-byte ring header
ROUNDS = 5
SIZE_RECORDS = 200_000
PCAP_SNAPLEN = 96


def test_run(prog_fd: int, frame: bytes, repeat: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(frame)
    attr = struct.pack("<IIIIQQII", prog_fd, 0, len(frame), 0, ctypes.addressof(buf), 0,
                       repeat, 0).ljust(128, b"\0")
    abuf = ctypes.create_string_buffer(attr)
    if libc.syscall(NR_BPF, BPF_PROG_TEST_RUN, abuf, len(attr)) != 0:
        raise OSError(ctypes.get_errno(), "BPF_PROG_TEST_RUN")


def drain_rate() -> dict[str, float]:
    from test_capture import MAC_A, ROUTER_MAC, ipv4_frame, tcp_header

    # The filters go on the loopback of a namespace of our own: the records come
    # from test runs only, and the host's devices are never touched.
    ns = f"relaybench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    with tempfile.TemporaryDirectory() as d:
        writer = segments.PacketLogWriter(d)
        writer.open()
        cap = Capture("lo", writer, netns=ns, ring_bytes=RING_BYTES)
        cap.start()
        cap.add_session(MAC_A, "sessAsessAsessAsessAsQ", "198.18.1.2", 40001)
        frame = ipv4_frame(ROUTER_MAC, MAC_A, "10.211.0.2", "93.184.216.34",
                           tcp_header(1, 443, 1000, 0, 0x10, 500), b"x" * 100)
        per_fill = RING_BYTES // RECORD_SLOT - 1
        drain_only = pipeline = 0.0
        n_total = 0
        try:
            for _ in range(ROUNDS):
                test_run(cap._fds["prog_in"], frame, per_fill)
                t0 = time.perf_counter()
                got = 0
                while True:  # drain only: copy into the block, drop the block
                    k = lib.relay_drain_run(cap._drain, BLOCK_RECORDS)
                    got += k
                    lib.relay_drain_reset(cap._drain)
                    if k == 0:
                        break
                drain_only += time.perf_counter() - t0
                n_total += got
                test_run(cap._fds["prog_in"], frame, per_fill)
                t0 = time.perf_counter()
                cap.flush()
                pipeline += time.perf_counter() - t0
            stats = cap.stats()
        finally:
            cap.close()
            subprocess.run(["ip", "netns", "del", ns], check=False)
    return {"records_per_fill": per_fill, "drain_records_per_s": n_total / drain_only,
            "pipeline_records_per_s": n_total / pipeline, "drops": stats["drops"]}


def sizes() -> dict[str, float]:
    recs = make_records(SIZE_RECORDS, sessions=16)
    with tempfile.TemporaryDirectory() as d:
        w = segments.PacketLogWriter(d, clock=lambda: recs[0]["time_ns"] / 1e9)
        w.open()
        w.write(to_c(recs), len(recs))
        w.close()
        seg = next(segments.packets_dir(d).iterdir())
        hot = seg.stat().st_size
        _, archived = segments.archive_segment(seg, seg.with_suffix(".rpa"))
        csv = sum(len(",".join(str(v) for v in r.values())) + 1
                  for r in segments.iter_records(d, archives=False))
    # pcap: 24-byte header, 16 per packet, the frame up to the snaplen (Ethernet
    # 14 + IPv4 20 + TCP with timestamps 32 + payload).
    pcap = 24 + sum(16 + min(PCAP_SNAPLEN, 66 + r["payload_len"]) for r in recs)
    n = len(recs)
    return {"records": n, "hot_bytes_per_record": hot / n,
            "archive_bytes_per_record": archived / n, "pcap96_bytes_per_record": pcap / n,
            "csv_bytes_per_record": csv / n, "pcap_over_hot": pcap / hot,
            "pcap_over_archive": pcap / archived, "csv_over_hot": csv / hot}


def run(quick: bool) -> list[Row]:
    """The suite's entry: storage (issue 8 item 4) and the drain's records/s."""
    result = measure()
    d, z = result["drain"], result["size"]
    return [
        Row("storage", "bytes per packet record, hot segment", "bytes", "pcap -s 96",
            z["pcap96_bytes_per_record"], "packet log (hot)", z["hot_bytes_per_record"], 1,
            goal="<= 0.25", higher_is_better=False),
        Row("storage", "bytes per packet record, archived", "bytes", "pcap -s 96",
            z["pcap96_bytes_per_record"], "packet log (archive)",
            z["archive_bytes_per_record"], 1, goal="<= 0.25", higher_is_better=False),
        Row("storage", "bytes per packet record vs text CSV", "bytes", "CSV line",
            z["csv_bytes_per_record"], "packet log (hot)", z["hot_bytes_per_record"], 1,
            higher_is_better=False),
        Row("drain", "records/s, drain + encode + write vs drain alone", "records/s",
            "C drain alone", d["drain_records_per_s"], "whole pipeline",
            d["pipeline_records_per_s"], ROUNDS),
    ]


def measure() -> dict:
    result = {"drain": drain_rate(), "size": sizes(), "cpus": os.cpu_count()}
    out = HERE / "results" / "drain.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for section, values in result.items():
        if isinstance(values, dict):
            for k, v in values.items():
                print(f"{section:6} {k:28} {v:>14,.2f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    measure()
