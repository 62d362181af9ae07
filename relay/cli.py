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

from relay import config as configmod
from relay.errors import RelayError
from relay.safeout import escape_text, json_text

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


def cmd_logs_ua_lookup(args: argparse.Namespace) -> int:
    """The session(s) whose tag ends a stamped User-Agent (a value shorter than the
    tag carries the tag's first characters, so it can match several)."""
    from relay.connlog import reader
    from relay.serve.sessions import TAG_LEN

    tail = args.user_agent.strip()[-TAG_LEN:]
    if not tail:
        raise RelayError("empty User-Agent")
    cfg = _config(args)
    sessions: dict[str, dict] = {}
    for rec in reader.iter_records(cfg.data_dir):
        sid = rec.get("session_id")
        if not isinstance(sid, str) or rec.get("action") not in ("connect", "disconnect"):
            continue
        if sid[:TAG_LEN] != tail if len(tail) == TAG_LEN else not sid.startswith(tail):
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
    start = times.parse_time(args.start, UTC, "--from") if args.start else None
    end = times.parse_time(args.end, UTC, "--to") if args.end else None
    out = sys.stdout
    for r in segments.iter_records(cfg.data_dir, session=args.session, start=start, end=end,
                                    on_error=warn):
        if args.json:
            out.write(json.dumps(r) + "\n")
        else:
            out.write(f"{r['time']}  {r['session_id'] or '-':<22}  "
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
                            stop_event=stop)

    uvloop.run(main())
    return 0


def cmd_collector_verify(args: argparse.Namespace) -> int:
    from relay.central.collector import verify

    report = verify(Path(args.verify_data_dir))
    sys.stdout.write(json.dumps(report.to_dict()) + "\n" if args.json else report.text())
    return 0 if report.ok else EXIT_ERROR


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
    from relay.tlsconf import SELF_SIGNED_CERT, pin_sha256

    cfg = _config(args)
    if args.protocol == "openvpn":
        from relay.serve.openvpn_link import client_config

        text = client_config(cfg, cfg.data_dir, args.proto, args.dev, args.remote)
    else:
        cert = Path(cfg.server.cert) if cfg.server.cert else cfg.data_dir / SELF_SIGNED_CERT
        if not cert.exists():
            raise RelayError(f"no certificate at {cert} yet: start relay serve once first")
        host, port = configmod.parse_hostport(cfg.server.listen)
        remote = args.remote or (host if host not in ("0.0.0.0", "::") else
                                 __import__("socket").gethostname())
        text = (f"openconnect --protocol=anyconnect --servercert {pin_sha256(cert)} "
                f"https://{remote}:{port}/\n")
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
        description="Find the session(s) whose 8-character tag ends the given User-Agent "
                    "(as a web server logged it) and print session ID, relay, client "
                    "address and connect/disconnect times.")
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
                    "checked by 'relay collector verify'), keeps at least 90 days. Plain "
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
    p.set_defaults(func=cmd_collector, collector_command=None)
    verify = p.add_subparsers(dest="collector_command", metavar="[verify]")
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
