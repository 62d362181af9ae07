"""The options every command that reads the logs shares, parsed in one place.

``relay logs connections|packets|search|export-pcap|disclose|ua-lookup|access``,
``relay collector search``, ``relay ban list`` and ``relay sessions`` take the
same filters (``--at``, ``--slack``, ``--from``, ``--to``, ``--tz``,
``--session``, ``--client-ip``, and where they apply ``--server-id``,
``--server-ip``, ``--dst``, ``--host``), the same output options
(``--format table|json|csv``, ``--json``, ``-o FILE``), check ``--data-dir`` the
same way and end with the same exit statuses (relay.errors): all from here.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import tzinfo
from pathlib import Path
from typing import IO, Any

from relay import chain, sessionid, times
from relay.config import parse_duration_arg
from relay.connlog import daylog
from relay.errors import EXIT_INCOMPLETE, EXIT_NOTHING, EXIT_OK, RelayError
from relay.safeout import csv_cell, escape_text, json_text, private_file
from relay.sessionquery import Query, normalize_host, normalize_ip, parse_dst

FORMATS = ("table", "json", "csv")
# --slack widens --at; a week either side of a reported moment already names
# everyone who was connected that week, and keeps every window a datetime.
MAX_SLACK_S = 7 * 86400
# A query's "working..." line appears only when it outlives this (a quick answer
# should not flash one), and is redrawn this often.
PROGRESS_AFTER_S = 1.0
PROGRESS_EVERY_S = 0.2

_HELP = {
    "at": "sessions connected at TIME (ISO 8601 or 'YYYY-MM-DD HH:MM[:SS]'; a time without "
          "a zone is read in --tz)",
    "slack": "with --at: also what lies within DURATION of TIME, e.g. 30s or 5m",
    "start": "window start, inclusive (a time as for --at)",
    "end": "window end, exclusive",
    "tz": "zone of times given without one, and of the times printed: an IANA name "
          "(Asia/Tokyo) or an offset (+09:00); default UTC",
    "session": "a session ID or its start (a User-Agent tag)",
    "client_ip": "the client's physical address",
    "server_id": "the relay (its [server] id)",
    "server_ip": "the relay address the client reached",
    "dst": "packets to or from this destination, IP[:PORT] or [IPv6]:PORT",
    "host": "sessions that visited this host name (HTTP Host / TLS SNI, from the "
            "disconnect record)",
}


def add_filters(p: argparse.ArgumentParser, names: Sequence[str], *,
                slack_default: str = "0s", help_for: dict[str, str] | None = None) -> None:
    """The filters ``names`` (of at, slack, start, end, tz, session, client_ip,
    server_ip, dst, host) on ``p``; ``help_for`` words a command's own meaning."""
    helps = {**_HELP, **(help_for or {})}
    if "slack" in names:
        helps["slack"] += f" (default {slack_default})"
    flags = {"start": "--from", "end": "--to"}
    metavars = {"at": "TIME", "start": "TIME", "end": "TIME", "slack": "DURATION",
                "tz": "ZONE", "session": "ID", "client_ip": "IP", "server_id": "ID",
                "server_ip": "IP",
                "dst": "IP[:PORT]", "host": "FQDN"}
    g = p.add_argument_group("filters (all optional, combined with AND)")
    for name in names:
        flag = flags.get(name, "--" + name.replace("_", "-"))
        g.add_argument(flag, dest=name, metavar=metavars[name], help=helps[name])
    p.set_defaults(slack_default=slack_default)


def add_output(p: argparse.ArgumentParser, formats: Sequence[str] = FORMATS, *,
               output: str | None = "write here (mode 0600) instead of stdout") -> None:
    """``--format`` (``--json`` for ``--format json``) and, with ``output``'s help
    text, ``-o FILE``."""
    if len(formats) > 1:
        p.add_argument("--format", choices=formats, default=formats[0],
                       help=f"output format (default {formats[0]})")
    else:
        p.set_defaults(format=formats[0])
    if "json" in formats:
        p.add_argument("--json", action="store_true", help="same as --format json")
    if output is not None:
        p.add_argument("-o", "--output", metavar="FILE", help=output)


def output_format(args: argparse.Namespace) -> str:
    return "json" if getattr(args, "json", False) else str(args.format)


def query_of(args: argparse.Namespace) -> tuple[Query, tzinfo]:
    """(the search Query, the --tz zone) from whichever filters the command has.
    Every time given without a zone is said on stderr with the UTC time it was
    read as, so the investigator sees which zone was used."""
    def opt(name: str) -> Any:
        return getattr(args, name, None)

    tz = times.parse_zone(opt("tz"))
    q = Query()
    if opt("at") and (opt("start") or opt("end")):
        raise RelayError("give --at or --from/--to, not both")
    if opt("slack") is not None and not opt("at"):
        raise RelayError("--slack widens --at: give --at too")
    given: list[tuple[str, str, float]] = []
    for name, flag in (("at", "--at"), ("start", "--from"), ("end", "--to")):
        if opt(name):
            when = times.parse_time(opt(name), tz, flag)
            given.append((flag, opt(name), when.timestamp()))
            setattr(q, {"at": "at", "start": "lo", "end": "hi"}[name], when.timestamp())
    if q.at is not None:
        q.slack = float(parse_duration_arg(opt("slack") or getattr(args, "slack_default", "0s"),
                                           "--slack"))
        if q.slack > MAX_SLACK_S:
            raise RelayError(f"--slack {opt('slack')}: at most {MAX_SLACK_S // 86400}d")
    if q.lo is not None and q.hi is not None and q.hi <= q.lo:
        raise RelayError("the window is empty: --to must be after --from")
    naive = [(flag, text, ts) for flag, text, ts in given if not times.has_zone(text)]
    if naive:
        read = ", ".join(f"{flag} {text.strip()} is {times.format_utc(ts)}"
                         for flag, text, ts in naive)
        print(f"relay: note: times without a zone read in {times.zone_name(tz)}: "
              f"{escape_text(read)}", file=sys.stderr)
    q.server_id = opt("server_id") or None
    q.server_ip = normalize_ip(opt("server_ip"), "--server-ip")
    q.client_ip = normalize_ip(opt("client_ip"), "--client-ip")
    if opt("dst"):
        q.dst_ip, q.dst_port = parse_dst(opt("dst"))
    q.host = normalize_host(opt("host")) if opt("host") else None
    if opt("session"):
        q.session = sessionid.check(opt("session"), "--session", prefix=True)
    return q, tz


class Results:
    """What a command found and whether it read everything it needed: its
    warnings go to stderr, and :meth:`status` is its exit status."""

    def __init__(self) -> None:
        self.incomplete = False

    def warn(self, where: str, reason: str | None = None) -> None:
        """A file (or part of one) that could not be read: the results may lack
        what it held."""
        self.incomplete = True
        text = where if reason is None else f"{where}: {reason}"
        print(f"relay: warning: {escape_text(text)}", file=sys.stderr)

    def status(self, found: bool) -> int:
        if self.incomplete:
            return EXIT_INCOMPLETE
        return EXIT_OK if found else EXIT_NOTHING

    def check_packet_log(self, data_dir: Path, q: Query,
                         sessions: Iterable[tuple[float | None, float | None]]) -> None:
        """The answer counts (or exports) the packets of ``sessions`` ((connect,
        disconnect) epoch times, None when unknown or still open) within the
        query's packet window: where the packet log cannot answer for part of
        that (no packet log at all, or segments deleted or missing), say so once
        per cause and count the results incomplete."""
        lo, hi = q.packet_window
        needed = []
        for start, end in sessions:
            a = max((x for x in (lo, start) if x is not None), default=-math.inf)
            b = min((x for x in (hi, end) if x is not None), default=math.inf)
            if a <= b:
                needed.append((a, b))
        if not needed:
            return
        gaps = packet_log_gaps(data_dir)
        if gaps is None:
            self.warn(str(data_dir), f"no packet log: the packets of {len(needed)} "
                                     "session(s) are unknown")
            return
        for g_lo, g_hi, why in gaps:
            hit = sum(1 for a, b in needed if a <= g_hi and g_lo <= b)
            if hit:
                self.warn(str(data_dir), f"the packet log from {times.format_utc(g_lo)} to "
                                         f"{times.format_utc(g_hi)} is {why}: packets of "
                                         f"{hit} session(s) in it are unknown")


def packet_log_gaps(data_dir: Path) -> list[tuple[float, float, str]] | None:
    """Times the packet log cannot answer for, per the packets chain: segments
    that retention deleted, and segments missing from the directory (with the
    time range their close or archive link recorded); None when there is no
    packet log at all (no segment and no chain)."""
    from relay.packetlog import segments

    links = chain.read_links(chain.chain_path(data_dir, chain.PACKETS_CHAIN))
    on_disk = {p.name for p in segments.segment_files(data_dir)}
    if not links and not on_disk:
        return None
    live: dict[str, dict[str, Any]] = {}
    gaps = []

    def gap(link: dict[str, Any], why: str) -> None:
        t_min, t_max = link.get("t_min"), link.get("t_max")
        if isinstance(t_min, int) and isinstance(t_max, int):
            gaps.append((t_min / times.NS, t_max / times.NS, why))

    for _, link in links:
        if not link:
            continue
        name = str(link.get("file"))
        if link.get("event") in ("close", "archive"):
            live.pop(str(link.get("source")), None)
            live[name] = link
        elif link.get("event") == "delete" and name in live:
            gap(live.pop(name), f"deleted ({link.get('reason') or 'retention'})")
    for name, link in live.items():
        if name not in on_disk:
            gap(link, f"missing ({name} is chained but not in the directory)")
    return sorted(gaps)


def require_relay_data(path: Path, *, existing_dir: bool = False) -> Path:
    """``path`` if it holds a relay's (or a relay directory's) data, or a copy of
    it: a connection log, a packet log or an evidence chain. Anything else is
    refused, so that a mistyped --data-dir never reads as "nothing found". With
    ``existing_dir`` (a command that writes there, as ban add before the relay's
    first start), any existing directory will do."""
    from relay.packetlog import segments

    marks = (daylog.SUBDIR, segments.PACKETS_DIR, chain.CHAIN_DIR)
    why = None
    if not path.exists():
        why = "it does not exist"
    elif not path.is_dir():
        why = "it is not a directory"
    elif not existing_dir and not any((path / mark).is_dir() for mark in marks):
        why = f"no {', '.join(m + '/' for m in marks)} in it"
    if why is not None:
        raise RelayError(f"{path} holds no relay data ({why}); give the relay's data "
                         "directory with --data-dir, or its config with --config")
    return path


@contextmanager
def open_output(args: argparse.Namespace, binary: bool = False) -> Iterator[IO[Any]]:
    """stdout for no -o or "-o -", else a private file (safeout.private_file)."""
    path = getattr(args, "output", None)
    if not path or path == "-":
        yield sys.stdout.buffer if binary else sys.stdout
        return
    with private_file(Path(path), binary=binary) as f:
        yield f


class RowWriter:
    """Rows (dicts) as JSON lines, CSV (``fields``, cells escaped as
    safeout.csv_cell does) or a table: ``line`` makes a row's line as it comes,
    else the ``columns`` are aligned once every row is in."""

    def __init__(self, out: IO[str], fmt: str, fields: Sequence[str], *,
                 columns: Sequence[tuple[str, str]] = (),
                 line: Callable[[dict[str, Any]], str] | None = None) -> None:
        self.out, self.fmt, self.fields = out, fmt, fields
        self.columns, self.line = columns, line
        self.rows = 0
        self._held: list[list[str]] = []
        self._csv = csv.writer(out) if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(fields)

    def write(self, row: dict[str, Any]) -> None:
        self.rows += 1
        if self.fmt == "json":
            self.out.write(json_text(row) + "\n")
        elif self._csv is not None:
            self._csv.writerow([csv_cell(_cell(row.get(f))) for f in self.fields])
        elif self.line is not None:
            self.out.write(self.line(row) + "\n")
        else:
            self._held.append([escape_text(_cell(row.get(key))) or "-"
                               for key, _ in self.columns])

    def close(self) -> None:
        if self.fmt != "table" or self.line is not None:
            return
        cells = [[title for _, title in self.columns], *self._held]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        for row in cells:
            self.out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                           .rstrip() + "\n")


def _cell(value: Any) -> str:
    """A value as one table or CSV cell: lists and objects as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json_text(value)
    return str(value)


class Elapsed:
    """"WHAT... 3.2 s" on stderr while a query runs, only on a terminal and only
    after PROGRESS_AFTER_S (for an engine that gives no row count to show)."""

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
