"""The investigation commands under ``relay logs``: search, export-pcap, verify,
disclose, verify-bundle (registered by relay/cli.py's build_parser)."""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from relay import sessionid
from relay.errors import RelayError
from relay.safeout import csv_cell, escape_text, json_text, private_file

TABLE_COLUMNS = ("session_id", "match", "client", "client_hostname", "client_software", "protocol",
                 "connect", "connect_utc", "disconnect", "disconnect_utc", "packets",
                 "first_packet_utc", "last_packet_utc")

AddDataDir = Callable[[argparse.ArgumentParser], None]
DataDirOf = Callable[[argparse.Namespace], Path]


def _warn(path: str, reason: str) -> None:
    print(f"relay: warning: {escape_text(path)}: {escape_text(reason)}", file=sys.stderr)


def _filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (all optional, combined with AND)")
    g.add_argument("--at", metavar="TIME",
                   help="sessions connected at TIME (ISO 8601 or 'YYYY-MM-DD HH:MM[:SS]'): "
                        "connect <= TIME <= disconnect, or still open; their packets near "
                        "TIME are counted (README: Investigation)")
    g.add_argument("--slack", type=float, default=0.0, metavar="SECONDS",
                   help="with --at: also the sessions connected within SECONDS of TIME, "
                        "shown as match 'near' (default 0: exact matches only)")
    g.add_argument("--from", dest="start", metavar="TIME", help="window start, inclusive")
    g.add_argument("--to", dest="end", metavar="TIME", help="window end, exclusive")
    g.add_argument("--tz", metavar="ZONE", default="UTC",
                   help="zone of times without one, and of the output: an IANA name "
                        "(Asia/Tokyo) or an offset (+09:00); default UTC")
    g.add_argument("--server-ip", metavar="IP", help="the relay address the client reached")
    g.add_argument("--dst", metavar="IP[:PORT]", help="packets to or from this destination")
    g.add_argument("--host", metavar="FQDN", help="sessions that visited this host name "
                   "(HTTP Host / TLS SNI, from the disconnect record)")
    g.add_argument("--client-ip", metavar="IP", help="the client's physical address")
    g.add_argument("--session", metavar="ID", help="a session ID or its prefix (UA tag)")


def query_of(args: argparse.Namespace) -> tuple[Any, Any]:
    """(investigate.Query, tzinfo) from the filter options."""
    from relay import times
    from relay.investigate import search

    tz = times.parse_zone(args.tz)
    q = search.Query()
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
    q.server_ip = search.normalize_ip(args.server_ip, "--server-ip")
    q.client_ip = search.normalize_ip(args.client_ip, "--client-ip")
    if args.dst:
        q.dst_ip, q.dst_port = search.parse_dst(args.dst)
    q.host = args.host.lower().rstrip(".") if args.host else None
    if args.session:
        q.session = sessionid.check(args.session, "--session", prefix=True)
    return q, tz


@contextmanager
def _output(path: str | None, binary: bool = False) -> Iterator[IO[Any]]:
    """stdout for no -o or "-o -", else a private file (safeout.private_file)."""
    if not path or path == "-":
        yield sys.stdout.buffer if binary else sys.stdout
        return
    with private_file(Path(path), binary=binary) as f:
        yield f


def cmd_search(args: argparse.Namespace, data_dir: Path) -> int:
    from relay.investigate import search

    q, tz = query_of(args)
    fmt = "json" if args.json else args.format
    rows, _ = search.search(data_dir, q, on_error=_warn,
                                 progress=search.Progress(0))
    dicts = [search.row_dict(r, tz) for r in rows]
    with _output(args.output) as out:
        if fmt == "json":
            for d in dicts:
                out.write(json_text(d) + "\n")
        elif fmt == "csv":
            fields = list(search.row_dict(search.SessionRow(""), tz))
            w = csv.writer(out)
            w.writerow(fields)
            w.writerows([csv_cell(d[f]) for f in fields] for d in dicts)
        else:
            _table(out, dicts)
    if not rows:
        print("relay: no matching session", file=sys.stderr)
    return 0


def _table(out: IO[str], dicts: list[dict[str, Any]]) -> None:
    cells = [[("session" if c == "session_id" else c) for c in TABLE_COLUMNS]]
    for d in dicts:
        d = {**d, "client": f"{d['client_ip']}:{d['client_port']}" if d["client_ip"] else ""}
        cells.append([escape_text(d[c]) if d[c] not in (None, "") else "-"
                      for c in TABLE_COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE_COLUMNS))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                  + "\n")


def cmd_export_pcap(args: argparse.Namespace, data_dir: Path) -> int:
    from relay.investigate import pcapng, search

    q, _ = query_of(args)
    if not args.output:
        raise RelayError("export-pcap needs -o FILE (pcapng)")
    rows, kept = search.search(data_dir, q, on_error=_warn,
                                    progress=search.Progress(0), keep_packets=True)
    with _output(args.output, binary=True) as out:
        n = pcapng.write(out, (rec for _, rec in kept), app="relay logs export-pcap")
    print(f"{n} packets of {len(rows)} sessions written to {args.output}", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace, data_dir: Path) -> int:
    from relay.investigate import evidence

    report = evidence.verify(data_dir)
    with _output(args.output) as out:
        if args.json:
            out.write(json_text(report.to_dict()) + "\n")
        else:
            out.write(report.text())
    return 0 if report.ok else 1


def cmd_disclose(args: argparse.Namespace, data_dir: Path) -> int:
    from relay.investigate import evidence

    q, tz = query_of(args)
    if not args.output:
        raise RelayError("disclose needs -o FILE (the bundle, a tar file)")
    summary = evidence.disclose(data_dir, q, tz, Path(args.output), on_error=_warn,
                                argv=sys.argv[1:])
    print(f"{summary['sessions']} sessions, {summary['packets']} packets written to "
          f"{args.output}", file=sys.stderr)
    return 0


def cmd_verify_bundle(args: argparse.Namespace, data_dir: Path | None) -> int:
    from relay.investigate import evidence

    report = evidence.verify_bundle(Path(args.bundle), data_dir)
    with _output(args.output) as out:
        if args.json:
            out.write(json_text(report.to_dict()) + "\n")
        else:
            out.write(report.text())
    return 0 if report.ok else 1


def add_parsers(logs: Any, add_data_dir: AddDataDir, data_dir_of: DataDirOf) -> None:
    """Register the subcommands on ``relay logs``'s subparsers."""

    def run(func: Callable[[argparse.Namespace, Path], int]) -> Callable[..., int]:
        return lambda args: func(args, data_dir_of(args))

    p = logs.add_parser(
        "search", help="who was connected at a time, and talked to a destination",
        description="Sessions of the connection log that match the filters, with the "
                    "count and first/last time of their matching packets in the packet log. "
                    "Times print in --tz and in UTC.")
    add_data_dir(p)
    _filters(p)
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=run(cmd_search))

    p = logs.add_parser(
        "export-pcap", help="matching packets as a pcapng file (synthesized headers)",
        description="The packet-log records that search would count, as a pcapng file "
                    "Wireshark and tshark open: headers built from the records, payload "
                    "not stored (captured length < original length), the session ID in "
                    "each packet's comment.")
    add_data_dir(p)
    _filters(p)
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the pcapng file")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run(cmd_export_pcap))

    p = logs.add_parser(
        "verify", help="check the SHA-256 chain over closed log files",
        description="Checks every closed packet-log segment and archive and every sealed "
                    "connection-log day against the evidence chain (DATA_DIR/chain); "
                    "reports modified, missing, reordered, truncated and unchained files "
                    "and broken links, and exits non-zero if there is any.")
    add_data_dir(p)
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=run(cmd_verify))

    p = logs.add_parser(
        "disclose", help="write an evidence bundle for the matching sessions",
        description="A tar file with the matching connection-log records and packet "
                    "records (JSON lines), the packets as pcapng, and a manifest with "
                    "the digests of all of them and the chain links that tie the source "
                    "files to this relay's chain. Check it with verify-bundle.")
    add_data_dir(p)
    _filters(p)
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the bundle (.tar)")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run(cmd_disclose))

    p = logs.add_parser(
        "verify-bundle", help="check a bundle written by disclose",
        description="Checks the manifest's digests of every member and the continuity "
                    "of its chain links; with --data-dir, also that the links are in "
                    "that relay's chain and the records are the ones its files hold.")
    p.add_argument("bundle", metavar="FILE")
    p.add_argument("--data-dir", metavar="DIR",
                   help="a copy of the relay's data directory to check the bundle against")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=lambda args: cmd_verify_bundle(
        args, Path(args.data_dir) if args.data_dir else None))
