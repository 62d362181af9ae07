"""Configuration: TOML with an embedded default for every key.

``load(path)`` returns a :class:`Config`; any problem raises :class:`ConfigError`
whose message names the offending key (``[server] listen: ...``), which the CLI
prints as one line. Unknown sections and keys are errors too: a typo must not
silently leave a default in force on a relay that logs for abuse handling.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import textwrap
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from relay.errors import RelayError
from relay.protocols import syslog5424

DEFAULT_DATA_DIR = Path("/var/lib/relay")
# [server] id: a name in every record, a directory name at the collector and the CN
# of the relay's client certificate there.
SERVER_ID_RULE = r"[A-Za-z0-9._-]{1,64}"


# The most [server] workers: a worker's index travels in one byte of the OpenVPN
# peer id and of the DTLS App-ID, which steer datagrams to it (relay.serve.steer).
WORKERS_MAX = 256


# The widest [abuse] ipv6_prefix: ISPs assign at most a /32 to anyone but another
# registry (RIPE-690), so a wider key would lump unrelated networks together.
IPV6_PREFIX_MIN = 32


class ConfigError(RelayError):
    pass


# The shortest packet-log segment: the writer syncs once a second
# (relay.packetlog.segments.FLUSH_INTERVAL) and a zero period divides by zero.
# Short segments are for tests; an hour is the default.
MIN_PACKET_SEGMENT_S = 1
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``"90s"``, ``"5m"``, ``"1h"``, ``"14d"`` -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration like 30s, 5m, 1h or 14d, got {text!r}")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def parse_duration_arg(text: str, option: str) -> int:
    """A duration given on the command line as ``option``: ConfigError (one line,
    naming the option) when bad."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def parse_hostport(text: str) -> tuple[str, int]:
    """``"0.0.0.0:443"`` or ``"[::]:443"`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
            raise ValueError(f"expected an IP address or host name, got {host!r}") from None
    return host, int(port)


def setting(default: Any, doc: str) -> Any:
    """A config key: its default, and the words that ``relay config example``,
    relay.toml(5) and the README's table show for it (one place for all three)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class ServerConfig:
    """The relay's identity, its CSTP listener and its sessions."""

    id: str = setting("relay-1", "shown in every record; the subject CN of the relay's client "
                             "certificate at the collector and the directory")
    listen: str = setting("0.0.0.0:443", "AnyConnect (CSTP) over TLS, HOST:PORT ([::]:443 for "
                                     "IPv6 and IPv4; restart to change)")
    # TCP over TCP collapses on lossy, long paths; stock openconnect asks for DTLS.
    dtls: bool = setting(True, "offer a DTLS data channel (UDP, the listen port's number) to "
                         "clients that ask for it, as stock openconnect does (restart to "
                         "change)")
    uplink: str = setting("", "NAT towards this interface (e.g. eth0); empty = no NAT (restart "
                          "to change)")
    cert: str = setting("", "PEM certificate for clients (with key); empty = a self-signed one "
                        "in DATA_DIR/tls/ (restart to change)")
    key: str = setting("", "the certificate's private key (PEM)")
    # Cisco ASA's default client DPD interval is 30 s.
    dpd: str = setting("30s", "dead-peer-detection interval announced to clients "
                          "(X-CSTP-DPD); 3 silent intervals end a session")
    # ASA uses 20 s so that NAT boxes on the path keep the TCP mapping open.
    keepalive: str = setting("20s", "keepalive interval announced to clients "
                                "(X-CSTP-Keepalive)")
    # nginx's ssl_handshake_timeout default is 60 s, a VPN client on a working path
    # finishes in well under a second, so 15 s is generous and frees the slot of a
    # stalled (slowloris) client sooner.
    handshake_timeout: str = setting("15s", "TLS handshake deadline (slowloris)")
    # openconnect needs three round trips after the handshake; a minute also covers
    # a human typing a password.
    login_timeout: str = setting("60s", "from TCP accept to an open tunnel")
    users: str = setting("", "a file of name:password lines; empty = anonymous, any name and "
                         "password accepted, as a public relay does")
    # 4x OpenVPN's max-clients default (1024): a 2-core relay forwards ~800 Mbit/s
    # (bench/), ~200 kbit/s each for 4096 busy sessions, the least that keeps
    # browsing usable. It sizes the open-files limit too (relay.fdlimit.nofile_needed).
    max_sessions: int = setting(4096, "sessions open at once, all protocols; past this (or with "
                                  "the pool used up) a new one is refused with the reason "
                                  "(CSTP 503, OpenVPN AUTH_FAILED,TEMP)")
    # One datapath process per core, as nginx's worker_processes auto: each serves
    # many sessions (ocserv's one process per client costs ~740 KiB per session).
    workers: int = setting(0, "datapath worker processes, each with its own TAP queue and "
                           "listening sockets; 0 = one per CPU the relay may use (relay serve "
                           "--workers overrides; restart to change)")


@dataclass(frozen=True)
class TapConfig:
    """The TAP device the sessions' packets cross, and their addresses (restart to
    change)."""

    name: str = setting("relay0", "the TAP device")
    pool: str = setting("10.211.0.0/16", "virtual IPs (IPv4, at most a /29); the first host "
                                     "address is the relay's")
    # 1400 leaves room for TLS + TCP + IP over a 1500-byte path, as ocserv's default.
    mtu: int = setting(1400, "tunnel MTU (576..9000)")
    dns: list[str] = setting([], "DNS servers pushed to clients (the egress policy lets port 53 "
                             "to them through)")


@dataclass(frozen=True)
class LogsConfig:
    """What the relay keeps, where, and for how long."""

    data_dir: str = setting(str(DEFAULT_DATA_DIR), "everything the relay keeps: connection log, "
                                               "packet log, chains, bans, TLS keys "
                                               "(restart to change)")
    packet_segment: str = setting("1h", "packet-log segment length")
    compress_after: str = setting("14d", "packet logs stay fully searchable this long (at least "
                                     "14d), then are archived: smaller, still searchable")
    delete_after: str = setting("", "delete packet logs older than this (at least 14d); empty = "
                                "never: they are kept until the free-disk guard deletes the "
                                "oldest archives")
    connlog_keep: str = setting("90d", "connection-log retention (at least 90d)")
    connlog_compress_after: str = setting("1d", "connection-log days older than this are "
                                            "zstd-compressed (at least 1d)")


@dataclass(frozen=True)
class CaptureConfig:
    """The eBPF packet capture."""

    # Where none is mounted there (as under `ip netns exec`, which remounts /sys), the
    # relay mounts one of its own; `relay logging` reaches it through /proc/PID/root,
    # so the default works in namespaces too.
    bpffs: str = setting("/sys/fs/bpf", "the bpffs where the capture is pinned (under relay/DEV/) "
                                    "for relay logging; the relay mounts one there if none is")


@dataclass(frozen=True)
class ForwardConfig:
    """Shipping the connection log to a collector (RFC 5425, syslog over TLS)."""

    collector: str = setting("", "HOST:PORT of the collector (6514 is RFC 5425's port); empty = "
                             "the connection log stays local")
    ca: str = setting("", "CA the collector's certificate must chain to (required with a "
                      "collector)")
    cert: str = setting("", "client certificate for the collector; relay collector wants one "
                        "whose subject CN is [server] id")
    key: str = setting("", "its private key")
    facility: str = setting("local0", "syslog facility of the messages (local0..local7, authpriv)")
    retry_max: str = setting("60s", "longest wait between reconnection attempts (exponential "
                                "back-off with jitter)")


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics."""

    # Loopback: the counters describe users' traffic and are nobody else's business.
    listen: str = setting("127.0.0.1:9810", "Prometheus text format at http://HOST:PORT/metrics; "
                                        "empty = off")


@dataclass(frozen=True)
class OpenVPNConfig:
    """The OpenVPN listener (restart to change)."""

    listen: str = setting("0.0.0.0:1194", "OpenVPN over TCP and UDP, HOST:PORT")
    tls_crypt: bool = setting(False, "tls-crypt: every control packet under a static key "
                                 "(DATA_DIR/tls/tls-crypt.key, made on first use) that "
                                 "relay client-config openvpn writes inline; peers without "
                                 "it get no answer, and existing client configs stop working")


@dataclass(frozen=True)
class AbuseConfig:
    """Listener defences (relay.serve.abuse): every threshold of the ``[abuse]`` table."""

    # An openconnect client makes 1-2 connections per session and reconnects at most
    # every 10 s.
    rate_per_ip: float = setting(5.0, "new connections per second per source, sustained (token "
                                  "bucket)")
    burst_per_ip: int = setting(20, "... and its burst")
    # What one relay on 2 cores handshakes comfortably (TLS 1.3 ECDHE costs ~1 ms of
    # CPU), leaving CPU for forwarding.
    rate_total: float = setting(200.0, "new connections per second overall")
    burst_total: int = setting(400, "... and its burst")
    # Per IP 16 leaves room for a CGNAT'd neighbourhood; the total bounds memory and
    # CPU held by stalled (slowloris) clients.
    handshakes_per_ip: int = setting(16, "handshakes in progress per source")
    handshakes_total: int = setting(512, "handshakes in progress overall")
    # Households and CGNAT share one address.
    sessions_per_ip: int = setting(32, "sessions open at once per source")
    short_session: str = setting("10s", "a connection that closes sooner is a strike (0s: none "
                                    "is)")
    strikes: int = setting(20, "this many strikes (short connections, refusals) within "
                           "strike_window ban the source")
    strike_window: str = setting("60s", "the window strikes are counted in")
    # fail2ban's bantime default is 10 min; its recidive jail bans for a day.
    ban: str = setting("10m", "the first automatic ban, doubled per repeat offence within a day")
    ban_max: str = setting("1d", "the longest automatic ban")
    summary_interval: str = setting("60s", "refusals are summarised into the audit log this often")
    # One subscriber's LAN is a /64 (RFC 6177, RFC 7421), which fail2ban-style tools
    # and Cloudflare key IPv6 rate limits on.
    ipv6_prefix: int = setting(64, f"an IPv6 source is its covering /ipv6_prefix network "
                               f"({IPV6_PREFIX_MIN}..128): limits, strikes and automatic bans "
                               "hold the whole prefix (restart to change)")

    def seconds(self, key: str) -> float:
        return float(parse_duration(getattr(self, key)))


@dataclass(frozen=True)
class EgressConfig:
    """Adjustments to the egress policy's default block (relay.serve.egress): lists of
    networks (CIDR) or addresses, IPv4 or IPv6."""

    allow: list[str] = setting([], "exempt from the default block of private, link-local, CGNAT, "
                               "multicast and reserved ranges (e.g. a resolver on the "
                               "volunteer's LAN)")
    deny: list[str] = setting([], "always dropped, whatever allow says")


@dataclass(frozen=True)
class DirectoryConfig:
    """Registration with a relay directory (relay.serve.registration)."""

    url: str = setting("", "https://HOST[:PORT] of relay directory; empty = not listed anywhere")
    ca: str = setting("", "CA the directory's certificate must chain to (empty = the system "
                      "store)")
    cert: str = setting("", "client certificate whose subject CN is [server] id (required with "
                        "a url)")
    key: str = setting("", "its private key")
    operator: str = setting("", "shown in the public list (Operator column; at most 256 "
                            "printable characters)")
    message: str = setting("", "shown in the public list (Message column; at most 256 printable "
                           "characters)")
    address: str = setting("", "the address clients use (IP or host name); empty = the [server] "
                           "listen address, or this host's name when that is a wildcard")
    country: str = setting("", "ISO 3166-1 alpha-2 code shown in the list (e.g. JP)")
    country_name: str = setting("", "the country's name shown in the list")
    # VPN Gate's relays report every minute or so; the directory drops a relay after
    # its own window (default 3 beats).
    heartbeat: str = setting("60s", "heartbeat interval (with +-10% jitter)")


@dataclass(frozen=True)
class StoreConfig:
    """The collector's ClickHouse store (relay.central.store)."""

    url: str = setting("", "relay collector only (--config FILE, or --store-url): "
                           "http[s]://USER:PASSWORD@HOST:8123/ of a ClickHouse server; "
                           "empty = the embedded engine (chDB) in --data-dir/@store")
    cluster: str = setting("", "with url: the cluster (remote_servers name) the tables are "
                               "created ON CLUSTER, Replicated + Distributed "
                               "(--store-cluster); empty = one server, MergeTree")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    tap: TapConfig = field(default_factory=TapConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    openvpn: OpenVPNConfig = field(default_factory=OpenVPNConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    abuse: AbuseConfig = field(default_factory=AbuseConfig)
    egress: EgressConfig = field(default_factory=EgressConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    @property
    def data_dir(self) -> Path:
        return Path(self.logs.data_dir)

    @property
    def pin_root(self) -> Path:
        return Path(self.capture.bpffs) / "relay"

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_hostport(self.server.listen)

    @property
    def pool(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.tap.pool)

    def with_data_dir(self, data_dir: str | Path) -> Config:
        return replace(self, logs=replace(self.logs, data_dir=str(data_dir)))

    def with_listen(self, listen: str) -> Config:
        return replace(self, server=replace(self.server, listen=listen))

    def with_workers(self, workers: int) -> Config:
        return replace(self, server=replace(self.server, workers=workers))

    @property
    def worker_count(self) -> int:
        """How many datapath workers ``relay serve`` runs: [server] workers, or one
        per CPU this process may run on (its affinity, as a container or taskset
        gives it, not the machine's count)."""
        return self.server.workers or len(os.sched_getaffinity(0))


_SECTION_TYPES = {
    "server": ServerConfig,
    "tap": TapConfig,
    "logs": LogsConfig,
    "capture": CaptureConfig,
    "forward": ForwardConfig,
    "openvpn": OpenVPNConfig,
    "metrics": MetricsConfig,
    "abuse": AbuseConfig,
    "egress": EgressConfig,
    "directory": DirectoryConfig,
    "store": StoreConfig,
}


def _check_type(where: str, value: Any, default: Any) -> None:
    expected = type(default)
    if expected is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    elif expected is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
    elif expected is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif not isinstance(value, expected):
        raise ConfigError(f"{where}: expected a {expected.__name__}, got {value!r}")


def _validate(cfg: Config) -> None:
    def check(where: str, fn: Any, value: Any) -> None:
        try:
            fn(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    if not re.fullmatch(SERVER_ID_RULE, cfg.server.id):
        raise ConfigError(
            f"[server] id: use 1-64 letters, digits, '.', '_' or '-', got {cfg.server.id!r}"
        )
    check("[server] listen", parse_hostport, cfg.server.listen)
    check("[server] dpd", parse_duration, cfg.server.dpd)
    check("[server] keepalive", parse_duration, cfg.server.keepalive)
    check("[server] handshake_timeout", parse_duration, cfg.server.handshake_timeout)
    check("[server] login_timeout", parse_duration, cfg.server.login_timeout)
    for key in ("dpd", "keepalive", "handshake_timeout", "login_timeout"):
        # Zero would end every session or handshake at once (and spin the DPD timer).
        if parse_duration(getattr(cfg.server, key)) < 1:
            raise ConfigError(f"[server] {key}: at least 1s")
    check("[openvpn] listen", parse_hostport, cfg.openvpn.listen)
    if not 0 <= cfg.server.workers <= WORKERS_MAX:
        raise ConfigError(f"[server] workers: expected 0..{WORKERS_MAX} (0: one per CPU), "
                          f"got {cfg.server.workers}")
    if cfg.server.max_sessions <= 0:
        raise ConfigError(f"[server] max_sessions: must be positive, got {cfg.server.max_sessions}")
    if cfg.metrics.listen:
        check("[metrics] listen", parse_hostport, cfg.metrics.listen)
    if cfg.server.uplink and not re.fullmatch(r"[A-Za-z0-9._@-]{1,15}", cfg.server.uplink):
        raise ConfigError(f"[server] uplink: not an interface name: {cfg.server.uplink!r}")
    if bool(cfg.server.cert) != bool(cfg.server.key):
        raise ConfigError("[server] cert: cert and key must be given together (or neither)")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,15}", cfg.tap.name):
        raise ConfigError(f"[tap] name: not an interface name: {cfg.tap.name!r}")
    try:
        pool = ipaddress.IPv4Network(cfg.tap.pool)
    except ValueError as exc:
        raise ConfigError(f"[tap] pool: {exc}") from None
    if pool.prefixlen > 29:
        raise ConfigError(f"[tap] pool: {cfg.tap.pool} is too small (at most /29)")
    if not 576 <= cfg.tap.mtu <= 9000:
        raise ConfigError(f"[tap] mtu: expected 576..9000, got {cfg.tap.mtu}")
    for dns in cfg.tap.dns:
        check("[tap] dns", ipaddress.ip_address, dns)
    for key in ("allow", "deny"):
        for net in getattr(cfg.egress, key):
            check(f"[egress] {key}", ipaddress.ip_network, net)
    for net in cfg.egress.deny:
        for dns in cfg.tap.dns:
            if ipaddress.ip_address(dns) in ipaddress.ip_network(net):
                raise ConfigError(f"[egress] deny: {net} covers {dns}, a [tap] dns server "
                                  "clients are told to use")
    for key in ("packet_segment", "compress_after", "connlog_keep"):
        check(f"[logs] {key}", parse_duration, getattr(cfg.logs, key))
    if parse_duration(cfg.logs.packet_segment) < MIN_PACKET_SEGMENT_S:
        raise ConfigError(f"[logs] packet_segment: at least {MIN_PACKET_SEGMENT_S}s")
    if cfg.logs.delete_after:
        check("[logs] delete_after", parse_duration, cfg.logs.delete_after)
        if parse_duration(cfg.logs.delete_after) < 14 * 86400:
            raise ConfigError("[logs] delete_after: packet logs stay searchable at least 14d")
    if parse_duration(cfg.logs.connlog_keep) < 90 * 86400:
        raise ConfigError("[logs] connlog_keep: the connection log is kept at least 90d")
    if parse_duration(cfg.logs.compress_after) < 14 * 86400:
        raise ConfigError("[logs] compress_after: packet logs stay searchable at least 14d")
    for f in fields(AbuseConfig):
        value = getattr(cfg.abuse, f.name)
        if isinstance(value, str):
            check(f"[abuse] {f.name}", parse_duration, value)
        elif value <= 0:
            raise ConfigError(f"[abuse] {f.name}: must be positive, got {value}")
    for key in ("ban", "ban_max", "strike_window", "summary_interval"):
        if cfg.abuse.seconds(key) < 1:
            raise ConfigError(f"[abuse] {key}: at least 1s")
    if not IPV6_PREFIX_MIN <= cfg.abuse.ipv6_prefix <= 128:
        raise ConfigError(f"[abuse] ipv6_prefix: expected {IPV6_PREFIX_MIN}..128, "
                          f"got {cfg.abuse.ipv6_prefix}")
    check("[logs] connlog_compress_after", parse_duration, cfg.logs.connlog_compress_after)
    if parse_duration(cfg.logs.connlog_compress_after) < 86400:
        raise ConfigError("[logs] connlog_compress_after: at least 1d (today's file is live)")
    check("[forward] retry_max", parse_duration, cfg.forward.retry_max)
    check("[forward] facility", syslog5424.facility_code, cfg.forward.facility)
    if cfg.forward.collector:
        check("[forward] collector", parse_hostport, cfg.forward.collector)
        if not cfg.forward.ca:
            raise ConfigError("[forward] ca: the collector's certificate is verified against "
                              "this CA; it is required with a collector")
    if bool(cfg.forward.cert) != bool(cfg.forward.key):
        raise ConfigError("[forward] cert: cert and key must be given together (or neither)")
    _validate_directory(cfg.directory)


# Longest operator name and message a relay may publish: the directory keeps
# relay.clienttext's 256 characters of any text it did not write itself.
DIRECTORY_TEXT_MAX = 256


def parse_directory_url(text: str) -> tuple[str, int]:
    """``https://HOST[:PORT]`` (no path) -> (host, port); port 443 by default."""
    m = re.fullmatch(r"https://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(?::(\d{1,5}))?/?", text)
    if not m:
        raise ValueError(f"expected https://HOST[:PORT], got {text!r}")
    port = int(m.group(2) or 443)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return m.group(1).strip("[]"), port


def _validate_directory(d: DirectoryConfig) -> None:
    if not d.url:
        return
    try:
        parse_directory_url(d.url)
    except ValueError as exc:
        raise ConfigError(f"[directory] url: {exc}") from None
    try:
        heartbeat = parse_duration(d.heartbeat)
    except ValueError as exc:
        raise ConfigError(f"[directory] heartbeat: {exc}") from None
    if heartbeat < 1:
        raise ConfigError("[directory] heartbeat: at least 1s")
    if not (d.cert and d.key):
        raise ConfigError("[directory] cert: a client certificate (and key) whose subject CN "
                          "is [server] id is required with a directory url")
    if d.address and not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", d.address):
        raise ConfigError(f"[directory] address: not an IP address or host name: {d.address!r}")
    if d.country and not re.fullmatch(r"[A-Z]{2}", d.country):
        raise ConfigError(f"[directory] country: expected an ISO 3166 code like JP, "
                          f"got {d.country!r}")
    for key in ("operator", "message", "country_name"):
        value = getattr(d, key)
        if len(value) > DIRECTORY_TEXT_MAX or not value.isprintable():
            raise ConfigError(f"[directory] {key}: at most {DIRECTORY_TEXT_MAX} printable "
                              "characters")


def from_dict(data: dict[str, Any]) -> Config:
    sections: dict[str, Any] = {}
    for name, body in data.items():
        cls = _SECTION_TYPES.get(name)
        if cls is None:
            raise ConfigError(f"[{name}]: unknown section (known: {', '.join(_SECTION_TYPES)})")
        if not isinstance(body, dict):
            raise ConfigError(f"[{name}]: expected a table")
        defaults = cls()
        known = {f.name for f in fields(cls)}
        for key, value in body.items():
            if key not in known:
                choices = ", ".join(sorted(known))
                raise ConfigError(f"[{name}] {key}: unknown key (known: {choices})")
            _check_type(f"[{name}] {key}", value, getattr(defaults, key))
        sections[name] = cls(**{k: float(v) if isinstance(getattr(defaults, k), float) else v
                                for k, v in body.items()})
    cfg = Config(**sections)
    _validate(cfg)
    return cfg


def load(path: str | Path | None) -> Config:
    if path is None:
        cfg = Config()
        _validate(cfg)
        return cfg
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    return from_text(data, str(path))


def from_text(data: bytes, name: str) -> Config:
    """The config in the TOML bytes ``data`` (of the file ``name``, for errors)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text (byte {exc.start}): TOML files are "
                          "UTF-8") from None
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML: {exc}") from None
    return from_dict(parsed)


def sections() -> list[tuple[str, type, str]]:
    """(name, dataclass, what it is for) of every section, in order."""
    return [(name, cls, " ".join((cls.__doc__ or "").split()))
            for name, cls in _SECTION_TYPES.items()]


def keys(cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, documentation) of every key of a section's dataclass."""
    defaults = cls()
    return [(f.name, getattr(defaults, f.name), f.metadata.get("doc", ""))
            for f in fields(cls)]


def toml_value(value: Any) -> str:
    """A value as TOML writes it (a JSON string is a TOML basic string)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


# Width of the example's comment lines.
EXAMPLE_WIDTH = 88


def example(values: dict[str, dict[str, Any]] | None = None) -> str:
    """A config file with every key and what it does: the keys of ``values``
    (section -> key -> value) set, every other one commented out at its default,
    so that the file follows the defaults of later versions. ``relay config
    example`` prints it with no values; the demo writes its config with some."""
    values = values or {}
    from_dict(values)  # a value that would be refused is refused here
    lines = ["# relay.toml: the configuration of relay serve (relay.toml(5)).",
             "# Every key is here with what it does, commented out at its default:",
             "# uncomment and change what you need. Durations are written 30s, 5m, 1h",
             "# or 14d. relay config check FILE checks a file as relay serve would."]
    for name, cls, about in sections():
        lines += ["", f"[{name}]", *textwrap.wrap(about, EXAMPLE_WIDTH - 2,
                                                   initial_indent="# ",
                                                   subsequent_indent="# ")]
        given = values.get(name, {})
        for key_name, default, doc in keys(cls):
            lines += ["", *textwrap.wrap(doc, EXAMPLE_WIDTH - 2, initial_indent="# ",
                                         subsequent_indent="# ")]
            if key_name in given:
                lines.append(f"{key_name} = {toml_value(given[key_name])}")
            else:
                lines.append(f"#{key_name} = {toml_value(default)}")
    return "\n".join(lines) + "\n"


def changed_keys(cfg: Config) -> list[str]:
    """The keys of ``cfg`` that differ from their defaults, as ``[section] key``."""
    default = Config()
    return [f"[{name}] {f.name}" for name in _SECTION_TYPES for f in fields(_SECTION_TYPES[name])
            if getattr(getattr(cfg, name), f.name) != getattr(getattr(default, name), f.name)]


def describe() -> str:
    """Every key with its default, as TOML, for ``relay serve --help``."""
    lines = []
    for name, cls, _ in sections():
        lines.append(f"[{name}]")
        lines += [f"  {key_name} = {toml_value(default)}" for key_name, default, _ in keys(cls)]
    return "\n".join(lines)
