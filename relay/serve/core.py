"""``relay serve``: the control plane on uvloop.

One :class:`Relay` owns the TAP device, the session table, the connection log,
the audit and control, the metrics and the listeners. The protocol links
(relay.serve.cstp_link, relay.serve.openvpn_link) call it through the
:class:`relay.serve.link.LinkHost` interface it implements; the packets between
them and the TAP go through :class:`relay.serve.datapath.Datapath`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from relay import control
from relay.clienttext import clean
from relay.config import Config, ConfigError, parse_duration, parse_hostport
from relay.connlog import daylog
from relay.connlog.shipping import Shipping
from relay.errors import RelayError
from relay.fdlimit import nofile_needed, raise_nofile
from relay.fsutil import listen_tcp
from relay.metrics import Collector, Metric, MetricsServer
from relay.netaddr import canonical_address, canonical_ip
from relay.packetlog.recording import Recording
from relay.serve.abuse import Abuse, parse_network
from relay.serve.cstp_link import CstpListener
from relay.serve.datapath import Datapath
from relay.serve.dtls_link import DtlsEndpoint
from relay.serve.egress import Policy
from relay.serve.link import Lease, Link, LinkSettings
from relay.serve.nat import RelayTable
from relay.serve.openvpn_link import OpenVPNListener
from relay.serve.rdns import ReverseLookups
from relay.serve.registration import Registration
from relay.serve.sessions import (
    CHECKPOINT_INTERVAL_S,
    AddressPool,
    Journal,
    Session,
    SessionRefused,
    SessionTable,
    connect_record,
    disconnect_record,
    tags_in_log,
)
from relay.serve.tap import Tap
from relay.times import rfc3339_ms

log = logging.getLogger("relay")

# --- Limits and timeouts -------------------------------------------------------------

# After accept() fails (out of descriptors), wait this long before trying again
# instead of spinning.
ACCEPT_ERROR_BACKOFF_S = 0.1
# SO_LINGER on, zero timeout: close() sends RST and frees the socket at once.
LINGER_RESET = struct.pack("ii", 1, 0)
# The disconnect record's reason for a session an operator ended (relay sessions
# disconnect), followed by their words when they gave any.
OPERATOR_DISCONNECT = "operator-disconnect"


class Stats:
    """Counters of the relay's sessions and connections, exported as metrics
    (the datapath's are in its Traffic). Each is kept up to date where it
    changes, so a scrape costs the same with 1 or 4096 sessions."""

    def __init__(self) -> None:
        self.sessions_total: Counter[str] = Counter()  # by protocol
        self.sessions_active: Counter[str] = Counter()  # by protocol
        self.handshake_failures: Counter[str] = Counter()  # by reason
        self.peer_closed: Counter[str] = Counter()  # peers over a cap, by the cap


class Relay:
    """The core; to the links, their :class:`relay.serve.link.LinkHost`."""

    def __init__(self, cfg: Config, load_config: Callable[[], Config] | None = None) -> None:
        self.load_config = load_config
        self.data_dir = cfg.data_dir
        self.started = time.time()
        self.hostname = socket.gethostname()
        self._apply(cfg)
        self.stats = Stats()
        self.all_links: set[Link] = set()
        self.lookups = ReverseLookups()
        self.background: set[asyncio.Future[None]] = set()
        self.tap: Tap | None = None
        self.datapath: Datapath | None = None
        self.nat: RelayTable | None = None
        self.listener: socket.socket | None = None
        self.openvpn: OpenVPNListener | None = None
        self.dtls: DtlsEndpoint | None = None
        self.connlog: daylog.ConnectionLog | None = None
        self.control: asyncio.AbstractServer | None = None
        self.metrics: MetricsServer | None = None
        self.recording: Recording | None = None
        self.shipping: Shipping | None = None
        self.registration: Registration | None = None
        # Extra metric collectors of optional components (capture, shipping).
        self.collectors: list[Collector] = []
        # Components that take new settings on reload (the packet-log retention).
        self.reload_hooks: list[Callable[[Config], None]] = []

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        daylog.ensure_dir(self.data_dir)
        self.connlog = daylog.ConnectionLog(self.data_dir)
        self.journal = Journal(self.data_dir)
        self.abuse = Abuse(self.cfg.abuse, self.data_dir, self.audit, time.time)
        self._close_leftover_sessions()
        pool = AddressPool(self.cfg.pool)
        self.sessions = SessionTable(pool, tags_in_log(self.data_dir))
        host, port = self.cfg.listen_addr
        try:
            self.tap = await Tap.create(self.cfg.tap.name, pool.gateway, self.cfg.tap.mtu)
            self.datapath = Datapath(self.tap)
            # The egress policy is in force whenever the relay serves, NAT or not.
            self.nat = RelayTable(Policy.from_config(self.cfg), self.cfg.server.uplink)
            self.nat.install()
            self.collectors.append(self.nat.metrics)
            self.shipping = Shipping(self.cfg, self.audit)
            self.shipping.start()
            self.collectors.append(self.shipping.metrics)
            self.recording = Recording(self.cfg, self.tap.name, self.audit)
            await self.recording.start()
            self.collectors.append(self.recording.metrics)
            self.reload_hooks.append(self.recording.reload)
            loop.add_reader(self.tap.fd, self.datapath.on_tap_readable)
            self.openvpn = OpenVPNListener(self, self.datapath, self.cfg)
            self.collectors.append(self.openvpn.metrics)
            openvpn_tcp = await self.openvpn.start()
            self.spawn(self.accept_loop(openvpn_tcp, self.openvpn.accept))
            cstp_listener = CstpListener(self, self.datapath, self.cfg)
            self.listener = listen_tcp(host, port)
            if self.cfg.server.dtls:  # DTLS on UDP, the TLS listener's port number
                self.dtls = cstp_listener.dtls = DtlsEndpoint(self, self.datapath, self.cfg)
                self.dtls.open(host, self.listener.getsockname()[1])
                self.collectors.append(self.dtls.metrics)
            accepting = self.spawn(self.accept_loop(self.listener, cstp_listener.accept))
            log.info("listening on %s:%d (TLS, CSTP%s), TAP %s gateway %s, data in %s, "
                     "certificate %s", host, port, "; UDP, DTLS" if self.dtls else "",
                     self.tap.name, pool.gateway, self.data_dir, cstp_listener.cert_path)
            self.control = await control.serve_control(self.data_dir, self._control)
            if self.cfg.directory.url:  # listed only once every listener is up
                self.registration = Registration(self.cfg, self._directory_state)
                self.collectors.append(self.registration.metrics)
                self.reload_hooks.append(self.registration.reload)
            self.metrics = MetricsServer([self._metrics, *self.collectors])
            await self._start_metrics()
            tasks = [accepting, self.spawn(self._checkpoint_loop()),
                     self.spawn(self._abuse_loop()), self.spawn(self.nat.refresh_loop())]
            if self.registration is not None:
                tasks.append(self.spawn(self.registration.run(stop)))
            await stop.wait()
            for task in tasks:
                task.cancel()
        finally:
            await self._shutdown()

    async def accept_loop(self, lsock: socket.socket,
                          on_accept: Callable[[socket.socket, tuple[str, int]], None]) -> None:
        """Accept TCP connections; each is admitted by the abuse defences before
        ``on_accept`` (and so before any TLS work) or reset at once."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(lsock)
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                log.error("accept: %s", exc.strerror)
                await asyncio.sleep(ACCEPT_ERROR_BACKOFF_S)
                continue
            refused = self.abuse.admit(peer[0])
            if refused is not None:
                # Before any TLS work: an RST costs the relay nothing more.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                sock.close()
                continue
            on_accept(sock, peer)

    def spawn(self, coro: Awaitable[None], link: Link | None = None) -> asyncio.Future[None]:
        """Run a task that the relay keeps a reference to until it ends. An
        exception it ends with is logged (one line) and ends ``link``, so no
        connection waits on a task that died and no loop dies unseen."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(lambda t: self._reap(t, link))
        return task

    def _reap(self, task: asyncio.Future[None], link: Link | None) -> None:
        self.background.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        text = f"{type(exc).__name__}: {exc}"
        log.debug("task failed", exc_info=exc)
        if link is None:
            log.error("internal error: %s", text)
            return
        log.error("dropped %s: internal error: %s", link, text)
        link.terminate("relay-error", "internal error in the relay")

    async def _abuse_loop(self) -> None:
        interval = self.cfg.abuse.seconds("summary_interval")
        while True:
            await asyncio.sleep(interval)
            self.abuse.expire()
            summary = self.abuse.summarise()
            if summary is not None:
                self.audit(summary)

    def audit(self, record: dict[str, Any]) -> dict[str, Any]:
        """An audit record in the connection log (shipped like the others), as logged."""
        assert self.connlog is not None
        logged = self.connlog.append(
            {**record, "server": {"id": self.cfg.server.id, "hostname": self.hostname}})
        if record["action"] == "ban":
            log.warning("banned %s until %s: %s", record["network"],
                        rfc3339_ms(record["until"]), record["reason"])
            network = ipaddress.ip_network(record["network"])
            for link in list(self.all_links):
                if canonical_address(link.peer_ip) in network:
                    link.terminate("banned", f"source banned: {record['reason']}")
        elif record["action"] == "unban":
            log.info("unbanned %s: %s", record["network"], record["reason"])
        return logged

    async def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "reload":
            return {"ok": True, "message": await self.reload()}
        if cmd == "ban-list":
            self.abuse.expire()
            return {"ok": True, "bans": [vars(b) for b in self.abuse.bans.values()]}
        if cmd == "ban-show":
            bans = self.abuse.bans.all_covering(canonical_address(str(req.get("target"))),
                                                self.abuse.clock())
            return {"ok": True, "bans": [vars(b) for b in bans]}
        if cmd == "ban-add":
            network = parse_network(str(req.get("target")))
            before = self.abuse.bans.by_network.get(network)
            ban = self.abuse.add_ban(network, float(req.get("duration_s", 0)),
                                     str(req.get("reason") or "added by operator"),
                                     by="operator", force=bool(req.get("force")))
            return {"ok": True, "ban": vars(ban), "kept": ban is before}
        if cmd == "ban-remove":
            return {"ok": True, "removed": self.abuse.remove_ban(str(req.get("target")))}
        if cmd == "sessions":
            return {"ok": True, "sessions": [self._session_view(s)
                                             for s in self.sessions.by_id.values()]}
        if cmd == "session-disconnect":
            return {"ok": True, "disconnected": self._disconnect(req)}
        if cmd == "status":
            return {"ok": True, "status": self._status()}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # -- what the operator sees and does (relay sessions, relay status) ---------------

    def _session_view(self, s: Session) -> dict[str, Any]:
        """An open session for ``relay sessions``: its connect record (the reverse
        lookup's answer so far in it) and its counters (relay.sessionview)."""
        assert self.datapath is not None
        link = self.datapath.links.get(s.mac)
        connect = dict(s.connect_record)
        if link is not None and isinstance(connect.get("client"), dict):
            connect["client"] = {**connect["client"], "hostname": link.client_hostname()}
        return {"connect": connect, "counters": s.counters()}

    def _disconnect(self, req: dict[str, Any]) -> list[str]:
        """End the sessions an operator named (a session ID, or every session of a
        client address); their disconnect records give ``operator-disconnect`` and
        the operator's words. The IDs of the sessions ended."""
        assert self.datapath is not None
        sid, client_ip = req.get("session"), req.get("client_ip")
        chosen = [s for s in self.sessions.by_id.values()
                  if (isinstance(sid, str) and s.id == sid)
                  or (isinstance(client_ip, str) and s.client_ip == client_ip)]
        words = clean(str(req.get("reason") or ""))
        reason = f"{OPERATOR_DISCONNECT}: {words}" if words else OPERATOR_DISCONNECT
        ended = []
        for s in chosen:
            link = self.datapath.links.get(s.mac)
            if link is not None:
                link.terminate(reason, "disconnected by the relay's operator"
                               + (f": {words}" if words else ""))
                ended.append(s.id)
        return ended

    def _status(self) -> dict[str, Any]:
        """``relay status``: read off the same samples a metrics scrape returns,
        so the two always agree."""
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for collect in (self._metrics, *self.collectors):
            for m in collect():
                for labels, value in m.samples:
                    samples.setdefault(m.name, {})[tuple(sorted(labels.items()))] = value

        def one(name: str) -> float | None:
            return samples.get(name, {}).get(())

        active = {dict(k)["protocol"]: int(v)
                  for k, v in samples.get("relay_sessions_active", {}).items()}
        shipping = None
        if "relay_ship_backlog_records" in samples:
            last = one("relay_ship_last_success_timestamp_seconds")
            shipping = {"collector": self.cfg.forward.collector,
                        "backlog_records": int(one("relay_ship_backlog_records") or 0),
                        "backlog_bytes": int(one("relay_ship_backlog_bytes") or 0),
                        "last_success": rfc3339_ms(last) if last else None,
                        "consecutive_failures": int(one("relay_ship_consecutive_failures")
                                                    or 0)}
        capture = None
        if "relay_capture_attached" in samples:
            capture = {"attached": one("relay_capture_attached") == 1,
                       "ring_fill_ratio": one("relay_capture_ring_fill_ratio"),
                       "records": int(one("relay_capture_records_total") or 0),
                       "drops": int(sum(samples.get("relay_capture_drops_total", {}).values()))}
        return {
            "running": True, "pid": os.getpid(), "server_id": self.cfg.server.id,
            "data_dir": str(self.data_dir), "started": rfc3339_ms(self.started),
            "uptime_s": round(time.time() - self.started, 3),
            # One worker, this process, until the relay runs one per core: each
            # will be an entry of its own.
            "workers": [{"pid": os.getpid(), "sessions": sum(active.values())}],
            "sessions": {"active": sum(active.values()), "by_protocol": active,
                         "total": int(sum(samples.get("relay_sessions_total", {}).values()))},
            "capture": capture,
            "packet_log": {"bytes": int(one("relay_packetlog_bytes") or 0),
                           "files": int(one("relay_packetlog_segments") or 0)}
            if "relay_packetlog_bytes" in samples else None,
            "shipping": shipping,
            "bans": int(one("relay_bans_active") or 0),
            "free_disk_bytes": int(one("relay_data_dir_free_bytes") or 0),
        }

    def _apply(self, cfg: Config) -> None:
        """Take the values that can change while running."""
        self.cfg = cfg
        self.settings = LinkSettings(
            login_timeout_s=parse_duration(cfg.server.login_timeout),
            handshake_timeout_s=parse_duration(cfg.server.handshake_timeout),
            dpd_s=parse_duration(cfg.server.dpd), keepalive_s=parse_duration(cfg.server.keepalive))
        self.users = _load_users(cfg.server.users)
        # The caps may have grown (a reload): so may the descriptors they need.
        nofile_problem = raise_nofile(nofile_needed(cfg))
        if nofile_problem is not None:
            log.warning("%s", nofile_problem)

    async def reload(self) -> str:
        """Re-read the config; a bad one is refused and the old one stays in force."""
        if self.load_config is None:
            raise RelayError("this relay was started without a config source to reload")
        try:
            new = self.load_config()
            _load_users(new.server.users)
        except RelayError as exc:
            log.error("reload refused, the running config stays in force: %s", exc)
            raise RelayError(f"reload refused, the running config stays in force: {exc}") \
                from None
        fixed = [key for key, old, now in (
            ("[server] listen", self.cfg.server.listen, new.server.listen),
            ("[server] dtls", self.cfg.server.dtls, new.server.dtls),
            ("[server] uplink", self.cfg.server.uplink, new.server.uplink),
            ("[server] cert/key", (self.cfg.server.cert, self.cfg.server.key),
             (new.server.cert, new.server.key)),
            ("[tap]", self.cfg.tap, new.tap),
            ("[logs] data_dir", self.cfg.logs.data_dir, new.logs.data_dir),
            ("[openvpn]", self.cfg.openvpn, new.openvpn),
            # Live connections are counted under their key: it must not change.
            ("[abuse] ipv6_prefix", self.cfg.abuse.ipv6_prefix, new.abuse.ipv6_prefix),
        ) if old != now]
        if fixed:
            # Keep the running values of keys that need a restart, take the rest.
            new = replace(new, server=replace(new.server, listen=self.cfg.server.listen,
                                              dtls=self.cfg.server.dtls,
                                              uplink=self.cfg.server.uplink,
                                              cert=self.cfg.server.cert, key=self.cfg.server.key),
                          tap=self.cfg.tap, logs=replace(new.logs, data_dir=self.cfg.logs.data_dir),
                          openvpn=self.cfg.openvpn,
                          abuse=replace(new.abuse, ipv6_prefix=self.cfg.abuse.ipv6_prefix))
        if self.nat is not None and new.egress != self.cfg.egress:
            try:  # first: if the kernel refuses the rules, nothing else changes
                await asyncio.get_running_loop().run_in_executor(
                    None, self.nat.replace, Policy.from_config(new))
            except RelayError as exc:
                log.error("reload refused, the running config stays in force: %s", exc)
                raise RelayError(f"reload refused, the running config stays in force: {exc}") \
                    from None
        old_metrics = self.cfg.metrics.listen
        self._apply(new)
        self.abuse.cfg = new.abuse
        for hook in self.reload_hooks:
            hook(new)
        if self.shipping is not None:
            await self.shipping.reload(new)
        if new.metrics.listen != old_metrics and self.metrics is not None:
            self.metrics.close()
            await self._start_metrics()
        message = "config reloaded"
        if fixed:
            message += f"; {', '.join(fixed)} changed but need a restart (kept as running)"
        log.info("%s", message)
        self.audit({"action": "config-reload", "message": message})
        return message

    def _directory_state(self) -> dict[str, int]:
        """What a heartbeat reports of the relay's life (relay.serve.registration)."""
        st = self.stats
        assert self.datapath is not None
        traffic = self.datapath.traffic
        return {"sessions_active": sum(st.sessions_active.values()),
                "sessions_total": sum(st.sessions_total.values()),
                "traffic_bytes": traffic.bytes_in + traffic.bytes_out}

    async def _start_metrics(self) -> None:
        if not self.cfg.metrics.listen:
            return
        host, port = parse_hostport(self.cfg.metrics.listen)
        try:
            await self.metrics.start(host, port)
        except OSError as exc:
            raise RelayError(f"[metrics] listen: cannot listen on {host}:{port}: "
                             f"{exc.strerror}") from None

    def _metrics(self) -> list[Metric]:
        st = self.stats
        assert self.datapath is not None
        traffic = self.datapath.traffic
        free = shutil.disk_usage(self.data_dir).free
        out = [
            Metric("relay_sessions_active", "gauge", "Open sessions, by protocol."),
            Metric("relay_sessions_total", "counter", "Sessions opened, by protocol."),
            Metric("relay_packets_total", "counter",
                   "Packets forwarded; direction in = from clients.")
            .add(traffic.packets_in, direction="in").add(traffic.packets_out, direction="out"),
            Metric("relay_bytes_total", "counter", "IP bytes forwarded; in = from clients.")
            .add(traffic.bytes_in, direction="in").add(traffic.bytes_out, direction="out"),
            Metric("relay_dropped_packets_total", "counter", "Packets dropped, by reason."),
            Metric("relay_ua_stamps_total", "counter", "User-Agent values stamped.")
            .add(traffic.ua_stamped),
            Metric("relay_ua_stamps_missed_total", "counter",
                   "HTTP requests whose User-Agent may have crossed unstamped (split "
                   "across segments).").add(traffic.ua_missed),
            Metric("relay_handshake_failures_total", "counter",
                   "Connections that failed before a session, by reason."),
            Metric("relay_refusals_total", "counter",
                   "Connections or sessions refused (abuse defences, a full relay), by reason."),
            # O(1): a ban leaves the index at the next expiry pass, at most
            # [abuse] summary_interval after its end.
            Metric("relay_bans_active", "gauge", "Bans in force.").add(len(self.abuse.bans)),
            Metric("relay_data_dir_free_bytes", "gauge",
                   "Free space in the data directory's file system.").add(free),
            Metric("relay_peer_closed_total", "counter",
                   "Connections closed because the peer exceeded a cap, by the cap."),
            Metric("relay_handshakes_in_progress", "gauge",
                   "Connections admitted and not yet a session ([abuse] handshakes_total "
                   "counts these).").add(self.abuse.handshakes),
        ]
        for reason, n in sorted(st.peer_closed.items()):
            out[11].add(n, reason=reason)
        for protocol in sorted(st.sessions_total):
            out[0].add(st.sessions_active[protocol], protocol=protocol)
            out[1].add(st.sessions_total[protocol], protocol=protocol)
        for reason, n in sorted(traffic.dropped.items()):
            out[4].add(n, reason=reason)
        for reason, n in sorted(st.handshake_failures.items()):
            out[7].add(n, reason=reason)
        for reason, n in sorted(self.abuse.refused_total.items()):
            out[8].add(n, reason=reason)
        return out

    async def _shutdown(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.control is not None:
            self.control.close()
            (self.data_dir / control.SOCKET_NAME).unlink(missing_ok=True)
        if self.listener is not None:
            self.listener.close()
        if self.openvpn is not None:
            self.openvpn.close()
        for link in list(self.all_links):
            link.terminate("relay-shutdown", "the relay was stopped")
        if self.dtls is not None:
            self.dtls.close()
        if self.recording is not None:
            await self.recording.close()
        if self.tap is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.tap.fd)
            self.tap.close()
        if self.nat is not None:
            self.nat.remove()
        if self.shipping is not None:
            # Last: the disconnect records above are in the log, and the forwarder
            # sends what it can before it stops (the rest goes after the restart).
            await self.shipping.close()
        if self.connlog is not None:
            self.connlog.close()
        log.info("stopped")

    def _close_leftover_sessions(self) -> None:
        assert self.connlog is not None
        for path, entry in self.journal.leftovers():
            if entry is None or not isinstance(entry.get("connect"), dict):
                log.error("session journal %s is unreadable; its session may lack a "
                          "disconnect record", path)
                path.unlink(missing_ok=True)
                continue
            connect = entry["connect"]
            self.connlog.append(disconnect_record(
                connect, entry, end_time=time.time(), reason="relay-restart",
                error="the relay stopped without closing this session (killed or crashed); "
                      "counters are from its last checkpoint and the end time is the restart"))
            path.unlink(missing_ok=True)
            log.warning("closed session %s left open by a previous run", connect.get("session_id"))

    async def _checkpoint_loop(self) -> None:
        assert self.datapath is not None
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            for link in list(self.datapath.links.values()):
                if link.session is not None:
                    self.journal.write(link.session)

    # -- what the links are offered (LinkHost) ---------------------------------------

    def admit(self, ip: str) -> str | None:
        return self.abuse.admit(ip)

    def link_began(self, link: Link) -> asyncio.Future[Any] | None:
        self.all_links.add(link)
        return self.lookups.start(link.peer_ip, link.peer_port)

    def link_ended(self, link: Link, lifetime_s: float, had_session: bool) -> None:
        self.all_links.discard(link)
        self.abuse.connection_closed(link.peer_ip, lifetime_s, had_session)

    def handshake_done(self, link: Link) -> None:
        self.abuse.handshake_done(link.peer_ip)

    def admit_handshake(self, ip: str) -> str | None:
        return self.abuse.admit(ip, new_session=False)

    def handshake_over(self, ip: str, strike: bool) -> None:
        self.abuse.handshake_over(ip, strike)

    def client_moved(self, link: Link, old: tuple[str, int]) -> asyncio.Future[Any] | None:
        s = link.session
        assert s is not None
        client_ip = canonical_ip(link.peer_ip)
        self.abuse.moved(old[0], link.peer_ip)
        if self.recording is not None:  # the packets from now on carry the new address
            self.recording.add_session(s.mac, s.id, client_ip, link.peer_port)
        logged = self.audit({"action": "client-float", "session_id": s.id,
                             "from": {"ip": s.client_ip, "port": s.client_port},
                             "to": {"ip": client_ip, "port": link.peer_port}})
        s.moved(client_ip, link.peer_port, logged["time"])
        self.journal.write(s)
        log.info("session %s: client moved from %s:%d to %s:%d", s.id, old[0], old[1],
                 client_ip, link.peer_port)
        banned = self.abuse.banned(link.peer_ip)
        if banned is not None:  # as a ban ends the sessions it covers
            link.terminate("banned", f"source banned: {banned.reason}")
        return self.lookups.start(link.peer_ip, link.peer_port)

    def count_handshake_failure(self, reason: str) -> None:
        self.stats.handshake_failures[reason] += 1

    def count_peer_closed(self, cap: str) -> None:
        self.stats.peer_closed[cap] += 1

    # -- sessions -------------------------------------------------------------------

    def refuse_reason(self, link: Link) -> str | None:
        """Why a new session for ``link`` must be refused now (no disk left to log
        it, ``[server] max_sessions`` reached, no free address), for the client;
        None to go ahead. A refusal is counted (``relay_refusals_total``) and
        summarised into the audit log per source, as the abuse refusals are."""
        why = self.recording.refuse_reason() if self.recording is not None else None
        if why is not None:
            reason = "disk-full"
        elif len(self.sessions) >= self.cfg.server.max_sessions:
            reason, why = "max-sessions", "the relay is full; try again later or another relay"
        elif not self.sessions.pool.available():
            reason, why = "pool-exhausted", (f"no free address in {self.sessions.pool.network}; "
                                             "try again later or another relay")
        else:
            return None
        self.abuse.refuse(link.peer_ip, reason)
        return why

    def check_login(self, link: Link, username: str, password: str) -> bool:
        """Anonymous (anything goes) unless [server] users names a user list.
        The passwords are compared as UTF-8 bytes, in constant time (any text)."""
        if self.users is None:
            return True
        expected = self.users.get(username)
        if expected is not None and secrets.compare_digest(
                expected.encode("utf-8", "surrogatepass"),
                password.encode("utf-8", "surrogatepass")):
            return True
        log.warning("login refused for %r from %s", clean(username), link)
        return False

    async def open_session(self, link: Link, protocol: str, software: dict[str, Any],
                           mac: bytes | None = None, data_channel: str | None = None) -> Lease:
        """A new session for ``link``: address, neighbour entry, connect record.
        ``mac`` is the client's own MAC for bridged (TAP-style) clients;
        ``data_channel`` the connect record's field of that name.
        :class:`SessionRefused` when :meth:`refuse_reason` refuses it; any other
        failure leaves nothing behind (no address, no attribution)."""
        assert self.tap is not None and self.connlog is not None and self.datapath is not None
        refusal = self.refuse_reason(link)
        if refusal is not None:
            raise SessionRefused(refusal)
        # Records name the client as searches and bans do: a dual-stack listener's
        # ::ffff:a.b.c.d is a.b.c.d (the link keeps the raw form to send to).
        client_ip = canonical_ip(link.peer_ip)
        s = self.sessions.open(client_ip, link.peer_port, protocol, mac)
        try:
            # Before the client may send: its packets must be attributed, and
            # replies to it must find its MAC.
            if self.recording is not None:
                self.recording.add_session(s.mac, s.id, client_ip, link.peer_port)
            await self.tap.add_neighbour(s.virtual_ip, s.mac)
        except BaseException:
            if self.recording is not None:
                self.recording.remove_session(s.mac)
            self.sessions.close(s)
            self.spawn(self._forget_address(s.virtual_ip))
            raise
        s.connect_record = self.connlog.append(connect_record(
            s, server_id=self.cfg.server.id, server_ip=canonical_ip(link.local_ip),
            server_hostname=self.hostname, client_hostname=link.client_hostname(),
            software=software, data_channel=data_channel))
        self.journal.write(s)
        self.datapath.links[s.mac] = link
        self.stats.sessions_total[protocol] += 1
        self.stats.sessions_active[protocol] += 1
        log.info("session %s open: %s:%d as %s (%s)", s.id, client_ip, link.peer_port,
                 s.virtual_ip, s.connect_record["client_software"]["name"])
        pool = self.sessions.pool
        return Lease(s, s.virtual_ip, str(pool.network.netmask), str(pool.gateway.ip),
                     self.cfg.tap.mtu, tuple(self.cfg.tap.dns))

    def close_session(self, link: Link, s: Session, reason: str, error: str | None) -> None:
        """End a session: disconnect record, its address freed. ``reason`` may carry
        the client's own words (a CSTP disconnect reason): it is cleaned."""
        assert self.tap is not None and self.connlog is not None and self.datapath is not None
        reason = clean(reason) or "unknown"
        self.datapath.links.pop(s.mac, None)
        if self.recording is not None:
            self.recording.remove_session(s.mac)
        self.connlog.append(disconnect_record(
            s.connect_record, s.counters(), end_time=time.time(), reason=reason, error=error,
            client_hostname=link.client_hostname()))
        self.journal.remove(s)
        self.sessions.close(s)
        self.stats.sessions_active[s.protocol] -= 1
        log.info("session %s closed: %s%s", s.id, reason, f" ({error})" if error else "")
        self.spawn(self._forget_address(s.virtual_ip))

    async def _forget_address(self, ip: str) -> None:
        assert self.tap is not None
        if self.tap.fd >= 0:
            await self.tap.remove_neighbour(ip)
        self.sessions.pool.release(ip)


def _load_users(path: str) -> dict[str, str] | None:
    if not path:
        return None
    users: dict[str, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"[server] users: cannot read {path}: {exc.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, password = line.partition(":")
        if not sep or not name:
            raise ConfigError(f"[server] users: {path}:{n}: expected name:password")
        users[name] = password
    return users


def serve(load_config: Callable[[], Config]) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the config through ``load_config``."""
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        relay = Relay(load_config(), load_config)

        async def reload() -> None:
            with contextlib.suppress(RelayError):  # reload logged why it refused
                await relay.reload()

        def on_hup() -> None:
            relay.spawn(reload())

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        await relay.run(stop)

    uvloop.run(main())
