"""The investigation commands under ``relay logs``: search, export-pcap, verify,
disclose, verify-bundle (registered by relay/cli.py's build_parser)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay.errors import RelayError
from relay.querycli import RELAY_COLUMNS, add_filters, add_output, output, print_sessions, query_of
from relay.safeout import escape_text, json_text

AddDataDir = Callable[[argparse.ArgumentParser], None]
DataDirOf = Callable[[argparse.Namespace], Path]


def _warn(path: str, reason: str) -> None:
    print(f"relay: warning: {escape_text(path)}: {escape_text(reason)}", file=sys.stderr)


def cmd_search(args: argparse.Namespace, data_dir: Path) -> int:
    from relay.investigate import search

    q, tz = query_of(args)
    rows, _ = search.search(data_dir, q, on_error=_warn, progress=search.Progress(0))
    print_sessions(args, rows, tz, RELAY_COLUMNS)
    return 0


def cmd_export_pcap(args: argparse.Namespace, data_dir: Path) -> int:
    from relay.investigate import pcapng, search

    q, _ = query_of(args)
    if not args.output:
        raise RelayError("export-pcap needs -o FILE (pcapng)")
    rows, kept = search.search(data_dir, q, on_error=_warn,
                                    progress=search.Progress(0), keep_packets=True)
    with output(args.output, binary=True) as out:
        n = pcapng.write(out, (rec for _, rec in kept), app="relay logs export-pcap")
    print(f"{n} packets of {len(rows)} sessions written to {args.output}", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace, data_dir: Path) -> int:
    from relay.investigate import evidence

    report = evidence.verify(data_dir)
    with output(args.output) as out:
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
    with output(args.output) as out:
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
    add_filters(p)
    add_output(p)
    p.set_defaults(func=run(cmd_search))

    p = logs.add_parser(
        "export-pcap", help="matching packets as a pcapng file (synthesized headers)",
        description="The packet-log records that search would count, as a pcapng file "
                    "Wireshark and tshark open: headers built from the records, payload "
                    "not stored (captured length < original length), the session ID in "
                    "each packet's comment.")
    add_data_dir(p)
    add_filters(p)
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
    add_filters(p)
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
