"""Search benchmark: `relay logs search` for a one-hour window in 14 days of
synthetic logs, against `zgrep` over the same packet records kept as gzip'ed text
CSV, one file per day (the way the best-known relay software keeps them).

The question is the operator's: which sessions talked to D:P during one hour?
The relay answers from the connection log and the packet log (segments outside
the hour are skipped by their chain link); zgrep has to decompress and scan text,
once over the whole 14 days (what `zgrep PATTERN *.csv.gz` does) and once over
the right day's file only (its best case). Both must find the same packets.

    python -m bench.search            # >= 100 M packet records (needs ~15 GB, long)
    python -m bench.search --quick    # 2 M records, a minute

Writes bench/results/search.json (or search-quick.json) and prints a table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from packetlog_synth import make_records, to_c  # noqa: E402

from bench.common import Row  # noqa: E402
from relay import sessionid, sessionquery  # noqa: E402
from relay.cext import ffi  # noqa: E402
from relay.investigate import search  # noqa: E402
from relay.packetlog import segments  # noqa: E402

DAYS = 14  # the issue: fully searchable for 14 days
HOURS = DAYS * 24
FULL_RECORDS = 100_000_000  # the floor for the full run
QUICK_RECORDS = 2_000_000
# Distinct traffic patterns (sessions, destinations) cycled through the hours so
# that every segment's index names its own sessions.
TEMPLATES = 16
SESSIONS_PER_TEMPLATE = 8
START = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
TARGET_HOUR = 7 * 24 + 13  # day 8, 13:00Z: in the middle of the fortnight
ROUNDS = 3  # best of, for both tools
NS = 1_000_000_000


def templates(block: int) -> list[tuple[object, list[str]]]:
    """(C records, CSV line tails) per template; times are rewritten per block."""
    out = []
    for k in range(TEMPLATES):
        recs = make_records(block, sessions=SESSIONS_PER_TEMPLATE, seed=100 + k, start_ns=0)
        arr = to_c(recs)
        tails = []
        for i in range(block):
            d = segments.record_dict(arr[i])
            tails.append(",".join(str(d[c]) for c in (
                "session_id", "client_ip", "client_port", "direction", "src_ip", "src_port",
                "dst_ip", "dst_port", "seq", "ack")) + f",{d['flags'].replace(',', '|')},"
                f"{d['window']},{d['len']}\n")
        out.append((arr, tails))
    return out


def times_view(arr: object, n: int) -> np.ndarray:
    size = ffi.sizeof("struct relay_record")
    off = ffi.offsetof("struct relay_record", "time_ns")
    return np.ndarray((n,), dtype="<u8", buffer=ffi.buffer(arr, n * size), offset=off,
                      strides=(size,))


def generate(data: Path, csv_dir: Path, total: int) -> dict[str, object]:
    """Packet log (hourly segments), connection log and CSV.gz of the same records."""
    block = segments.BLOCK_RECORDS
    per_hour = -(-total // HOURS // block) * block  # rounded up: at least total
    temps = templates(block)
    clock = [START]
    w = segments.PacketLogWriter(data, clock=lambda: clock[0])
    w.open()
    conn_dir = data / "connlog"
    conn_dir.mkdir(parents=True, exist_ok=True)
    csv_dir.mkdir(parents=True, exist_ok=True)
    target: dict[str, object] = {}
    written = 0
    gz = None
    for hour in range(HOURS):
        t0 = START + hour * 3600
        day = datetime.fromtimestamp(t0, UTC).strftime("%Y-%m-%d")
        if hour % 24 == 0:
            if gz:
                gz.close()
            gz = gzip.open(csv_dir / f"{day}.csv.gz", "wt",  # noqa: SIM115 (closed daily)
                           compresslevel=6)
        assert gz is not None
        k = hour % TEMPLATES
        arr, tails = temps[k]
        times = times_view(arr, block)
        step = 3600 * NS // per_hour
        sessions = set()
        for b in range(per_hour // block):
            base = int(t0 * NS) + b * block * step
            times[:] = base + np.arange(block, dtype=np.uint64) * step
            clock[0] = t0 + 1
            w.write(arr, block)
            secs = (times // NS).tolist()
            fracs = (times % NS).tolist()
            stamp = {s: datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%dT%H:%M:%S")
                     for s in set(secs)}
            gz.write("".join(f"{stamp[s]}.{f:09d}Z,{t}" for s, f, t in
                             zip(secs, fracs, tails, strict=True)))
        written += per_hour // block * block
        for i in range(block):
            sessions.add(sessionid.to_text(bytes(arr[i].session_id)))
        _connlog_hour(conn_dir, day, t0, sessions, arr)
        if hour == TARGET_HOUR:
            target = {"hour": t0, "day": day, "dst": segments.addr_str(
                arr[0].family, bytes(arr[0].dst_ip)), "port": arr[0].dst_port}
        clock[0] = t0 + 3600
        w.tick()
    w.close()
    if gz:
        gz.close()
    return {"records": written, "per_hour": per_hour, **target}


def _connlog_hour(conn_dir: Path, day: str, t0: float, sessions: set[str],
                  arr: object) -> None:
    """Each template session connects at the hour's start and leaves at its end
    (written directly: ConnectionLog's per-record fsync would dominate)."""
    from relay.times import rfc3339_ms

    with open(conn_dir / f"{day}.jsonl", "a") as f:
        for i, sid in enumerate(sorted(sessions)):
            base = {"session_id": sid, "server": {"id": "relay-1", "ip": "192.0.2.1",
                                                  "hostname": "relay.test"},
                    "client": {"ip": f"198.18.{i}.2", "port": 40000 + i, "hostname": None},
                    "protocol": "cstp", "client_software": {"name": "OpenConnect",
                                                            "version": "9.12"},
                    "virtual_ip": f"10.211.0.{i + 2}"}
            for action, t in (("connect", t0), ("disconnect", t0 + 3599)):
                rec = {"id": f"{sid}{action}", "time": rfc3339_ms(t), "action": action, **base}
                if action == "disconnect":
                    rec["connect_time"] = rfc3339_ms(t0)
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")


def bench_relay(data: Path, info: dict) -> tuple[float, int, int]:
    q = sessionquery.Query(lo=info["hour"], hi=info["hour"] + 3600, dst_ip=info["dst"],
                          dst_port=info["port"])
    best = float("inf")
    packets = sessions = 0
    for _ in range(ROUNDS):
        t = time.perf_counter()
        rows, _ = search.search(data, q, on_error=lambda p, r: None)
        best = min(best, time.perf_counter() - t)
        packets, sessions = sum(r.packets for r in rows), len(rows)
    return best, packets, sessions


def bench_zgrep(files: list[Path], info: dict) -> tuple[float, int]:
    zgrep = shutil.which("zgrep")
    if not zgrep:
        raise SystemExit("zgrep is required (Debian package gzip)")
    hour = datetime.fromtimestamp(info["hour"], UTC).strftime("%Y-%m-%dT%H:")
    dst, port = info["dst"].replace(".", r"\."), info["port"]
    # dst IP and port as the CSV's dst or src columns (replies count too, as the
    # relay's search counts them).
    pattern = (f"^{hour}[^,]*,([^,]*,){{4}}({dst},{port},|[^,]*,[^,]*,{dst},{port},)")
    best = float("inf")
    count = 0
    for _ in range(ROUNDS):
        t = time.perf_counter()
        res = subprocess.run([zgrep, "-c", "-E", pattern, *map(str, files)],
                             capture_output=True, text=True, check=False)
        best = min(best, time.perf_counter() - t)
        count = sum(int(line.rsplit(":", 1)[-1]) for line in res.stdout.split())
    return best, count


def run(quick: bool) -> list[Row]:
    """The suite's entry: one-hour search time against zgrep over gzip'ed CSV."""
    r = measure(QUICK_RECORDS if quick else FULL_RECORDS, quick, None)
    return [
        Row("search", f"one-hour search in {DAYS} days ({r['records']:.3g} records)",
            "seconds", "zgrep over 14 days of CSV.gz", r["zgrep_14_days_s"],
            "relay logs search", r["relay_search_s"], ROUNDS, goal="<= 1.0",
            higher_is_better=False),
        Row("search", "one-hour search vs zgrep of the right day only", "seconds",
            "zgrep over that day's CSV.gz", r["zgrep_one_day_s"], "relay logs search",
            r["relay_search_s"], ROUNDS, higher_is_better=False),
        Row("search", "bytes on disk for the same records", "bytes", "CSV.gz",
            r["csv_gz_bytes"], "packet log", r["packet_log_bytes"], 1, higher_is_better=False),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_RECORDS} records")
    ap.add_argument("--records", type=int, help="packet records in total")
    ap.add_argument("--dir", help="work directory (default: a temporary one)")
    args = ap.parse_args()
    total = args.records or (QUICK_RECORDS if args.quick else FULL_RECORDS)
    measure(total, args.quick, args.dir)


def measure(total: int, quick: bool, workdir: str | None) -> dict:
    work = Path(workdir or tempfile.mkdtemp(prefix="relay-bench-search-"))
    data, csv_dir = work / "data", work / "csv"
    t = time.perf_counter()
    info = generate(data, csv_dir, total)
    gen_s = time.perf_counter() - t
    relay_s, packets, sessions = bench_relay(data, info)
    all_files = sorted(csv_dir.glob("*.csv.gz"))
    zgrep_all_s, zcount = bench_zgrep(all_files, info)
    zgrep_day_s, zcount_day = bench_zgrep([csv_dir / f"{info['day']}.csv.gz"], info)
    if not (packets == zcount == zcount_day):
        raise SystemExit(f"results differ: relay {packets}, zgrep {zcount}/{zcount_day}")
    size = sum(p.stat().st_size for p in (data / "packets").iterdir())
    csv_size = sum(p.stat().st_size for p in all_files)
    result = {
        "records": info["records"], "days": DAYS, "records_per_hour": info["per_hour"],
        "window": "1 hour", "dst": f"{info['dst']}:{info['port']}",
        "matching_packets": packets, "matching_sessions": sessions,
        "relay_search_s": round(relay_s, 4), "zgrep_14_days_s": round(zgrep_all_s, 3),
        "zgrep_one_day_s": round(zgrep_day_s, 3),
        "ratio_vs_zgrep_14_days": round(zgrep_all_s / relay_s, 1),
        "ratio_vs_zgrep_one_day": round(zgrep_day_s / relay_s, 1),
        "packet_log_bytes": size, "csv_gz_bytes": csv_size, "generate_s": round(gen_s, 1),
        "cpus": os.cpu_count(),
    }
    out = HERE / "results" / ("search-quick.json" if quick else "search.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'':28}{'seconds':>10}{'ratio':>8}")
    print(f"{'relay logs search':28}{relay_s:>10.3f}{1:>8}")
    print(f"{'zgrep, 14 day files':28}{zgrep_all_s:>10.3f}{zgrep_all_s / relay_s:>8.1f}")
    print(f"{'zgrep, the right day file':28}{zgrep_day_s:>10.3f}{zgrep_day_s / relay_s:>8.1f}")
    print(f"{info['records']} records over {DAYS} days; {packets} matching packets in "
          f"{sessions} sessions; packet log {size / 1e6:.0f} MB, CSV.gz {csv_size / 1e6:.0f} MB")
    print(f"-> {out}")
    if not workdir:
        shutil.rmtree(work)
    return result


if __name__ == "__main__":
    main()
