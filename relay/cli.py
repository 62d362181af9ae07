"""The ``relay`` command. Errors are one line on stderr, never a traceback, and
every command ends with one of the exit statuses of relay.errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import relay
from relay import config as configmod
from relay import sessionid, times
from relay.errors import (
    EXIT_BUG,
    EXIT_INCOMPLETE,
    EXIT_MEANINGS,
    EXIT_NOTHING,
    EXIT_OK,
    EXIT_USAGE,
    RelayError,
)
from relay.safeout import escape_text, json_text

if TYPE_CHECKING:
    from relay.central.store import StoreSettings

# Set to see the traceback of an internal error (a bug) instead of its one line.
DEBUG_ENV = "RELAY_DEBUG"
PROG = "relay"


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (the usage is one --help away), and a
    long option's value that starts with "-" taken as its value: a session ID is
    URL-safe base64, so one in 64 begins with "-", and argparse alone reads
    ``--session -g9ZQ...`` as an unknown option."""

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        return super().parse_known_args(
            self._values_joined(list(sys.argv[1:] if args is None else args)), namespace)

    def _values_joined(self, args: list[str]) -> list[str]:
        """``--opt VALUE`` as ``--opt=VALUE`` where the option takes one value and
        VALUE starts with "-" but is no option of this parser. Up to "--", and
        for this parser's options only (a subcommand's parser does its own)."""
        out: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                return out + args[i:]
            action = self._option_string_actions.get(arg) if arg.startswith("--") else None
            nxt = args[i + 1] if i + 1 < len(args) else None
            if action is not None and action.nargs is None and action.option_strings \
                    and nxt is not None and nxt.startswith("-") and nxt != "-" \
                    and nxt not in self._option_string_actions:
                out.append(f"{arg}={nxt}")
                i += 2
                continue
            out.append(arg)
            i += 1
        return out

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """As argparse's, but an unknown argument that is a session ID beginning with
        "-" (a positional one, as ``relay sessions show -g9ZQ...``) gets the way out."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            ids = [a for a in extras if a.startswith("-") and sessionid.is_valid(a)]
            hint = f"; put '--' before a session ID that begins with '-' (-- {ids[0]})" \
                if ids else ""
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed

    def error(self, message: str) -> NoReturn:
        where = "" if self.prog == PROG else f"{escape_text(self.prog)}: "
        print(f"{PROG}: error: {where}{escape_text(message)} "
              f"(see {escape_text(self.prog)} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"the relay's data directory (default {configmod.DEFAULT_DATA_DIR}, "
                        "or [logs] data_dir of --config)")
    p.add_argument("--config", metavar="FILE", help="TOML config file (see relay.toml(5))")


def _config(args: argparse.Namespace) -> configmod.Config:
    cfg = configmod.load(args.config)
    if args.data_dir:
        cfg = cfg.with_data_dir(args.data_dir)
    return cfg


def _data_dir(args: argparse.Namespace) -> Path:
    """The data directory a read command reads: refused unless it holds relay
    data (investigate.options.require_relay_data)."""
    from relay.investigate.options import require_relay_data

    return require_relay_data(_config(args).data_dir)


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.serve.core import serve

    if args.listen:
        try:
            configmod.parse_hostport(args.listen)
        except ValueError as exc:
            raise configmod.ConfigError(f"--listen: {exc}") from None

    def load() -> configmod.Config:
        """The config as the command line asks for it (again on every reload)."""
        cfg = _config(args)
        if args.workers is not None:
            cfg = cfg.with_workers(args.workers)
        return cfg.with_listen(args.listen) if args.listen else cfg

    serve(load)
    return 0


def _workers_arg(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= configmod.WORKERS_MAX:
        raise argparse.ArgumentTypeError(f"expected 1..{configmod.WORKERS_MAX}, got {text!r}")
    return int(text)


def cmd_reload(args: argparse.Namespace) -> int:
    from relay import control

    try:
        cfg = _config(args)
    except configmod.ConfigError as exc:
        # The relay would refuse it the same way: say so without bothering it.
        raise RelayError(f"reload refused, the running config stays in force: {exc}") \
            from None
    response = control.request(cfg.data_dir, {"cmd": "reload"})
    print(response.get("message", "reloaded"))
    return 0


CONNECTION_FIELDS = ("time", "action", "session_id", "client", "protocol", "virtual_ip",
                     "client_software", "packets_in", "packets_out", "bytes_in", "bytes_out",
                     "duration_s", "reason", "detail")


def cmd_logs_connections(args: argparse.Namespace) -> int:
    """The log's records, filtered: --from/--to on the record's time; --at names
    the sessions connected at T (as search does) and prints their records;
    --session and --client-ip keep the session records that match."""
    from relay.connlog import reader
    from relay.investigate import search
    from relay.investigate.options import (
        Results,
        RowWriter,
        open_output,
        output_format,
        query_of,
    )
    from relay.sessionview import record_time

    data_dir = _data_dir(args)
    q, tz = query_of(args)
    results = Results()
    named = None
    if q.at is not None:
        named = set(search.find_sessions(data_dir, q, on_error=results.warn)[0])
    session_filter = named is not None or q.session or q.client_ip
    found = 0
    with open_output(args) as out:
        fmt = output_format(args)
        w = RowWriter(out, fmt, CONNECTION_FIELDS, line=_connection_line)
        for rec in reader.iter_records(data_dir, on_error=results.warn):
            sid = rec.get("session_id")
            if session_filter:
                client = rec.get("client")
                if rec.get("action") not in ("connect", "disconnect") \
                        or not isinstance(sid, str) \
                        or (named is not None and sid not in named) \
                        or (q.session and not sid.startswith(q.session)) \
                        or (q.client_ip and not (isinstance(client, dict)
                                                 and client.get("ip") == q.client_ip)):
                    continue
            if q.lo is not None or q.hi is not None:
                t = record_time(rec.get("time"))
                if t is None or (q.lo is not None and t < q.lo) \
                        or (q.hi is not None and t >= q.hi):
                    continue
            found += 1
            w.write(rec if fmt == "json" else _connection_row(rec, tz))
        w.close()
    return results.status(bool(found))


def _connection_row(rec: dict[str, Any], tz: Any) -> dict[str, Any]:
    """A record as a table or CSV row: the session fields flattened, an audit
    record's own fields as JSON in ``detail``; a field of the wrong type (an older
    relay, a forged copy) shows as it is."""
    from relay.netaddr import hostport
    from relay.sessionview import record_time

    def obj(key: str) -> dict[str, Any]:
        value = rec.get(key)
        return value if isinstance(value, dict) else {}

    t = record_time(rec.get("time"))
    action = rec.get("action", "?")
    row: dict[str, Any] = {"time": times.format_in(t, tz) if t is not None else rec.get("time"),
                           "action": action}
    if action not in ("connect", "disconnect"):
        row["detail"] = {k: v for k, v in rec.items()
                         if k not in ("id", "time", "action", "server")}
        return row
    client, sw = obj("client"), obj("client_software")
    p, b = obj("packets"), obj("bytes")
    row.update(session_id=rec.get("session_id"),
               client=hostport(client.get("ip", "-"), client.get("port", "-")),
               protocol=rec.get("protocol"), virtual_ip=rec.get("virtual_ip"),
               client_software=f"{sw.get('name')} {sw.get('version')}")
    if action == "disconnect":
        row.update(packets_in=p.get("in"), packets_out=p.get("out"), bytes_in=b.get("in"),
                   bytes_out=b.get("out"), duration_s=rec.get("duration_s"),
                   reason=rec.get("reason"))
    return row


def _connection_line(row: dict[str, Any]) -> str:
    """A table line of a _connection_row, every field escaped (escape_text)."""
    parts = [escape_text(row.get("time", "?")), escape_text(row["action"]).ljust(10)]
    if "detail" in row:  # an audit record: its own fields, compactly, as JSON
        return "  ".join([*parts, json_text(row["detail"])])
    def v(key: str) -> object:
        return "-" if row[key] is None else row[key]

    fields = [v("session_id"), row["client"], v("protocol"), v("virtual_ip"),
              row["client_software"]]
    if row["action"] == "disconnect":
        fields += [f"pkts {v('packets_in')}/{v('packets_out')}",
                   f"bytes {v('bytes_in')}/{v('bytes_out')}", f"{v('duration_s')}s", v("reason")]
    return "  ".join([*parts, *(escape_text(f) for f in fields)])


def cmd_logs_access(args: argparse.Namespace) -> int:
    from relay.investigate.access import COLUMNS, record_time, row, search_access
    from relay.investigate.options import (
        Results,
        RowWriter,
        open_output,
        output_format,
        query_of,
    )

    q, tz = query_of(args)
    lo, hi = q.lo, q.hi
    if q.at is not None:
        lo, hi = q.at - q.slack, q.at + q.slack + 0.001
    results = Results()
    found = 0
    with open_output(args) as out:
        fmt = output_format(args)
        w = RowWriter(out, fmt, COLUMNS, line=lambda r: "  ".join(
            escape_text(v) if v not in ("", None) else "-" for v in r.values()))
        if fmt == "table":
            out.write("  ".join(COLUMNS) + "\n")
        for rec in search_access(_data_dir(args), lo=lo, hi=hi, client_ip=q.client_ip,
                                 on_error=results.warn):
            found += 1
            if fmt == "json":
                w.write(rec)
                continue
            r = row(rec)
            r["time"] = times.format_in(record_time(rec), tz)
            w.write(r)
        w.close()
    if not found:
        print("relay: no matching access record", file=sys.stderr)
    return results.status(bool(found))


PACKET_FIELDS = ("time", "session_id", "client_ip", "client_port", "direction", "src_ip",
                 "src_port", "dst_ip", "dst_port", "flags", "seq", "ack", "window", "len")


def cmd_logs_packets(args: argparse.Namespace) -> int:
    from relay.investigate import search
    from relay.investigate.cli import spans
    from relay.investigate.options import (
        Results,
        RowWriter,
        open_output,
        output_format,
        query_of,
    )
    from relay.netaddr import hostport
    from relay.packetlog import segments

    data_dir = _data_dir(args)
    q, tz = query_of(args)
    results = Results()
    # The sessions whose packets the window can hold: the connection log names them.
    candidates, _ = search.find_sessions(data_dir, q)
    results.check_packet_log(data_dir, q, spans(list(candidates.values())))
    lo, hi = q.packet_window
    whole = q.session if q.session and sessionid.is_valid(q.session) else None

    def line(r: dict[str, Any]) -> str:
        when = r["time"] if tz is UTC else \
            times.format_in(times.parse_rfc3339_ns(r["time"]) / times.NS, tz)
        return (f"{when}  {r['session_id'] or '-':<{sessionid.TEXT_LEN}}  "
                f"{hostport(r['client_ip'], r['client_port'])}  {r['direction']:<3}  "
                f"{hostport(r['src_ip'], r['src_port'])} > {hostport(r['dst_ip'], r['dst_port'])}"
                f"  [{r['flags']}] seq {r['seq']} ack {r['ack']} win {r['window']} "
                f"len {r['len']}")

    found = 0
    with open_output(args) as out:
        w = RowWriter(out, output_format(args), PACKET_FIELDS, line=line)
        for r in segments.iter_records(data_dir, session=whole, start=lo, end=hi,
                                        client_ip=q.client_ip, address=q.dst_ip,
                                        on_error=results.warn):
            if q.session and not (r["session_id"] or "").startswith(q.session):
                continue
            if (q.dst_ip or q.dst_port) and not _talks_to(r, q.dst_ip, q.dst_port):
                continue
            found += 1
            w.write(r)
        w.close()
    return results.status(bool(found))


def _talks_to(r: dict[str, Any], ip: str | None, port: int | None) -> bool:
    """The packet goes to or comes from ``ip`` (and ``port``)."""
    return any((ip is None or r[f"{end}_ip"] == ip) and (port is None or r[f"{end}_port"] == port)
               for end in ("src", "dst"))


def cmd_logging(args: argparse.Namespace) -> int:
    from relay import control
    from relay.packetlog import logging_ctl

    cfg = _config(args)
    dev = args.dev or cfg.tap.name
    if args.state == "on":
        logging_ctl.logging_on(dev, logging_ctl.relay_pins(cfg.data_dir, dev, cfg.pin_root))
        print(f"capture attached to {dev}")
    elif args.state == "off":
        logging_ctl.logging_off(dev)
        print(f"capture removed from {dev}: the relay runs unlogged until 'relay logging on'")
    else:
        try:
            pins: Path | None = logging_ctl.relay_pins(cfg.data_dir, dev, cfg.pin_root)
        except control.NotRunning:
            pins = None
        st = logging_ctl.logging_status(dev, pins, data_dir=cfg.data_dir)
        info = st.to_dict()
        if args.json:
            print(json.dumps(info))
        else:
            print(f"capture on {dev}: {'attached' if st.attached else 'NOT attached'} "
                  f"(ingress {'yes' if st.ingress else 'no'}, "
                  f"egress {'yes' if st.egress else 'no'})")
            if st.records is not None:
                print(f"records: {st.records} total, {st.records_per_s:.0f}/s; "
                      f"drops: {st.drops} (per CPU {st.drops_per_cpu})")
            else:
                print(f"records: unknown (no relay with its capture pinned runs on "
                      f"{cfg.data_dir})")
            print(f"packet log on disk: {st.disk_bytes} bytes in {cfg.data_dir}")
    return 0


def cmd_ship_status(args: argparse.Namespace) -> int:
    from relay.connlog.forwarder import ship_status
    from relay.investigate.options import open_output, output_format

    cfg = _config(args)
    st = ship_status(_data_dir(args))
    with open_output(args) as out:
        if output_format(args) == "json":
            out.write(json_text(st) + "\n")
            return EXIT_OK
        out.write(f"collector: {cfg.forward.collector or '(none: the connection log stays local)'}"
                  "\n")
        for key in ("state", "running", "backlog_records", "backlog_bytes", "position",
                    "last_success", "last_error", "last_error_time", "consecutive_failures",
                    "confirmation", "records_sent", "set_aside", "last_note"):
            if key in st:
                out.write(f"{key.replace('_', ' ')}: {escape_text(st[key])}\n")
    return EXIT_OK


def cmd_collector(args: argparse.Namespace) -> int:
    import uvloop

    from relay.central.collector import run_collector

    if args.collector_command == "verify":
        return cmd_collector_verify(args)
    if args.collector_command == "search":
        return cmd_collector_search(args)
    if not (args.cert and args.key and args.ca):
        raise RelayError("collector: --cert, --key and --ca are required (see relay "
                         "collector --help)")

    async def main() -> None:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_collector(args.listen, Path(args.data_dir), args.ca, args.cert, args.key,
                            args.keep, plain_listen=args.plain_listen,
                            accept_syslog=args.accept_syslog,
                            allow_no_client_cert=args.allow_no_client_cert,
                            quota_bytes_per_day=args.quota_mb_per_day << 20,
                            store=_store_settings(args), stop_event=stop)

    uvloop.run(main())
    return 0


# relay collector search's table: which relay, and no packets (they never leave a relay).
FLEET_COLUMNS = tuple((c, "session" if c == "session_id" else c) for c in (
    "session_id", "match", "server_id", "server_ip", "client", "client_hostname",
    "client_software", "protocol", "connect", "connect_utc", "disconnect", "disconnect_utc"))


def _store_settings(args: argparse.Namespace) -> StoreSettings:
    """[store] of --config, with --store-url and --store-cluster over it."""
    from relay.central.store import StoreSettings

    store = configmod.load(args.config).store if args.config else configmod.StoreConfig()
    return StoreSettings(url=args.store_url if args.store_url is not None else store.url,
                         cluster=args.store_cluster if args.store_cluster is not None
                         else store.cluster)


def cmd_collector_search(args: argparse.Namespace) -> int:
    from relay.central import fleet
    from relay.central.store import create_schema, open_backend
    from relay.investigate.cli import write_sessions
    from relay.investigate.options import Elapsed, Results, query_of

    q, tz = query_of(args)
    settings = _store_settings(args)
    data_dir = Path(args.search_data_dir)
    with Elapsed("querying the store"):
        pairs = None if settings.url else fleet.ask_collector(fleet.socket_path(data_dir), q)
        if pairs is None:  # a server, or no collector running on the embedded store
            if not settings.url and not (data_dir / "@store").is_dir():
                raise RelayError(f"{data_dir}: no store here (not a collector's directory)")
            backend = open_backend(data_dir, settings)
            try:
                if not settings.url:
                    create_schema(backend)  # a store older than a table: created empty
                pairs = fleet.fetch(backend, q)
            finally:
                backend.close()

    results = Results()
    rows = fleet.sessions(pairs, q, results.warn)
    write_sessions(args, rows, tz, FLEET_COLUMNS, packets=False)
    if not rows:
        print("relay: no matching session", file=sys.stderr)
    return results.status(bool(rows))


def cmd_collector_verify(args: argparse.Namespace) -> int:
    from relay.central.collector import verify

    report = verify(Path(args.verify_data_dir))
    sys.stdout.write(json.dumps(report.to_dict()) + "\n" if args.json else report.text())
    return EXIT_OK if report.ok else EXIT_INCOMPLETE


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="a TOML file whose [store] section names the store (README)")
    p.add_argument("--store-url", metavar="URL",
                   help="a ClickHouse server (http[s]://USER:PASSWORD@HOST:8123/) instead "
                        "of the embedded store; overrides [store] url")
    p.add_argument("--store-cluster", metavar="NAME",
                   help="with --store-url: the cluster of Replicated/Distributed tables; "
                        "overrides [store] cluster")


def _directory_config(args: argparse.Namespace) -> configmod.Config:
    """What relay directory shares with a relay, as a relay config: its id in the
    records, the access log's directory and retention, shipping, metrics, abuse."""
    forward = {key: value for key, value in (
        ("collector", args.forward_collector), ("ca", args.forward_ca),
        ("cert", args.forward_cert), ("key", args.forward_key)) if value}
    try:
        return configmod.from_dict({
            "server": {"id": args.id},
            "logs": {"data_dir": args.data_dir, "connlog_keep": args.keep},
            "forward": forward,
            "metrics": {"listen": args.metrics_listen},
            # A list download is one short request: short connections are the
            # normal case here, not an abuse signal; refusals still strike.
            "abuse": {"rate_per_ip": args.rate_per_ip, "burst_per_ip": args.burst_per_ip,
                      "rate_total": args.rate_total, "burst_total": args.burst_total,
                      "short_session": "0s"},
        })
    except configmod.ConfigError as exc:
        raise RelayError(f"directory: {exc}") from None


def cmd_directory(args: argparse.Namespace) -> int:
    import time

    import uvloop

    from relay.central.directory import run_directory
    from relay.serve.abuse import Abuse

    if args.directory_command == "list":
        return cmd_directory_list(args)
    if not (args.cert and args.key and args.ca):
        raise RelayError("directory: --cert, --key and --ca are required (see relay "
                         "directory --help)")
    if configmod.parse_duration_arg(args.keep, "--keep") < 90 * 86400:
        raise RelayError(f"directory --keep {args.keep}: the access log is kept at least 90d")
    cfg = _directory_config(args)
    window = float(configmod.parse_duration_arg(args.window, "--window"))
    if window < 1 or args.partial < 0:
        raise RelayError("directory: --window must be at least 1s and --partial >= 0")

    async def main() -> None:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_directory(cfg, args.listen, args.ca, args.cert, args.key,
                            lambda audit: Abuse(cfg.abuse, cfg.data_dir, audit, time.time),
                            window_s=window, partial_n=args.partial, stop_event=stop)

    uvloop.run(main())
    return 0


def cmd_directory_list(args: argparse.Namespace) -> int:
    from relay.central.directory import read_snapshot

    snap = read_snapshot(Path(args.list_data_dir))
    if args.json:
        for row in snap["relays"]:
            print(json_text(row))
        return 0
    print(f"{len(snap['relays'])} relays at {snap.get('time')} (window {snap.get('window_s')}s)")
    columns = ("id", "address", "ports", "score", "ping_ms", "sessions_active", "uptime_s",
               "last_heartbeat", "age_s", "operator")
    def cell(row: dict, column: str) -> str:
        value = row.get(column, "")
        if isinstance(value, dict):  # ports: "cstp:443 openvpn-udp:1194 ..."
            value = " ".join(f"{k}:{v}" for k, v in value.items())
        return escape_text(value)

    rows = [columns] + [tuple(cell(row, c) for c in columns)
                        for row in snap["relays"] if isinstance(row, dict)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(columns))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from relay.doctor import render, run_checks

    checks = run_checks(_config(args))
    if args.json:
        print(json.dumps([vars(c) for c in checks]))
    else:
        print(render(checks))
    failed = [c.name for c in checks if c.failed]
    if failed:
        print(f"relay: {len(failed)} required check(s) failed: {', '.join(failed)}",
              file=sys.stderr)
        return EXIT_NOTHING
    return 0


def cmd_install_service(args: argparse.Namespace) -> int:
    from relay import service

    output = Path(args.output) if args.output else None
    if args.uninstall:
        for line in service.uninstall(output):
            print(line)
        return EXIT_OK
    if not args.config:
        raise RelayError("--config FILE is required: the service runs relay serve --config FILE")
    cfg = _config(args)
    path = service.install(Path(args.config).resolve(), cfg, output,
                           Path(args.data_dir).resolve() if args.data_dir else None)
    print(f"wrote {path}")
    if not args.output:
        print("then: systemctl daemon-reload && systemctl enable --now relay")
    return EXIT_OK


def cmd_client_config(args: argparse.Namespace) -> int:
    """What a client needs to reach this relay, pinned to its certificate."""
    from relay.clientconfig import openconnect_command, openvpn_config
    from relay.investigate.options import require_relay_data
    from relay.safeout import private_file
    from relay.tlsconf import SELF_SIGNED_CERT

    cfg = _config(args)
    require_relay_data(cfg.data_dir, existing_dir=True)
    cert = Path(cfg.server.cert) if cfg.server.cert else cfg.data_dir / SELF_SIGNED_CERT
    if not cert.is_file():
        # Never a certificate the relay would not use: the pin would fail.
        raise RelayError(f"[server] cert: no certificate at {cert}" if cfg.server.cert else
                         f"no certificate at {cert} yet: start relay serve once first (it "
                         "makes one), or give this relay's --data-dir / --config")
    if args.protocol == "openvpn":
        text = openvpn_config(cfg, cfg.data_dir, args.proto, args.dev, args.remote)
    else:
        text = openconnect_command(cfg, cfg.data_dir, args.remote)
    if args.output and args.output != "-":
        with private_file(Path(args.output)) as f:
            f.write(text)
        print(f"wrote {escape_text(args.output)}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from relay.demo import run_demo

    return run_demo(keep_going=args.keep)


def build_parser() -> argparse.ArgumentParser:
    from relay.investigate.options import add_filters, add_output

    parser = Parser(
        prog=PROG,
        epilog="exit status: " + ", ".join(
            f"{status} {short}" for status, (short, _) in sorted(EXIT_MEANINGS.items()))
        + " (relay(8): EXIT STATUS)",
        description="Packet-logging VPN relay: serves stock VPN clients, keeps the "
                    "connection log and the packet log that trace abuse to one session.")
    parser.add_argument("--version", action="version", version=f"relay {relay.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "serve", help="run the relay",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the relay: TLS listener (AnyConnect CSTP), TAP device, "
                    "connection log. Runs until SIGTERM or Ctrl-C.",
        epilog="configuration keys and their defaults (TOML):\n\n" + configmod.describe())
    _add_data_dir(p)
    p.add_argument("--listen", metavar="HOST:PORT", help="override [server] listen")
    p.add_argument("--workers", metavar="N", type=_workers_arg,
                   help="datapath worker processes (override [server] workers; default one "
                        "per CPU the relay may use)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "reload", help="make the running relay re-read its config (as SIGHUP does)",
        description="Limits, timeouts, users, forwarding target, retention and the metrics "
                    "address change at once; sessions stay up. A bad config is refused and "
                    "the old one stays in force. Keys that need a restart (listen, TAP, pool, "
                    "data directory) are reported and left as they are.")
    _add_data_dir(p)
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser(
        "logging", help="switch the packet capture on or off, or show its status",
        description="Adds or removes the capture's tc filters on the TAP device through "
                    "rtnetlink, from a separate process, while relay serve runs on the same "
                    "data directory (it uses the programs the relay pinned in its [capture] "
                    "bpffs, reached through /proc/PID/root, so `ip netns exec` works for "
                    "both). The relay audits every "
                    "change in the connection log, whoever makes it; `tc filter show dev "
                    "relay0 ingress` shows the filters too.")
    p.add_argument("state", choices=("on", "off", "status"))
    p.add_argument("--dev", help="the TAP device (default: [tap] name of the config)")
    p.add_argument("--json", action="store_true", help="status as one JSON object")
    _add_data_dir(p)
    p.set_defaults(func=cmd_logging)

    logs = sub.add_parser(
        "logs", help="read the relay's logs",
        description="Every logs command reads the data directory (--data-dir, or [logs] "
                    "data_dir of --config), never changes it, and exits 0 when it found "
                    "something, 1 when nothing, 2 on an error, 3 when files it needed are "
                    "damaged or missing (README: Exit status).").add_subparsers(
        dest="logs_command", metavar="WHAT", required=True)
    p = logs.add_parser(
        "connections", help="print the connection log",
        description="The connection log's records (sessions and audit), oldest first. "
                    "--from/--to keep the records of the window; --at the records of the "
                    "sessions connected at TIME; --session and --client-ip the session "
                    "records that match. JSON gives each record exactly as logged.")
    _add_data_dir(p)
    add_filters(p, ("at", "slack", "start", "end", "tz", "session", "client_ip"))
    add_output(p)
    p.set_defaults(func=cmd_logs_connections)

    p = logs.add_parser(
        "access", help="search a relay directory's access log (list downloads, registrations)",
        description="The records of relay directory (list-download, relay-register, "
                    "relay-refused, relay-expire) by time and client address; --data-dir is "
                    "the directory's data directory (or a copy).")
    _add_data_dir(p)
    add_filters(p, ("at", "slack", "start", "end", "tz", "client_ip"), slack_default="60s",
                help_for={"at": "records within --slack of TIME (a time without a zone is "
                                "read in --tz)"})
    add_output(p)
    p.set_defaults(func=cmd_logs_access)

    p = logs.add_parser(
        "packets", help="print the packet log",
        description="The packet log's records (TCP/IP header fields), oldest first per "
                    "segment. --at TIME gives the packets within --slack and a minute of "
                    "TIME (a report's clock and its connection's length).")
    _add_data_dir(p)
    add_filters(p, ("at", "slack", "start", "end", "tz", "session", "client_ip", "dst"))
    add_output(p)
    p.set_defaults(func=cmd_logs_packets)

    from relay.investigate.cli import add_parsers as add_investigation_parsers

    add_investigation_parsers(logs, _add_data_dir, _data_dir)

    from relay.opscli import add_parsers as add_operator_parsers

    add_operator_parsers(sub, _add_data_dir, _config)

    ship = sub.add_parser("ship", help="the connection log's shipping to the collector") \
        .add_subparsers(dest="ship_command", metavar="WHAT", required=True)
    p = ship.add_parser("status", help="backlog, last success and last error of the forwarder")
    _add_data_dir(p)
    add_output(p, ("text", "json"))
    p.set_defaults(func=cmd_ship_status)

    from relay.central.collector import DEFAULT_QUOTA_BYTES_PER_DAY

    p = sub.add_parser(
        "collector", help="the central log server: RFC 5425 (syslog over TLS) receiver",
        description="Accepts the connection logs of many relays over TLS with client "
                    "certificates: a relay's id is its certificate's subject CN, and its "
                    "records are filed under that id only (a record claiming another id "
                    "is refused). Stores per-relay daily files (a record dated more than a "
                    "day ahead or past the retention under the day it arrived, flagged), "
                    "removes duplicates by record id, chains what it stores (SHA-256, "
                    "checked by 'relay collector verify'), keeps at least 90 days, and loads "
                    "them into its ClickHouse store (embedded, or [store] url) for "
                    "'relay collector search'. Plain "
                    "RFC 5424 from other senders (rsyslog, appliances) only with "
                    "--accept-syslog.")
    p.add_argument("--listen", default="0.0.0.0:6514", metavar="HOST:PORT",
                   help="TLS listener (default 0.0.0.0:6514, RFC 5425's port)")
    p.add_argument("--data-dir", default="/var/lib/relay-collector", metavar="DIR",
                   help="where the logs are stored (default /var/lib/relay-collector)")
    p.add_argument("--cert", help="the collector's certificate (PEM; required)")
    p.add_argument("--key", help="its key (PEM; required)")
    p.add_argument("--ca", help="CA of the relays' client certificates (required): each "
                                "certificate's subject CN is a relay id")
    p.add_argument("--keep", type=int, default=90, metavar="DAYS",
                   help="days kept (default and minimum 90); older days are deleted")
    p.add_argument("--quota-mb-per-day", type=int, metavar="MB",
                   default=DEFAULT_QUOTA_BYTES_PER_DAY >> 20,
                   help="MiB each sender may store per UTC day (default "
                        f"{DEFAULT_QUOTA_BYTES_PER_DAY >> 20}); past it, its records are "
                        "refused and its batches not confirmed, so relays send them later")
    p.add_argument("--accept-syslog", action="store_true",
                   help="also store plain RFC 5424 / RFC 3164 messages from other senders "
                        "(rsyslog, appliances) under DIR/@syslog/ (refused by default)")
    p.add_argument("--allow-no-client-cert", action="store_true",
                   help="let TLS senders without a client certificate in (needs "
                        "--accept-syslog: they can only send plain syslog)")
    p.add_argument("--plain-listen", metavar="HOST:PORT",
                   help="also accept plain TCP syslog here, for local senders (needs "
                        "--accept-syslog: no certificate, so no relay records)")
    _store_options(p)
    p.set_defaults(func=cmd_collector, collector_command=None)
    verify = p.add_subparsers(dest="collector_command", metavar="[verify|search]")
    q = verify.add_parser(
        "verify", help="check the stored day files against the collector's SHA-256 chain",
        description="Checks every relay's compressed days under DIR against its chain "
                    "(DIR/@chain/RELAY.jsonl): reports modified, missing, truncated, "
                    "reordered and unchained day files and broken links, and exits "
                    "non-zero if there is any. Works on a copy of the directory.")
    q.add_argument("--data-dir", dest="verify_data_dir", default="/var/lib/relay-collector",
                   metavar="DIR", help="the collector's directory (default "
                                       "/var/lib/relay-collector)")
    q.add_argument("--json", action="store_true", help="the report as one JSON object")

    q = verify.add_parser(
        "search", help="sessions across the fleet, from the collector's store",
        description="The sessions of every relay that match the filters, from the "
                    "collector's ClickHouse store (embedded, or [store] url): the same "
                    "filters, zones, --at rule and output as 'relay logs search', with "
                    "the relay's id and address in each row. Destinations are the "
                    "disconnect records' lists (packets stay on the relays).")
    q.add_argument("--data-dir", dest="search_data_dir", default="/var/lib/relay-collector",
                   metavar="DIR", help="the collector's directory (default "
                                       "/var/lib/relay-collector); a running collector "
                                       "answers for its embedded store")
    _store_options(q)
    add_filters(q, ("at", "slack", "start", "end", "tz", "server_id", "server_ip", "dst",
                    "host", "client_ip", "session"), help_for={
        "at": "sessions connected at TIME (ISO 8601 or 'YYYY-MM-DD HH:MM[:SS]', read in "
              "--tz): connect <= TIME <= disconnect, or still open",
        "slack": "with --at: also the sessions connected within DURATION of TIME, shown "
                 "as match 'near'",
        "dst": "sessions whose disconnect record lists this destination, IP[:PORT]"})
    add_output(q)

    p = sub.add_parser(
        "directory", help="the relay directory: registrations and the public server list",
        description="Serves the public list of relays over HTTPS (VPN Gate CSV at "
                    "/api/iphone/, JSON at /api/servers.json) and takes relays' "
                    "registrations (POST /api/register) over mutual TLS: a relay's id is "
                    "its client certificate's subject CN. A relay without a heartbeat for "
                    "--window drops out. Every list request is a record in the access log "
                    "(DIR/connlog/, kept and shipped like a relay's connection log; "
                    "'relay logs access' searches it).")
    p.add_argument("--listen", default="0.0.0.0:443", metavar="HOST:PORT",
                   help="HTTPS listener (default 0.0.0.0:443)")
    p.add_argument("--data-dir", default="/var/lib/relay-directory", metavar="DIR",
                   help="access log and state (default /var/lib/relay-directory)")
    p.add_argument("--cert", help="the directory's certificate (PEM; required)")
    p.add_argument("--key", help="its key (PEM; required)")
    p.add_argument("--ca", help="CA of the relays' client certificates (required)")
    p.add_argument("--id", default="directory", metavar="ID",
                   help="the directory's id in its records (default directory; with "
                        "--forward-collector, its certificate's CN)")
    p.add_argument("--window", default="180s", metavar="DURATION",
                   help="a relay without a heartbeat this long drops out (default 180s: "
                        "three missed beats of 60s)")
    p.add_argument("--partial", type=int, default=0, metavar="N",
                   help="give each requester network (/24, /48) only N relays, a subset "
                        "fixed per network and UTC day (default 0: the whole list)")
    p.add_argument("--keep", default="90d", metavar="DURATION",
                   help="how long the access log is kept (default and minimum 90d)")
    p.add_argument("--metrics-listen", default="127.0.0.1:9811", metavar="HOST:PORT",
                   help="Prometheus metrics (default 127.0.0.1:9811; empty = off)")
    p.add_argument("--rate-per-ip", type=float, default=5.0, metavar="N",
                   help="new connections per second per source (default 5)")
    p.add_argument("--burst-per-ip", type=int, default=20, metavar="N",
                   help="burst of new connections per source (default 20)")
    p.add_argument("--rate-total", type=float, default=200.0, metavar="N",
                   help="new connections per second overall (default 200)")
    p.add_argument("--burst-total", type=int, default=400, metavar="N",
                   help="burst of new connections overall (default 400)")
    for key, text in (("collector", "HOST:PORT of the RFC 5425 collector to ship the access "
                                    "log to (default: kept local)"),
                      ("ca", "CA of the collector's certificate"),
                      ("cert", "client certificate for the collector (CN = --id)"),
                      ("key", "its key")):
        p.add_argument(f"--forward-{key}", metavar="FILE" if key != "collector" else
                       "HOST:PORT", help=text)
    p.set_defaults(func=cmd_directory, directory_command=None)
    directory_sub = p.add_subparsers(dest="directory_command", metavar="[list]")
    q = directory_sub.add_parser(
        "list", help="the registered relays and their last heartbeat",
        description="Reads the running directory's snapshot (DIR/relays.json, refreshed "
                    "every second).")
    q.add_argument("--data-dir", dest="list_data_dir", default="/var/lib/relay-directory",
                   metavar="DIR", help="the directory's data directory")
    q.add_argument("--json", action="store_true", help="one JSON object per relay")

    p = sub.add_parser(
        "doctor", help="check what the relay needs on this host, with the fix for each failure",
        description="Checks root or capabilities, the BPF syscall and ring buffer, TUN/TAP "
                    "and tc clsact, bcc and the kernel headers, nftables, the ports, the data "
                    "directory and its free space, the clock and the collector. Exits "
                    "non-zero when a required check fails.")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="the checks as a JSON list")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "install-service", help="write the hardened systemd unit",
        description="Writes relay.service (to /etc/systemd/system, or -o FILE): relay serve "
                    "--config FILE (and --data-dir DIR when given) with a capability bounding "
                    "set, ProtectSystem=strict with only the data directory and bpffs "
                    "writable, NoNewPrivileges, restart on failure, logs to the journal. "
                    "--uninstall stops, disables and removes it; the data directory stays.")
    _add_data_dir(p)
    p.add_argument("-o", "--output", metavar="FILE", help="write the unit here instead")
    p.add_argument("--uninstall", action="store_true",
                   help="stop and disable the service and remove its unit (the data "
                        "directory stays)")
    p.set_defaults(func=cmd_install_service)

    p = sub.add_parser(
        "client-config", help="what a stock client needs to use this relay",
        description="openvpn: a ready .ovpn (the relay's certificate inline as the CA, "
                    "and the tls-crypt key with [openvpn] tls_crypt); "
                    "openconnect: the command line, pinned to the relay's certificate.")
    p.add_argument("protocol", choices=("openvpn", "openconnect"))
    _add_data_dir(p)
    p.add_argument("--proto", choices=("udp", "tcp"), default="udp",
                   help="OpenVPN transport (default udp)")
    p.add_argument("--dev", choices=("tun", "tap"), default="tun",
                   help="OpenVPN device type (default tun)")
    p.add_argument("--remote", metavar="HOST",
                   help="the address clients use (default: the listen address or host name)")
    p.add_argument("-o", "--output", metavar="FILE", help="write it here (mode 0600)")
    p.set_defaults(func=cmd_client_config)

    p = sub.add_parser("demo", help="the relay end to end in network namespaces")
    p.add_argument("--keep", action="store_true",
                   help="leave the topology running until Ctrl-C after the fetch")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="relay: %(levelname)s: %(message)s")
    try:
        # Inside: building the parser imports modules, and one of them may find
        # the C module stale, which is one line too.
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version, or Parser.error's one line
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        if getattr(args, "output", None) not in (None, "-"):
            from relay.safeout import check_target

            check_target(Path(args.output))  # before the work, not after it
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except RelayError as exc:
        print(f"relay: error: {escape_text(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except PermissionError as exc:
        print(f"relay: error: {escape_text(exc.filename or '')}: permission denied "
              "(run as root?)", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug: one line that says where, the rest on request
        if os.environ.get(DEBUG_ENV):
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"relay: internal error (a bug; please report it): {type(exc).__name__}: "
              f"{escape_text(exc)} at {Path(where.filename).name}:{where.lineno}; "
              f"{DEBUG_ENV}=1 shows the traceback", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
