"""The investigation commands under ``relay logs``: search, export-pcap, verify,
disclose, verify-bundle (registered by relay/cli.py's build_parser)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import tzinfo
from pathlib import Path
from typing import Any

from relay import sessionid
from relay.errors import EXIT_INCOMPLETE, EXIT_OK, RelayError
from relay.investigate.options import (
    Results,
    RowWriter,
    add_filters,
    add_output,
    open_output,
    output_format,
    query_of,
    require_relay_data,
)
from relay.netaddr import hostport
from relay.safeout import escape_text, json_text
from relay.sessionquery import SessionRow, row_dict

# The table's columns (JSON and CSV carry every field of sessionquery.row_dict).
TABLE_COLUMNS = tuple((c, "session" if c == "session_id" else c) for c in (
    "session_id", "match", "client", "client_hostname", "client_software", "protocol",
    "connect", "connect_utc", "disconnect", "disconnect_utc", "packets", "first_packet_utc",
    "last_packet_utc"))
UA_LOOKUP_COLUMNS = (("session_id", "session"), ("server_id", "relay"), ("client", "client"),
                     ("client_software", "client_software"), ("connect", "connect"),
                     ("disconnect", "disconnect"))

AddDataDir = Callable[[argparse.ArgumentParser], None]
DataDirOf = Callable[[argparse.Namespace], Path]
SEARCH_FILTERS = ("at", "slack", "start", "end", "tz", "server_ip", "dst", "host", "client_ip",
                  "session")


def _filters(p: argparse.ArgumentParser) -> None:
    add_filters(p, SEARCH_FILTERS, help_for={
        "at": "sessions connected at TIME (ISO 8601 or 'YYYY-MM-DD HH:MM[:SS]', read in "
              "--tz): connect <= TIME <= disconnect, or still open; their packets near "
              "TIME are counted (README: Investigation)",
        "slack": "with --at: also the sessions connected within DURATION of TIME, shown "
                 "as match 'near'"})


def search_fields(tz: tzinfo, *, packets: bool = True) -> list[str]:
    """The fields of a session as search prints it (JSON keys, CSV columns)."""
    return list(row_dict(SessionRow(""), tz, packets=packets))


def write_sessions(args: argparse.Namespace, rows: list[Any], tz: tzinfo,
                   columns: tuple[tuple[str, str], ...] = TABLE_COLUMNS, *,
                   packets: bool = True) -> None:
    """Sessions as search prints them: table, JSON lines or CSV (-o too);
    without ``packets`` (the fleet's search) no packet-log fields."""
    with open_output(args) as out:
        w = RowWriter(out, output_format(args), search_fields(tz, packets=packets),
                      columns=columns)
        for r in rows:
            d = row_dict(r, tz, packets=packets)
            d["client"] = hostport(d["client_ip"], d["client_port"]) if d["client_ip"] else ""
            if w.fmt != "table":
                del d["client"]
            w.write(d)
        w.close()


def spans(rows: list[Any]) -> list[tuple[float | None, float | None]]:
    """(start, end) of each session row, for Results.check_packet_log: a session
    the connection log lost starts with its first packet."""
    from relay.times import NS

    return [(r.connect_ts if r.connect_ts is not None
             else (r.first_ns / NS if r.first_ns is not None else None), r.disconnect_ts)
            for r in rows]


def searched(data_dir: Path, q: Any, results: Results,
             keep_packets: bool = False) -> tuple[list[Any], list[Any]]:
    """search.search, its warnings and the packet log's reach counted in
    ``results``: the sessions it names, and with --dst also those it could not
    rule in or out without packets."""
    from relay.investigate import search

    rows, kept = search.search(data_dir, q, on_error=results.warn,
                               progress=search.Progress(0), keep_packets=keep_packets)
    needed = spans(rows)
    if q.packet_filter:
        candidates, _ = search.find_sessions(data_dir, q)
        needed += spans(list(candidates.values()))
    results.check_packet_log(data_dir, q, needed)
    return rows, kept


def cmd_search(args: argparse.Namespace, data_dir: Path) -> int:
    q, tz = query_of(args)
    results = Results()
    rows, _ = searched(data_dir, q, results)
    write_sessions(args, rows, tz)
    if not rows:
        print("relay: no matching session", file=sys.stderr)
    return results.status(bool(rows))


def cmd_ua_lookup(args: argparse.Namespace, data_dir: Path) -> int:
    """search --session TAG, the tag read off the end of a stamped User-Agent."""
    from relay.investigate import search

    tail = args.user_agent.strip()[-sessionid.TAG_LEN:]
    if not tail:
        raise RelayError("ua-lookup: the User-Agent is empty")
    if not sessionid.is_prefix(tail):
        raise RelayError(f"ua-lookup: {tail!r} ends the User-Agent, and no tag looks like "
                         f"that ({sessionid.TAG_LEN} URL-safe base64 characters)")
    q, tz = query_of(args)
    q.session = tail
    results = Results()
    # The connection log names the sessions; each one's packets are then counted
    # by its whole ID, which the segments' indexes find without a full scan.
    named, _ = search.find_sessions(data_dir, q, on_error=results.warn)
    rows = [row for sid in named
            for row in searched(data_dir, replace(q, session=sid), results)[0]]
    write_sessions(args, rows, tz, UA_LOOKUP_COLUMNS)
    if not rows:
        print(f"relay: no session with tag {escape_text(tail)} in {escape_text(data_dir)}",
              file=sys.stderr)
    return results.status(bool(rows))


def cmd_export_pcap(args: argparse.Namespace, data_dir: Path) -> int:
    from relay.investigate import pcapng

    q, _ = query_of(args)
    results = Results()
    rows, kept = searched(data_dir, q, results, keep_packets=True)
    with open_output(args, binary=True) as out:
        n = pcapng.write(out, (rec for _, rec in kept), app="relay logs export-pcap")
    print(f"{n} packets of {len(rows)} sessions written to {escape_text(args.output)}",
          file=sys.stderr)
    return results.status(bool(n))


def cmd_verify(args: argparse.Namespace, data_dir: Path) -> int:
    from relay.investigate import evidence

    report = evidence.verify(data_dir)
    with open_output(args) as out:
        if output_format(args) == "json":
            out.write(json_text(report.to_dict()) + "\n")
        else:
            out.write(report.text())
    return EXIT_OK if report.ok else EXIT_INCOMPLETE


def cmd_disclose(args: argparse.Namespace, data_dir: Path) -> int:
    from relay.investigate import evidence, search

    q, tz = query_of(args)
    results = Results()
    summary = evidence.disclose(data_dir, q, tz, Path(args.output), on_error=results.warn,
                                argv=sys.argv[1:])
    # The sessions the bundle can hold packets of: the connection log names them.
    candidates, _ = search.find_sessions(data_dir, q)
    results.check_packet_log(data_dir, q, spans(list(candidates.values())))
    print(f"{summary['sessions']} sessions, {summary['packets']} packets written to "
          f"{escape_text(args.output)}", file=sys.stderr)
    return results.status(bool(summary["sessions"]))


def cmd_verify_bundle(args: argparse.Namespace, data_dir: Path | None) -> int:
    from relay.investigate import evidence

    report = evidence.verify_bundle(Path(args.bundle), data_dir)
    with open_output(args) as out:
        if output_format(args) == "json":
            out.write(json_text(report.to_dict()) + "\n")
        else:
            out.write(report.text())
    return EXIT_OK if report.ok else EXIT_INCOMPLETE


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
    add_output(p)
    p.set_defaults(func=run(cmd_search))

    p = logs.add_parser(
        "ua-lookup", help="which session a stamped User-Agent points to",
        description=f"The session(s) whose {sessionid.TAG_LEN}-character tag ends the "
                    "given User-Agent (as a web server logged it), as search prints them; "
                    "a value shorter than the tag carries the tag's first characters, so "
                    "it can match several.")
    add_data_dir(p)
    p.add_argument("user_agent", metavar="USER-AGENT")
    add_filters(p, ("at", "slack", "start", "end", "tz", "client_ip"))
    add_output(p)
    p.set_defaults(func=run(cmd_ua_lookup))

    p = logs.add_parser(
        "export-pcap", help="matching packets as a pcapng file (synthesized headers)",
        description="The packet-log records that search would count, as a pcapng file "
                    "Wireshark and tshark open: headers built from the records, payload "
                    "not stored (captured length < original length), the session ID in "
                    "each packet's comment.")
    add_data_dir(p)
    _filters(p)
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="the pcapng file (mode 0600)")
    p.set_defaults(func=run(cmd_export_pcap))

    p = logs.add_parser(
        "verify", help="check the SHA-256 chain over closed log files",
        description="Checks every closed packet-log segment and archive and every sealed "
                    "connection-log day against the evidence chain (DATA_DIR/chain); "
                    "reports modified, missing, reordered, truncated, unreadable and "
                    "unchained files and broken links, and exits 3 if there is any.")
    add_data_dir(p)
    add_output(p, ("text", "json"))
    p.set_defaults(func=run(cmd_verify))

    p = logs.add_parser(
        "disclose", help="write an evidence bundle for the matching sessions",
        description="A tar file with the matching connection-log records and packet "
                    "records (JSON lines), the packets as pcapng, and a manifest with "
                    "the digests of all of them and the chain links that tie the source "
                    "files to this relay's chain. Check it with verify-bundle.")
    add_data_dir(p)
    _filters(p)
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="the bundle (.tar, mode 0600)")
    p.set_defaults(func=run(cmd_disclose))

    p = logs.add_parser(
        "verify-bundle", help="check a bundle written by disclose",
        description="Checks the manifest's digests of every member and the continuity "
                    "of its chain links; with --data-dir, also that the links are in "
                    "that relay's chain and the records are the ones its files hold. "
                    "Exits 3 if there is any problem.")
    p.add_argument("bundle", metavar="FILE")
    p.add_argument("--data-dir", metavar="DIR",
                   help="a copy of the relay's data directory to check the bundle against")
    add_output(p, ("text", "json"))
    p.set_defaults(func=lambda args: cmd_verify_bundle(
        args, require_relay_data(Path(args.data_dir)) if args.data_dir else None))
