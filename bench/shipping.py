"""Records/s of connection-log shipping: to rsyslogd and to relay collector, side by side.

Two measurements, each against both receivers in the same run:

- end to end: the forwarder process (``run_forwarder`` on uvloop) ships N records
  already in the connection log; the clock stops when the receiver has them
  all on disk (rsyslogd's omfile output, the collector's day file);
- receiver ingest: N pre-formatted, octet-counted messages sent as fast as one
  TLS connection allows, so that the receivers are compared without the
  forwarder's per-record formatting.

A third measures what shipping costs the event loop of ``relay serve`` while a
large backlog waits (the collector down): the time of one ``/metrics`` scrape
of the shipping gauges and the longest stall of a 5 ms ticker on the same loop,
with a backlog of compressed days against none.

Prints a table and writes bench/results/shipping.json. Needs rsyslog and
rsyslog-gnutls (Debian); run as ``.venv/bin/python bench/shipping.py [-n N]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from shiputil import (
    Pki,
    Proc,
    free_port,
    hostile_record,
    make_pki,
    rsyslog_global,
    start_collector,
    start_forwarder,
    start_rsyslog,
    write_records,
)

from bench.common import Row
from relay.protocols import syslog5424 as s5

RESULTS = Path(__file__).resolve().parent / "results" / "shipping.json"
# Long enough that start-up (a Python process, the first handshake) is a few
# per cent of the run.
DEFAULT_RECORDS = 50_000
# Quick mode: enough records for the rate to settle, in seconds.
QUICK_RECORDS = 5_000
POLL_S = 0.02
TIMEOUT_S = 600.0


def count_lines(paths: Callable[[], list[Path]]) -> int:
    total = 0
    for p in paths():
        try:
            with open(p, "rb") as f:
                total += sum(chunk.count(b"\n") for chunk in iter(lambda f=f: f.read(1 << 20), b""))
        except FileNotFoundError:
            continue
    return total


def wait_count(paths: Callable[[], list[Path]], n: int, t0: float) -> float:
    while count_lines(paths) < n:
        if time.perf_counter() - t0 > TIMEOUT_S:
            raise SystemExit(f"timed out: {count_lines(paths)} of {n} records arrived")
        time.sleep(POLL_S)
    return time.perf_counter() - t0


def rsyslog(tmp: Path, pki: Pki, out: Path) -> tuple[Proc, int]:
    port = free_port()
    conf = rsyslog_global(tmp, pki) + f"""
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode="anon")
input(type="imtcp" port="{port}" address="127.0.0.1")
action(type="omfile" file="{out}" template="RSYSLOG_SyslogProtocol23Format")
"""
    return start_rsyslog(tmp, conf, [port]), port


def collector_files(tmp: Path) -> Callable[[], list[Path]]:
    return lambda: list((tmp / "collector" / "relay-1").glob("*.jsonl"))


def end_to_end(root: Path, pki: Pki, n: int, receiver: str) -> float:
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"e2e-{receiver}-"))
    relay = tmp / "relay"
    write_records(relay, n)
    if receiver == "rsyslog":
        out = tmp / "out.log"
        server, port = rsyslog(tmp, pki, out)
        files: Callable[[], list[Path]] = lambda: [out]  # noqa: E731
    else:
        port = free_port()
        server = start_collector(tmp, port, pki)
        files = collector_files(tmp)
    t0 = time.perf_counter()
    fwd = start_forwarder(tmp, relay, port, pki)
    try:
        return n / wait_count(files, n, t0)
    finally:
        fwd.stop()
        server.stop()


def ingest(root: Path, pki: Pki, n: int, receiver: str) -> float:
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"ingest-{receiver}-"))
    records = [{**r, "id": f"{i:024x}"} for i, r in enumerate(write_records(tmp / "gen", 1000))]
    # As the forwarder formats them for relay collector (the SD holds the id
    # only); both receivers get the same bytes.
    stream = b"".join(
        s5.frame(s5.format_record({**records[i % 1000], "id": f"{i:024x}"},
                                  hostname="relay-1", procid="1", sd_fields=False))
        for i in range(n))
    if receiver == "rsyslog":
        out = tmp / "out.log"
        server, port = rsyslog(tmp, pki, out)
        files: Callable[[], list[Path]] = lambda: [out]  # noqa: E731
    else:
        port = free_port()
        server = start_collector(tmp, port, pki)
        files = collector_files(tmp)
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(pki.client_cert, pki.client_key)  # relay-1's, as a relay sends
    try:
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(stream)
            tls.unwrap()
        return n / wait_count(files, n, t0)
    finally:
        server.stop()


# The stall measurement: days of compressed connection log waiting to be shipped
# (a relay whose collector has been away for a while), records per day, and how
# long the loop is watched.
STALL_DAYS = 10
STALL_RECORDS_PER_DAY = 40_000
QUICK_STALL_RECORDS_PER_DAY = 10_000
STALL_WATCH_S = 8.0
TICK_S = 0.005
SCRAPES = 20


def write_backlog(data_dir: Path, days: int, per_day: int) -> None:
    """``days`` finished days as .jsonl.zst (as retention leaves them) and today's."""
    import zstandard

    from relay.connlog.daylog import SUBDIR, ensure_dir, new_record_id
    from relay.connlog.retention import ZSTD_LEVEL

    d = ensure_dir(data_dir / SUBDIR)
    today = time.time() // 86400 * 86400
    for n in range(days, -1, -1):
        day = time.strftime("%Y-%m-%d", time.gmtime(today - n * 86400))
        lines = b"".join(
            json.dumps({"id": new_record_id(), "time": f"{day}T12:00:00.000Z",
                        **hostile_record(i)}, separators=(",", ":")).encode() + b"\n"
            for i in range(per_day if n else 10))
        if n:
            (d / f"{day}.jsonl.zst").write_bytes(
                zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(lines))
        else:
            (d / f"{day}.jsonl").write_bytes(lines)


def loop_cost(root: Path, days: int, per_day: int) -> dict[str, float]:
    """Scrape time (median) and the longest loop stall while the forwarder of
    ``relay serve`` (relay.connlog.shipping) faces an unreachable collector."""
    import asyncio
    import dataclasses
    import statistics

    import uvloop

    from relay import config
    from relay.connlog.shipping import Shipping

    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"stall-{days}-"))
    write_backlog(tmp / "data", days, per_day)
    cfg = config.load(None).with_data_dir(tmp / "data")
    cfg = dataclasses.replace(cfg, forward=dataclasses.replace(
        cfg.forward, collector=f"127.0.0.1:{free_port()}", ca=str(make_pki(tmp / "pki").ca)))

    async def main() -> dict[str, float]:
        shipping = Shipping(cfg, lambda record: None)
        shipping.start()
        loop = asyncio.get_running_loop()
        stalls: list[float] = []
        scrapes: list[float] = []
        t_end = loop.time() + STALL_WATCH_S
        next_scrape = loop.time() + STALL_WATCH_S / 2
        while (now := loop.time()) < t_end:
            t0 = time.perf_counter()
            await asyncio.sleep(TICK_S)
            stalls.append(time.perf_counter() - t0 - TICK_S)
            if now >= next_scrape and len(scrapes) < SCRAPES:
                t0 = time.perf_counter()
                shipping.metrics()
                scrapes.append(time.perf_counter() - t0)
        await shipping.close()
        return {"scrape_s": statistics.median(scrapes), "stall_max_s": max(stalls)}

    return uvloop.run(main())


def run(quick: bool) -> list[Row]:
    """The suite's entry: records/s of relay collector against rsyslogd."""
    n = QUICK_RECORDS if quick else DEFAULT_RECORDS
    rows = measure(n, QUICK_STALL_RECORDS_PER_DAY if quick else STALL_RECORDS_PER_DAY)
    out = [Row("shipping", f"records/s, {label}", "records/s", "rsyslogd",
               rows[f"{kind}/rsyslog"], "relay collector", rows[f"{kind}/collector"], 1)
           for kind, label in (("end_to_end", "forwarder -> receiver"),
                               ("ingest", "receiver ingest"))]
    backlog = f"{STALL_DAYS} compressed days waiting"
    out += [Row("shipping", f"/metrics scrape, {backlog} vs none", "seconds", "no backlog",
                rows["scrape/none"], "backlog", rows["scrape/backlog"], SCRAPES,
                higher_is_better=False),
            Row("shipping", f"longest event-loop stall, {backlog} vs none", "seconds",
                "no backlog", rows["stall/none"], "backlog", rows["stall/backlog"], 1,
                higher_is_better=False)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=DEFAULT_RECORDS, help="records per run")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_RECORDS} records per run")
    ap.add_argument("--stall-only", action="store_true",
                    help="only the event-loop measurement (no rsyslogd needed)")
    args = ap.parse_args()
    per_day = QUICK_STALL_RECORDS_PER_DAY if args.quick else STALL_RECORDS_PER_DAY
    if args.stall_only:
        with tempfile.TemporaryDirectory(prefix="relay-bench-shipping-") as d:
            for name, days in (("none", 0), ("backlog", STALL_DAYS)):
                print(name, loop_cost(Path(d), days, per_day))
        return
    measure(QUICK_RECORDS if args.quick else args.n, per_day)


def measure(n: int, per_day: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="relay-bench-shipping-") as d:
        root = Path(d)
        pki = make_pki(root / "pki")
        rows = {}
        for kind, fn in (("end_to_end", end_to_end), ("ingest", ingest)):
            for receiver in ("rsyslog", "collector"):
                rows[f"{kind}/{receiver}"] = fn(root, pki, n, receiver)
        for name, days in (("none", 0), ("backlog", STALL_DAYS)):
            cost = loop_cost(root, days, per_day)
            rows[f"scrape/{name}"], rows[f"stall/{name}"] = cost["scrape_s"], cost["stall_max_s"]
    result = {
        "records": n,
        "records_per_s": {k: round(v) for k, v in rows.items() if "/" in k
                          and k.split("/")[0] in ("end_to_end", "ingest")},
        "collector_vs_rsyslog": {
            kind: round(rows[f"{kind}/collector"] / rows[f"{kind}/rsyslog"], 2)
            for kind in ("end_to_end", "ingest")},
        "event_loop": {"backlog_days": STALL_DAYS, "records_per_day": per_day,
                       **{k: round(v, 6) for k, v in rows.items()
                          if k.split("/")[0] in ("scrape", "stall")}},
        "host": {"python": platform.python_version(), "machine": platform.machine(),
                 "kernel": platform.release()},
    }
    print(f"{'records/s':<22}{'rsyslogd':>12}{'collector':>12}{'ratio':>8}   (N={n})")
    for kind, label in (("end_to_end", "forwarder -> receiver"),
                        ("ingest", "receiver ingest")):
        r, c = rows[f"{kind}/rsyslog"], rows[f"{kind}/collector"]
        print(f"{label:<22}{r:>12,.0f}{c:>12,.0f}{c / r:>8.2f}")
    print(f"{'seconds':<22}{'no backlog':>12}{'backlog':>12}")
    for kind in ("scrape", "stall"):
        print(f"{kind:<22}{rows[kind + '/none']:>12.4f}{rows[kind + '/backlog']:>12.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {RESULTS}")
    return rows


if __name__ == "__main__":
    main()
