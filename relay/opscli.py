"""The operator's commands of ``relay``: ``sessions`` (list, show, disconnect, as
ocserv's occtl does), ``status``, ``ban`` and ``config`` (registered by
relay/cli.py's build_parser).

Commands that change something go through the running relay's control socket,
so it stays the only writer of its files; with no relay running, ``ban add`` and
``ban remove`` change the files and the relay finds the change at its start.
Reading commands (``ban list``, ``ban show``, ``status`` of a stopped relay)
never change anything in the data directory: they are safe on an evidence copy.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import tzinfo
from pathlib import Path
from typing import Any

from relay import config as configmod
from relay import control, sessionid, times
from relay.errors import EXIT_NOTHING, EXIT_OK, RelayError
from relay.investigate.options import (
    RowWriter,
    add_filters,
    add_output,
    open_output,
    output_format,
    query_of,
    require_relay_data,
)
from relay.netaddr import AddressError, canonical_address, hostport
from relay.safeout import escape_text, json_text
from relay.sessionview import session_json

ConfigOf = Callable[[argparse.Namespace], configmod.Config]
AddDataDir = Callable[[argparse.ArgumentParser], None]


# ------------------------------------------------------------------ sessions


SESSION_COLUMNS = (("session_id", "session"), ("protocol", "protocol"), ("client", "client"),
                   ("virtual_ip", "virtual_ip"), ("connect", "since"), ("bytes_in", "bytes_in"),
                   ("bytes_out", "bytes_out"), ("destination_count", "destinations"))


def _live(cfg: configmod.Config, tz: tzinfo) -> list[dict[str, Any]]:
    """The open sessions of the relay running on the data directory, in the one
    session schema (relay.sessionview)."""
    views = control.request(require_relay_data(cfg.data_dir),
                            {"cmd": "sessions"}).get("sessions", [])
    out = []
    for view in views:
        connect = view.get("connect") or {}
        # A live session also names the worker process that carries it.
        out.append({**session_json(str(connect.get("session_id")), connect, None, tz,
                                   counters=view.get("counters")),
                    "worker": view.get("worker")})
    return sorted(out, key=lambda s: (s["connect_utc"] or "", s["session_id"]))


def _one(sessions: list[dict[str, Any]], text: str) -> dict[str, Any]:
    """The session whose ID is or starts with ``text`` (a tag will do)."""
    prefix = sessionid.check(text, "ID", prefix=True)
    found = [s for s in sessions if s["session_id"].startswith(prefix)]
    if len(found) > 1:
        raise RelayError(f"{prefix} starts {len(found)} open sessions' IDs: give more of it")
    if not found:
        raise RelayError(f"no open session {prefix} on this relay")
    return found[0]


def cmd_sessions(args: argparse.Namespace, cfg: configmod.Config) -> int:
    if args.action != "list" and args.session:
        raise RelayError(f"sessions {args.action}: name the session as ID, not --session")
    if args.action == "disconnect":
        return _disconnect(args, cfg)
    if args.action == "show" and not args.id:
        raise RelayError("sessions show: give the session's ID")
    if args.action == "list" and args.id:
        raise RelayError("sessions: an ID goes with show or disconnect")
    q, tz = query_of(args)
    sessions = _live(cfg, tz)
    if args.action == "show":
        session = _one(sessions, args.id)
        with open_output(args) as out:
            if output_format(args) == "json":
                out.write(json_text(session) + "\n")
            else:
                for key, value in session.items():
                    if key == "destinations":
                        value = " ".join(f"{d.get('scheme')}://{d.get('host')}"
                                         f"({hostport(d.get('ip'), d.get('port'))})"
                                         for d in value or [] if isinstance(d, dict))
                    out.write(f"{key}: {escape_text(value) if value is not None else '-'}\n")
        return EXIT_OK
    chosen = [s for s in sessions if (not q.session or s["session_id"].startswith(q.session))
              and (not q.client_ip or s["client_ip"] == q.client_ip)]
    with open_output(args) as out:
        fields = [*session_json("", None, None, tz), "worker", "destination_count"]
        w = RowWriter(out, output_format(args), fields, columns=SESSION_COLUMNS)
        for s in chosen:
            row = {**s, "destination_count": len(s["destinations"] or [])}
            if w.fmt == "table":
                row["client"] = hostport(s["client_ip"], s["client_port"])
            w.write(row)
        w.close()
    return EXIT_OK if chosen else EXIT_NOTHING


def _disconnect(args: argparse.Namespace, cfg: configmod.Config) -> int:
    request: dict[str, Any] = {"cmd": "session-disconnect", "reason": args.reason}
    if bool(args.id) == bool(args.client_ip):
        raise RelayError("sessions disconnect: give a session ID or --client-ip IP")
    if args.id:
        request["session"] = _one(_live(cfg, times.parse_zone(None)), args.id)["session_id"]
    else:
        from relay.sessionquery import normalize_ip

        request["client_ip"] = normalize_ip(args.client_ip, "--client-ip")
    ended = control.request(require_relay_data(cfg.data_dir), request).get("disconnected", [])
    for sid in ended:
        print(f"disconnected {escape_text(sid)}")
    if not ended:
        print("relay: no open session matched", file=sys.stderr)
    return EXIT_OK if ended else EXIT_NOTHING


# ------------------------------------------------------------------ status


def _status_from_disk(cfg: configmod.Config) -> dict[str, Any]:
    """What a stopped relay's files say, read without changing them."""
    import shutil

    from relay.connlog.forwarder import ship_status
    from relay.packetlog import segments

    files = segments.segment_files(cfg.data_dir)
    ship = ship_status(cfg.data_dir) if cfg.forward.collector else None
    return {
        "running": False, "pid": None, "server_id": cfg.server.id,
        "data_dir": str(cfg.data_dir), "started": None, "uptime_s": None, "workers": [],
        "sessions": None, "capture": None,
        "packet_log": {"bytes": segments.disk_use(cfg.data_dir), "files": len(files)},
        "shipping": None if ship is None else {
            "collector": cfg.forward.collector, "backlog_records": ship.get("backlog_records"),
            "backlog_bytes": ship.get("backlog_bytes"), "last_success": ship.get("last_success"),
            "consecutive_failures": ship.get("consecutive_failures")},
        "bans": len(_bans_on_disk(cfg.data_dir)),
        "free_disk_bytes": shutil.disk_usage(cfg.data_dir).free,
    }


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def status_text(st: dict[str, Any]) -> str:
    """``relay status`` on one screen."""
    lines = [f"relay {st['server_id']} on {st['data_dir']}: "
             + (f"running (pid {st['pid']}) since {st['started']}" if st["running"]
                else "NOT running")]
    if st["workers"]:
        lines.append(f"workers: {len(st['workers'])} ("
                     + ", ".join(f"{w['worker']}: pid {w['pid']}, {w['sessions']} sessions"
                                 if w["up"] else f"{w['worker']}: DOWN"
                                 for w in st["workers"])
                     + f"; {sum(w['restarts'] for w in st['workers'])} restarts)")
    if st["sessions"] is not None:
        by = ", ".join(f"{k} {v}" for k, v in sorted(st["sessions"]["by_protocol"].items()))
        lines.append(f"sessions: {st['sessions']['active']} open"
                     + (f" ({by})" if by else "") + f", {st['sessions']['total']} since start")
    cap = st["capture"]
    if cap is not None:
        lines.append(f"capture: {'attached' if cap['attached'] else 'NOT attached'}, ring "
                     f"{100 * (cap['ring_fill_ratio'] or 0):.1f}% full, {cap['records']} "
                     f"records, {cap['drops']} dropped")
    elif st["running"]:
        lines.append("capture: none (the relay runs without a packet log)")
    if st["packet_log"] is not None:
        lines.append(f"packet log: {_size(st['packet_log']['bytes'])} in "
                     f"{st['packet_log']['files']} files")
    ship = st["shipping"]
    lines.append("shipping: none (the connection log stays local)" if ship is None else
                 f"shipping to {ship['collector']}: backlog {ship['backlog_records']} records "
                 f"({_size(ship['backlog_bytes'])}), last success "
                 f"{ship['last_success'] or 'never'}, {ship['consecutive_failures']} "
                 "failures since")
    lines.append(f"bans: {st['bans']} in force")
    lines.append(f"free disk: {_size(st['free_disk_bytes'])}")
    return "\n".join(escape_text(line) for line in lines) + "\n"


def cmd_status(args: argparse.Namespace, cfg: configmod.Config) -> int:
    data_dir = require_relay_data(cfg.data_dir)
    try:
        st = control.request(data_dir, {"cmd": "status"})["status"]
    except control.NotRunning:
        st = _status_from_disk(cfg)
    with open_output(args) as out:
        out.write(json_text(st) + "\n" if output_format(args) == "json" else status_text(st))
    return EXIT_OK if st["running"] else EXIT_NOTHING


# ------------------------------------------------------------------ bans


BAN_FIELDS = ("network", "until", "until_utc", "offences", "reason")
BAN_COLUMNS = (("network", "network"), ("until", "until"), ("offences", "offences"),
               ("reason", "reason"))


def _bans_on_disk(data_dir: Path) -> list[Any]:
    """The bans in force by the journal, read without changing it (a torn last
    line, a legacy bans.json stay as they are for the relay to deal with)."""
    from relay.serve.abuse import BanIndex, BanJournal

    index = BanIndex()
    now = time.time()
    for ban in BanJournal(data_dir).load(repair=False):
        if ban.until > now:
            index.put(ban)
    return list(index.values())


def _ban_rows(args: argparse.Namespace, bans: list[dict[str, Any]], tz: tzinfo) -> None:
    with open_output(args) as out:
        w = RowWriter(out, output_format(args), BAN_FIELDS, columns=BAN_COLUMNS)
        for ban in bans:
            w.write({"network": ban["network"], "until": times.format_in(ban["until"], tz),
                     "until_utc": times.format_utc(ban["until"]), "offences": ban["offences"],
                     "reason": ban["reason"]})
        w.close()


def cmd_ban(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from relay.serve.abuse import parse_network

    _, tz = query_of(args)
    data_dir = cfg.data_dir
    if args.ban_command in ("list", "show"):
        require_relay_data(data_dir)
        request: dict[str, Any] = {"cmd": f"ban-{args.ban_command}"}
        if args.ban_command == "show":
            try:
                address = canonical_address(args.address)
            except AddressError:
                raise RelayError(f"ban show {args.address}: not an IP address "
                                 "(ban list shows the networks)") from None
            request["target"] = str(address)
        try:
            bans = control.request(data_dir, request)["bans"]
        except control.NotRunning:
            bans = [vars(b) for b in _bans_on_disk(data_dir)]
            if args.ban_command == "show":
                from relay.serve.abuse import BanIndex

                index = BanIndex()
                for b in _bans_on_disk(data_dir):
                    index.put(b)
                bans = [vars(b) for b in index.all_covering(address, time.time())]
        bans.sort(key=lambda b: (args.ban_command == "show" and -b["until"], b["network"]))
        _ban_rows(args, bans, tz)
        if not bans and args.ban_command == "show":
            print(f"relay: no ban covers {escape_text(args.address)}", file=sys.stderr)
        return EXIT_OK if bans or args.ban_command == "list" else EXIT_NOTHING
    # add, remove: a clear error before anything is sent; and the canonical
    # network, so a ban on ::ffff:198.51.100.7 is the ban on 198.51.100.7/32.
    require_relay_data(data_dir, existing_dir=True)
    target = parse_network(args.target)
    request = {"cmd": f"ban-{args.ban_command}", "target": target}
    if args.ban_command == "add":
        request.update(duration_s=configmod.parse_duration_arg(args.duration, "--for"),
                       reason=args.reason, force=args.force)
    try:
        response = control.request(data_dir, request)
    except control.NotRunning:
        response = _ban_on_files(cfg, args, request)
    if args.ban_command == "remove":
        if not response["removed"]:
            print(f"relay: no ban on {target}", file=sys.stderr)
            return EXIT_NOTHING
        print(f"removed the ban on {target}")
        return EXIT_OK
    ban = response["ban"]
    if response.get("kept"):
        print(f"relay: note: a longer ban on {ban['network']} is in force until "
              f"{times.format_in(ban['until'], tz)}; it stays as it is", file=sys.stderr)
    _ban_rows(args, [ban], tz)
    return EXIT_OK


def _ban_on_files(cfg: configmod.Config, args: argparse.Namespace,
                  request: dict[str, Any]) -> dict[str, Any]:
    """A ban added or removed with no relay running: the journal and an audit
    record in the connection log, as the relay would write them."""
    from relay.connlog import daylog
    from relay.serve.abuse import Abuse

    log = daylog.ConnectionLog(cfg.data_dir)
    try:
        abuse = Abuse(cfg.abuse, cfg.data_dir,
                      lambda record: log.append({**record, "server": {"id": cfg.server.id}}),
                      time.time)
        if request["cmd"] == "ban-remove":
            return {"removed": abuse.remove_ban(request["target"])}
        before = abuse.bans.by_network.get(request["target"])
        ban = abuse.add_ban(request["target"], request["duration_s"], request["reason"],
                            by="operator", force=request["force"])
        return {"ban": vars(ban), "kept": ban is before}
    finally:
        log.close()


# ------------------------------------------------------------------ config


def cmd_config(args: argparse.Namespace) -> int:
    if args.config_command == "example":
        sys.stdout.write(configmod.example())
        return EXIT_OK
    path = args.file
    cfg = configmod.from_text(sys.stdin.buffer.read(), "-") if path == "-" \
        else configmod.load(path)
    changed = configmod.changed_keys(cfg)
    print(f"{escape_text(path)}: ok" + (f" ({len(changed)} keys set: "
                                        f"{escape_text(', '.join(changed))})" if changed
                                        else " (every key at its default)"))
    return EXIT_OK


# ------------------------------------------------------------------ the parsers


def add_parsers(sub: Any, add_data_dir: AddDataDir, config_of: ConfigOf) -> None:
    """Register sessions, status, ban and config on ``relay``'s subparsers."""

    def run(func: Callable[[argparse.Namespace, configmod.Config], int]) -> Callable[..., int]:
        return lambda args: func(args, config_of(args))

    p = sub.add_parser(
        "sessions", help="the open sessions: list, show one, disconnect (as occtl)",
        description="relay sessions: the open sessions of the relay running on the data "
                    "directory (ID, protocol, client address and port, virtual IP, since, "
                    "bytes each way, destinations so far). relay sessions show ID: one of "
                    "them, every field (a tag or the start of the ID will do). relay "
                    "sessions disconnect ID|--client-ip IP: end them; their disconnect "
                    "records give the reason 'operator-disconnect' (and --reason). To keep "
                    "a client out, ban it (relay ban add).")
    p.add_argument("action", nargs="?", choices=("list", "show", "disconnect"),
                   default="list", help="list (default), show or disconnect")
    p.add_argument("id", nargs="?", metavar="ID", help="the session (show, disconnect)")
    add_data_dir(p)
    add_filters(p, ("tz", "session", "client_ip"), help_for={
        "client_ip": "list: only this client's sessions; disconnect: all of them"})
    p.add_argument("--reason", metavar="TEXT",
                   help="disconnect: your words, in the disconnect records and to the client")
    add_output(p)
    p.set_defaults(func=run(cmd_sessions))

    p = sub.add_parser(
        "status", help="the relay at a glance: running, sessions, capture, logs, bans, disk",
        description="Running or not, workers, sessions, capture attached and its ring "
                    "buffer's fill, packet-log size, shipping backlog, bans in force and free "
                    "disk, read off the running relay's metrics (the same figures "
                    "/metrics shows), or off its files when it is stopped. Exits 1 when "
                    "no relay runs on the data directory.")
    add_data_dir(p)
    add_output(p, ("text", "json"))
    p.set_defaults(func=run(cmd_status))

    ban = sub.add_parser(
        "ban", help="list, show, add or remove bans (works while the relay runs)",
        description="Bans go through the running relay; with none running, add and remove "
                    "change the files (DATA_DIR/bans.jsonl and an audit record) and the "
                    "relay finds them at its start. list and show never change anything.") \
        .add_subparsers(dest="ban_command", metavar="ACTION", required=True)
    p = ban.add_parser("list", help="the bans in force")
    add_data_dir(p)
    add_filters(p, ("tz",))
    add_output(p)
    p.set_defaults(func=run(cmd_ban))
    p = ban.add_parser("show", help="which bans cover an address (the longest first)")
    add_data_dir(p)
    p.add_argument("address", metavar="IP")
    add_filters(p, ("tz",))
    add_output(p)
    p.set_defaults(func=run(cmd_ban))
    p = ban.add_parser(
        "add", help="ban an IP or CIDR for a while",
        description="A ban never shortens one already in force on the same network; a "
                    "range as wide as an IPv4 /8 or an IPv6 /31 needs --force.")
    add_data_dir(p)
    p.add_argument("target", metavar="IP|CIDR")
    p.add_argument("--for", dest="duration", default="1h", metavar="DURATION",
                   help="how long, e.g. 30m, 12h, 7d (default 1h, at most 366d)")
    p.add_argument("--reason", default="added by operator", help="recorded in the audit log")
    p.add_argument("--force", action="store_true", help="allow a range /8 (IPv6 /31) or wider")
    add_filters(p, ("tz",))
    add_output(p, output=None)
    p.set_defaults(func=run(cmd_ban))
    p = ban.add_parser("remove", help="lift a ban")
    add_data_dir(p)
    p.add_argument("target", metavar="IP|CIDR")
    p.set_defaults(func=run(cmd_ban))

    cfg = sub.add_parser(
        "config", help="an example config with every key, or check a config file",
        description="relay config example: a config with every key, commented out at its "
                    "default, each with what it does (relay.toml(5)). relay config check "
                    "FILE (- for stdin): the checks relay serve makes, as one error line.") \
        .add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = cfg.add_parser("example", help="print a commented config with every key")
    p.set_defaults(func=cmd_config)
    p = cfg.add_parser("check", help="check a config file (- for stdin)")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_config)
