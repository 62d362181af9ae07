"""The ``relay`` command. Errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from relay import config as configmod
from relay import sessionid
from relay.errors import RelayError
from relay.safeout import escape_text, json_text

if TYPE_CHECKING:
    from relay.central.store import StoreSettings

EXIT_ERROR = 1
EXIT_USAGE = 2


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"the relay's data directory (default {configmod.DEFAULT_DATA_DIR}, "
                        "or [logs] data_dir of --config)")
    p.add_argument("--config", metavar="FILE", help="TOML config file (see relay serve --help)")


def _config(args: argparse.Namespace) -> configmod.Config:
    cfg = configmod.load(args.config)
    if args.data_dir:
        cfg = cfg.with_data_dir(args.data_dir)
    return cfg


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
        return cfg.with_listen(args.listen) if args.listen else cfg

    serve(load)
    return 0


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


def cmd_logs_connections(args: argparse.Namespace) -> int:
    from relay.connlog import reader

    def warn(msg: str) -> None:
        print(f"relay: warning: {escape_text(msg)}", file=sys.stderr)

    cfg = _config(args)
    out = sys.stdout
    for rec in reader.iter_records(cfg.data_dir, on_error=warn):
        if args.json:
            out.write(json_text(rec) + "\n")
        else:
            out.write(_connection_line(rec) + "\n")
    return 0


def cmd_logs_access(args: argparse.Namespace) -> int:
    from relay import times
    from relay.investigate.access import (
        COLUMNS,
        DEFAULT_AT_SLACK_S,
        record_time,
        row,
        search_access,
    )

    def warn(msg: str) -> None:
        print(f"relay: warning: {escape_text(msg)}", file=sys.stderr)

    tz = times.parse_zone(args.tz)
    if args.at and (args.start or args.end):
        raise RelayError("give --at or --from/--to, not both")
    lo = hi = None
    if args.at:
        at = times.parse_time(args.at, tz, "--at").timestamp()
        slack = DEFAULT_AT_SLACK_S if args.slack is None else args.slack
        if not 0 <= slack < float("inf"):
            raise RelayError(f"--slack {args.slack}: give a number of seconds >= 0")
        lo, hi = at - slack, at + slack + 0.001
    if args.start:
        lo = times.parse_time(args.start, tz, "--from").timestamp()
    if args.end:
        hi = times.parse_time(args.end, tz, "--to").timestamp()
    client_ip = None
    if args.client_ip:
        from relay.investigate.search import normalize_ip

        client_ip = normalize_ip(args.client_ip, "--client-ip")
    found = 0
    if not args.json:
        print("  ".join(COLUMNS))
    for rec in search_access(_config(args).data_dir, lo=lo, hi=hi, client_ip=client_ip,
                             on_error=warn):
        found += 1
        if args.json:
            print(json_text(rec))
        else:
            r = row(rec)
            r["time"] = times.format_in(record_time(rec), tz)
            print("  ".join(escape_text(v) if v != "" else "-" for v in r.values()))
    if not found:
        print("relay: no matching access record", file=sys.stderr)
    return 0


def cmd_logs_ua_lookup(args: argparse.Namespace) -> int:
    """The session(s) whose tag ends a stamped User-Agent (a value shorter than the
    tag carries the tag's first characters, so it can match several)."""
    from relay.connlog import reader

    tail = args.user_agent.strip()[-sessionid.TAG_LEN:]
    if not tail:
        raise RelayError("empty User-Agent")
    cfg = _config(args)
    sessions: dict[str, dict] = {}
    for rec in reader.iter_records(cfg.data_dir):
        sid = rec.get("session_id")
        if not isinstance(sid, str) or rec.get("action") not in ("connect", "disconnect"):
            continue
        if not sessionid.tag(sid).startswith(tail):
            continue
        row = sessions.setdefault(sid, {"session_id": sid, "relay": None, "connect_time": None,
                                        "disconnect_time": None, "client_ip": None,
                                        "client_port": None})
        server, client = rec.get("server"), rec.get("client")
        server = server if isinstance(server, dict) else {}
        client = client if isinstance(client, dict) else {}
        row["relay"] = server.get("id")
        row["client_ip"], row["client_port"] = client.get("ip"), client.get("port")
        row["connect_time" if rec["action"] == "connect" else "disconnect_time"] = \
            rec.get("time")
    if not sessions:
        print(f"relay: no session with tag {tail!r} in {cfg.data_dir}", file=sys.stderr)
        return EXIT_ERROR
    for row in sessions.values():
        if args.json:
            print(json_text(row))
        else:
            print(escape_text(f"{row['session_id']}  relay {row['relay']}  "
                              f"{row['client_ip']}:{row['client_port']}  "
                              f"{row['connect_time']} -> {row['disconnect_time'] or '(open)'}"))
    return 0


def cmd_logs_packets(args: argparse.Namespace) -> int:
    from datetime import UTC

    from relay import times
    from relay.packetlog import segments

    def warn(path: str, reason: str) -> None:
        print(f"relay: warning: {escape_text(path)}: {escape_text(reason)}", file=sys.stderr)

    cfg = _config(args)
    if args.session:
        sessionid.check(args.session, "--session")
    start = times.parse_time(args.start, UTC, "--from") if args.start else None
    end = times.parse_time(args.end, UTC, "--to") if args.end else None
    out = sys.stdout
    for r in segments.iter_records(cfg.data_dir, session=args.session, start=start, end=end,
                                    on_error=warn):
        if args.json:
            out.write(json.dumps(r) + "\n")
        else:
            out.write(f"{r['time']}  {r['session_id'] or '-':<{sessionid.TEXT_LEN}}  "
                      f"{r['client_ip']}:{r['client_port']}  {r['direction']:<3}  "
                      f"{r['src_ip']}:{r['src_port']} > {r['dst_ip']}:{r['dst_port']}  "
                      f"[{r['flags']}] seq {r['seq']} ack {r['ack']} win {r['window']} "
                      f"len {r['len']}\n")
    return 0


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


def _connection_line(rec: dict) -> str:
    """One record as a text line, every field from the log escaped (escape_text);
    a field of the wrong type (an older relay, a forged copy) shows as it is."""
    def obj(key: str) -> dict:
        value = rec.get(key)
        return value if isinstance(value, dict) else {}

    client, sw, action = obj("client"), obj("client_software"), rec.get("action", "?")
    parts = [escape_text(rec.get("time", "?")), escape_text(action).ljust(10)]
    if action not in ("connect", "disconnect"):
        # Audit records: their own fields, compactly, as JSON (json_text escapes).
        rest = {k: v for k, v in rec.items() if k not in ("id", "time", "action", "server")}
        return "  ".join([*parts, json_text(rest)])
    fields = [rec.get("session_id", "-"), f"{client.get('ip', '-')}:{client.get('port', '-')}",
              rec.get("protocol"), rec.get("virtual_ip"),
              f"{sw.get('name')} {sw.get('version')}"]
    if action == "disconnect":
        p, b = obj("packets"), obj("bytes")
        fields += [f"pkts {p.get('in')}/{p.get('out')}", f"bytes {b.get('in')}/{b.get('out')}",
                   f"{rec.get('duration_s')}s", rec.get("reason")]
    return "  ".join([*parts, *(escape_text(f) for f in fields)])


def cmd_ban(args: argparse.Namespace) -> int:
    """Through the running relay's control socket; straight on the files when no
    relay runs on this data directory (it then finds the change at its start)."""
    import time

    from relay import control
    from relay.connlog import daylog
    from relay.serve.abuse import Abuse, parse_network
    from relay.times import rfc3339_ms

    cfg = _config(args)
    # A clear error before anything is sent; and the canonical network, so a ban
    # on ::ffff:198.51.100.7 is the ban on 198.51.100.7/32.
    target = parse_network(args.target) if args.ban_command in ("add", "remove") else ""
    request: dict = {"cmd": f"ban-{args.ban_command}"}
    if args.ban_command == "add":
        request.update(target=target, duration_s=configmod.parse_duration_arg(args.duration),
                       reason=args.reason)
    elif args.ban_command == "remove":
        request["target"] = target
    try:
        response = control.request(cfg.data_dir, request)
    except control.NotRunning:
        log = daylog.ConnectionLog(cfg.data_dir)

        def audit(record: dict) -> None:
            log.append({**record, "server": {"id": cfg.server.id}})

        abuse = Abuse(cfg.abuse, cfg.data_dir, audit, time.time)
        if args.ban_command == "add":
            response = {"ban": vars(abuse.add_ban(request["target"], request["duration_s"],
                                                  args.reason, by="operator"))}
        elif args.ban_command == "remove":
            if not abuse.remove_ban(target):
                raise RelayError(f"no ban on {target}") from None
            response = {}
        else:
            abuse.expire()
            response = {"bans": [vars(b) for b in abuse.bans.values()]}
        log.close()
    bans = response.get("bans") or ([response["ban"]] if "ban" in response else [])
    for ban in bans:
        if args.json:
            print(json.dumps({**ban, "until": rfc3339_ms(ban["until"])}))
        else:
            print(f"{ban['network']:<20} until {rfc3339_ms(ban['until'])}  "
                  f"offences {ban['offences']}  {ban['reason']}")
    if args.ban_command == "remove":
        print(f"removed the ban on {target}")
    return 0


def cmd_ship_status(args: argparse.Namespace) -> int:
    from relay.connlog.forwarder import ship_status

    cfg = _config(args)
    st = ship_status(cfg.data_dir)
    if args.json:
        print(json.dumps(st))
        return 0
    print(f"collector: {cfg.forward.collector or '(none: the connection log stays local)'}")
    for key in ("state", "running", "backlog_records", "backlog_bytes", "position",
                "last_success", "last_error", "last_error_time", "consecutive_failures",
                "confirmation", "records_sent", "set_aside", "last_note"):
        if key in st:
            print(f"{key.replace('_', ' ')}: {st[key]}")
    return 0


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
    from relay.querycli import FLEET_COLUMNS, Elapsed, print_sessions, query_of

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

    def warn(text: str) -> None:
        print(f"relay: warning: {escape_text(text)}", file=sys.stderr)

    print_sessions(args, fleet.sessions(pairs, q, warn), tz, FLEET_COLUMNS)
    return 0


def cmd_collector_verify(args: argparse.Namespace) -> int:
    from relay.central.collector import verify

    report = verify(Path(args.verify_data_dir))
    sys.stdout.write(json.dumps(report.to_dict()) + "\n" if args.json else report.text())
    return 0 if report.ok else EXIT_ERROR


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
            "logs": {"data_dir": args.data_dir, "connlog_keep": f"{args.keep}d"},
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
    cfg = _directory_config(args)
    window = float(configmod.parse_duration_arg(args.window))
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
        return EXIT_ERROR
    return 0


def cmd_install_service(args: argparse.Namespace) -> int:
    from relay import service

    if not args.config:
        raise RelayError("--config FILE is required: the service runs relay serve --config FILE")
    cfg = _config(args)
    path = service.install(Path(args.config).resolve(), cfg,
                           Path(args.output) if args.output else None)
    print(f"wrote {path}")
    if not args.output:
        print("then: systemctl daemon-reload && systemctl enable --now relay")
    return 0


def cmd_client_config(args: argparse.Namespace) -> int:
    """What a client needs to reach this relay, pinned to its certificate."""
    from relay.clientconfig import openconnect_command, openvpn_config

    cfg = _config(args)
    if args.protocol == "openvpn":
        text = openvpn_config(cfg, cfg.data_dir, args.proto, args.dev, args.remote)
    else:
        text = openconnect_command(cfg, cfg.data_dir, args.remote)
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from relay.demo import run_demo

    return run_demo(keep_going=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Packet-logging VPN relay: serves stock VPN clients, keeps the "
                    "connection log and the packet log that trace abuse to one session.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "serve", help="run the relay",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the relay: TLS listener (AnyConnect CSTP), TAP device, "
                    "connection log. Runs until SIGTERM or Ctrl-C.",
        epilog="configuration keys and their defaults (TOML):\n\n" + configmod.describe())
    _add_data_dir(p)
    p.add_argument("--listen", metavar="HOST:PORT", help="override [server] listen")
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

    logs = sub.add_parser("logs", help="read the relay's logs").add_subparsers(
        dest="logs_command", metavar="WHAT", required=True)
    p = logs.add_parser("connections", help="print the connection log")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_logs_connections)

    p = logs.add_parser(
        "access", help="search a relay directory's access log (list downloads, registrations)",
        description="The records of relay directory (list-download, relay-register, "
                    "relay-refused, relay-expire) by time and client address; --data-dir is "
                    "the directory's data directory (or a copy).")
    _add_data_dir(p)
    p.add_argument("--at", metavar="TIME", help="records within --slack of TIME (ISO 8601 or "
                   "'YYYY-MM-DD HH:MM[:SS]')")
    p.add_argument("--slack", type=float, metavar="SECONDS",
                   help="with --at: how far from TIME (default 60)")
    p.add_argument("--from", dest="start", metavar="TIME", help="window start, inclusive")
    p.add_argument("--to", dest="end", metavar="TIME", help="window end, exclusive")
    p.add_argument("--tz", metavar="ZONE", default="UTC",
                   help="zone of times without one, and of the output (default UTC)")
    p.add_argument("--client-ip", metavar="IP", help="the client's address")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_logs_access)

    ban = sub.add_parser(
        "ban", help="list, add or remove bans (works while the relay runs)").add_subparsers(
        dest="ban_command", metavar="ACTION", required=True)
    p = ban.add_parser("list", help="bans in force")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_ban)
    p = ban.add_parser("add", help="ban an IP or CIDR for a while")
    _add_data_dir(p)
    p.add_argument("target", metavar="IP|CIDR")
    p.add_argument("--for", dest="duration", default="1h", metavar="DURATION",
                   help="how long, e.g. 30m, 12h, 7d (default 1h)")
    p.add_argument("--reason", default="added by operator", help="recorded in the audit log")
    p.add_argument("--json", action="store_true", help="print the ban as JSON")
    p.set_defaults(func=cmd_ban)
    p = ban.add_parser("remove", help="lift a ban")
    _add_data_dir(p)
    p.add_argument("target", metavar="IP|CIDR")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_ban)

    p = logs.add_parser("packets", help="print the packet log")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--session", metavar="ID", help="only this session")
    p.add_argument("--from", dest="start", metavar="TIME", help="RFC 3339, inclusive")
    p.add_argument("--to", dest="end", metavar="TIME", help="RFC 3339, exclusive")
    p.set_defaults(func=cmd_logs_packets)

    p = logs.add_parser(
        "ua-lookup", help="which session a stamped User-Agent points to",
        description=f"Find the session(s) whose {sessionid.TAG_LEN}-character tag ends the "
                    "given User-Agent (as a web server logged it) and print session ID, "
                    "relay, client address and connect/disconnect times.")
    _add_data_dir(p)
    p.add_argument("user_agent", metavar="USER-AGENT")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_logs_ua_lookup)

    from relay.investigate.cli import add_parsers as add_investigation_parsers

    add_investigation_parsers(logs, _add_data_dir, lambda args: _config(args).data_dir)

    ship = sub.add_parser("ship", help="the connection log's shipping to the collector") \
        .add_subparsers(dest="ship_command", metavar="WHAT", required=True)
    p = ship.add_parser("status", help="backlog, last success and last error of the forwarder")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="one JSON object")
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

    from relay.querycli import add_filters, add_output

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
    add_filters(q, fleet=True)
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
    p.add_argument("--keep", type=int, default=90, metavar="DAYS",
                   help="days of access log kept (default and minimum 90)")
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
                    "with a capability bounding set, ProtectSystem=strict with only the data "
                    "directory and bpffs writable, NoNewPrivileges, restart on failure, logs "
                    "to the journal.")
    _add_data_dir(p)
    p.add_argument("-o", "--output", metavar="FILE", help="write the unit here instead")
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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="relay: %(levelname)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except RelayError as exc:
        print(f"relay: error: {escape_text(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except PermissionError as exc:
        print(f"relay: error: {exc.filename or ''}: permission denied (run as root?)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
