"""The options and the output of the session searches: ``relay logs search`` on a
relay and ``relay collector search`` across the fleet take the same filters,
read times by the same zone rules and print the same rows (table, JSON lines or
CSV, escaped by relay.safeout)."""

from __future__ import annotations

import argparse
import csv
import math
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from relay import sessionid, times
from relay.errors import RelayError
from relay.safeout import csv_cell, escape_text, json_text, private_file
from relay.sessionquery import (
    Query,
    SessionRow,
    normalize_host,
    normalize_ip,
    parse_dst,
    row_dict,
)

# The relay's table: packets are what it adds to the connection log.
RELAY_COLUMNS = ("session_id", "match", "client", "client_hostname", "client_software",
                 "protocol", "connect", "connect_utc", "disconnect", "disconnect_utc",
                 "packets", "first_packet_utc", "last_packet_utc")
# The collector's table: which relay, and no packets (they never leave a relay).
FLEET_COLUMNS = ("session_id", "match", "server_id", "server_ip", "client", "client_hostname",
                 "client_software", "protocol", "connect", "connect_utc", "disconnect",
                 "disconnect_utc")
FORMATS = ("table", "json", "csv")
# A progress line appears only when a query outlives this (as the relay's
# segment scan does it: a quick answer should not flash one), and is redrawn
# this often.
PROGRESS_AFTER_S = 1.0
PROGRESS_EVERY_S = 0.2


def add_filters(p: argparse.ArgumentParser, *, fleet: bool = False) -> None:
    g = p.add_argument_group("filters (all optional, combined with AND)")
    g.add_argument("--at", metavar="TIME",
                   help="sessions connected at TIME (ISO 8601 or 'YYYY-MM-DD HH:MM[:SS]'): "
                        "connect <= TIME <= disconnect, or still open" +
                        ("" if fleet else "; their packets near TIME are counted") +
                        " (README: Investigation)")
    g.add_argument("--slack", type=float, default=0.0, metavar="SECONDS",
                   help="with --at: also the sessions connected within SECONDS of TIME, "
                        "shown as match 'near' (default 0: exact matches only)")
    g.add_argument("--from", dest="start", metavar="TIME", help="window start, inclusive")
    g.add_argument("--to", dest="end", metavar="TIME", help="window end, exclusive")
    g.add_argument("--tz", metavar="ZONE", default="UTC",
                   help="zone of times without one, and of the output: an IANA name "
                        "(Asia/Tokyo) or an offset (+09:00); default UTC")
    if fleet:
        g.add_argument("--server-id", metavar="ID", help="the relay (its [server] id)")
    g.add_argument("--server-ip", metavar="IP", help="the relay address the client reached")
    g.add_argument("--dst", metavar="IP[:PORT]",
                   help="sessions whose disconnect record lists this destination"
                   if fleet else "packets to or from this destination")
    g.add_argument("--host", metavar="FQDN", help="sessions that visited this host name "
                   "(HTTP Host / TLS SNI, from the disconnect record)")
    g.add_argument("--client-ip", metavar="IP", help="the client's physical address")
    g.add_argument("--session", metavar="ID", help="a session ID or its prefix (UA tag)")


def add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")


def query_of(args: argparse.Namespace) -> tuple[Query, Any]:
    """(Query, tzinfo) from the filter options."""
    tz = times.parse_zone(args.tz)
    q = Query()
    if args.at and (args.start or args.end):
        raise RelayError("give --at or --from/--to, not both")
    if not (math.isfinite(args.slack) and args.slack >= 0):
        raise RelayError(f"--slack {args.slack}: give a number of seconds >= 0")
    if args.slack and not args.at:
        raise RelayError("--slack widens --at: give --at too")
    if args.at:
        q.at = times.parse_time(args.at, tz, "--at").timestamp()
        q.slack = args.slack
    if args.start:
        q.lo = times.parse_time(args.start, tz, "--from").timestamp()
    if args.end:
        q.hi = times.parse_time(args.end, tz, "--to").timestamp()
    if q.lo is not None and q.hi is not None and q.hi <= q.lo:
        raise RelayError("the window is empty: --to must be after --from")
    q.server_id = getattr(args, "server_id", None) or None
    q.server_ip = normalize_ip(args.server_ip, "--server-ip")
    q.client_ip = normalize_ip(args.client_ip, "--client-ip")
    if args.dst:
        q.dst_ip, q.dst_port = parse_dst(args.dst)
    q.host = normalize_host(args.host) if args.host else None
    if args.session:
        q.session = sessionid.check(args.session, "--session", prefix=True)
    return q, tz


@contextmanager
def output(path: str | None, binary: bool = False) -> Iterator[IO[Any]]:
    """stdout for no -o or "-o -", else a private file (safeout.private_file)."""
    if not path or path == "-":
        yield sys.stdout.buffer if binary else sys.stdout
        return
    with private_file(Path(path), binary=binary) as f:
        yield f


def print_sessions(args: argparse.Namespace, rows: Sequence[SessionRow], tz: Any,
                   columns: Sequence[str]) -> None:
    """The rows in --format (or --json) to -o or stdout; "no matching session" on
    stderr when there is none."""
    fmt = "json" if args.json else args.format
    dicts = [row_dict(r, tz) for r in rows]
    with output(args.output) as out:
        if fmt == "json":
            for d in dicts:
                out.write(json_text(d) + "\n")
        elif fmt == "csv":
            fields = list(row_dict(SessionRow(""), tz))
            w = csv.writer(out)
            w.writerow(fields)
            w.writerows([csv_cell(d[f]) for f in fields] for d in dicts)
        else:
            table(out, dicts, columns)
    if not rows:
        print("relay: no matching session", file=sys.stderr)


def table(out: IO[str], dicts: list[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[("session" if c == "session_id" else c) for c in columns]]
    for d in dicts:
        d = {**d, "client": f"{d['client_ip']}:{d['client_port']}" if d["client_ip"] else ""}
        cells.append([escape_text(d[c]) if d[c] not in (None, "") else "-" for c in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                  + "\n")


class Elapsed:
    """"WHAT... 3.2 s" on stderr while a query runs, only on a terminal and only
    after PROGRESS_AFTER_S (the engine gives no row count to show)."""

    def __init__(self, what: str, stream: IO[str] | None = None) -> None:
        self.what = what
        self.stream = stream or sys.stderr
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Elapsed:
        if self.stream.isatty():
            self._thread = threading.Thread(target=self._draw, daemon=True)
            self._thread.start()
        return self

    def _draw(self) -> None:
        started = time.monotonic()
        if self._done.wait(PROGRESS_AFTER_S):
            return
        while not self._done.wait(PROGRESS_EVERY_S):
            self.stream.write(f"\r{self.what}... {time.monotonic() - started:.1f} s")
            self.stream.flush()
        self.stream.write("\r\033[K")
        self.stream.flush()

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
