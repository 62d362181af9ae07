"""Configuration: TOML with an embedded default for every key.

``load(path)`` returns a :class:`Config`; any problem raises :class:`ConfigError`
whose message names the offending key (``[server] listen: ...``), which the CLI
prints as one line. Unknown sections and keys are errors too: a typo must not
silently leave a default in force on a relay that logs for abuse handling.
"""

from __future__ import annotations

import ipaddress
import re
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


class ConfigError(RelayError):
    pass


_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``"90s"``, ``"5m"``, ``"1h"``, ``"14d"`` -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration like 30s, 5m, 1h or 14d, got {text!r}")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def parse_duration_arg(text: str) -> int:
    """A duration given on the command line: ConfigError (one line) when bad."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


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


@dataclass(frozen=True)
class ServerConfig:
    id: str = "relay-1"
    listen: str = "0.0.0.0:443"
    uplink: str = ""
    cert: str = ""
    key: str = ""
    # Seconds between dead-peer-detection probes announced to clients
    # (X-CSTP-DPD). Cisco ASA's default client DPD interval is 30 s.
    dpd: str = "30s"
    # Seconds between keepalives announced to clients (X-CSTP-Keepalive); ASA
    # uses 20 s so that NAT boxes on the path keep the TCP mapping open.
    keepalive: str = "20s"
    # TLS handshake deadline; nginx's ssl_handshake_timeout default is 60 s, a VPN
    # client on a working path finishes in well under a second, so 15 s is generous
    # and frees the slot of a stalled (slowloris) client sooner.
    handshake_timeout: str = "15s"
    # From TCP accept to an open tunnel: openconnect needs three round trips after
    # the handshake; a minute also covers a human typing a password.
    login_timeout: str = "60s"
    # Optional user list: a file of `name:password` lines. Empty = anonymous,
    # any user name and password accepted, as a public relay does.
    users: str = ""
    # Sessions open at once, all protocols; past this (or with the address pool
    # used up) a new one is refused with the reason (CSTP 503, OpenVPN
    # AUTH_FAILED,TEMP). 4x OpenVPN's max-clients default (1024): a 2-core relay
    # forwards ~800 Mbit/s (bench/), ~200 kbit/s each for 4096 busy sessions, the
    # least that keeps browsing usable. It sizes the open-files limit too
    # (relay.fdlimit.nofile_needed).
    max_sessions: int = 4096


@dataclass(frozen=True)
class TapConfig:
    name: str = "relay0"
    pool: str = "10.211.0.0/16"
    # 1400 leaves room for TLS + TCP + IP over a 1500-byte path, as ocserv's default.
    mtu: int = 1400
    dns: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LogsConfig:
    data_dir: str = str(DEFAULT_DATA_DIR)
    packet_segment: str = "1h"
    compress_after: str = "14d"
    delete_after: str = ""
    connlog_keep: str = "90d"
    # Connection-log days older than this are recompressed to .jsonl.zst.
    connlog_compress_after: str = "1d"


@dataclass(frozen=True)
class CaptureConfig:
    # The bpffs where the capture programs and maps are pinned (under relay/<dev>/)
    # for `relay logging`. Where none is mounted there (as under `ip netns exec`,
    # which remounts /sys), the relay mounts one of its own; `relay logging` reaches
    # it through /proc/PID/root, so the default works in namespaces too.
    bpffs: str = "/sys/fs/bpf"


@dataclass(frozen=True)
class ForwardConfig:
    # RFC 5425 shipping of the connection log; empty = local only.
    collector: str = ""
    ca: str = ""
    cert: str = ""
    key: str = ""
    # Syslog facility of the messages (local0..local7 or authpriv).
    facility: str = "local0"
    # Longest wait between reconnection attempts (exponential back-off with jitter).
    retry_max: str = "60s"


@dataclass(frozen=True)
class MetricsConfig:
    # Prometheus text format at http://listen/metrics. Loopback: the counters
    # describe users' traffic and are nobody else's business. Empty = off.
    listen: str = "127.0.0.1:9810"


@dataclass(frozen=True)
class OpenVPNConfig:
    listen: str = "0.0.0.0:1194"
    # tls-crypt: every control packet under a static key that client configs carry
    # (DATA_DIR/tls/tls-crypt.key, made on first use); peers without it get no answer.
    tls_crypt: bool = False


@dataclass(frozen=True)
class AbuseConfig:
    """Listener defences (relay.serve.abuse): every threshold of the ``[abuse]`` table."""

    # Per source: 5 new connections/s sustained, bursts of 20. An openconnect
    # client makes 1-2 connections per session and reconnects at most every 10 s.
    rate_per_ip: float = 5.0
    burst_per_ip: int = 20
    # Overall: what one relay on 2 cores handshakes comfortably (TLS 1.3 ECDHE
    # costs ~1 ms of CPU), leaving CPU for forwarding.
    rate_total: float = 200.0
    burst_total: int = 400
    # Handshakes in progress. Per IP 16 leaves room for a CGNAT'd neighbourhood;
    # the total bounds memory and CPU held by stalled (slowloris) clients.
    handshakes_per_ip: int = 16
    handshakes_total: int = 512
    # Concurrent sessions from one address (households and CGNAT share one).
    sessions_per_ip: int = 32
    # Strikes (see the module docstring).
    short_session: str = "10s"
    strikes: int = 20
    strike_window: str = "60s"
    # First ban 10 min, doubled per repeat offence, at most a day (fail2ban's
    # bantime default is 10 min; its recidive jail bans for a day).
    ban: str = "10m"
    ban_max: str = "1d"
    # How often refusals are summarised into the audit log.
    summary_interval: str = "60s"
    # Limits and bans hold an IPv6 source to this prefix: one subscriber's LAN
    # is a /64 (RFC 6177, RFC 7421), which fail2ban-style tools and Cloudflare
    # key IPv6 rate limits on. Between IPV6_PREFIX_MIN and 128 (one address).
    ipv6_prefix: int = 64

    def seconds(self, key: str) -> float:
        return float(parse_duration(getattr(self, key)))


# The widest [abuse] ipv6_prefix: ISPs assign at most a /32 to anyone but another
# registry (RIPE-690), so a wider key would lump unrelated networks together.
IPV6_PREFIX_MIN = 32


@dataclass(frozen=True)
class EgressConfig:
    """Adjustments to the egress policy's default block (relay.serve.egress): lists of
    networks (CIDR) or addresses, IPv4 or IPv6."""

    # Exempt from the default block: e.g. a resolver or proxy on the volunteer's LAN.
    allow: list[str] = field(default_factory=list)
    # Always dropped, whatever allow says.
    deny: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DirectoryConfig:
    """Registration with a relay directory (relay.serve.registration)."""

    # https://HOST[:PORT] of `relay directory`; empty = not listed anywhere.
    url: str = ""
    # CA the directory's certificate must chain to (empty = the system store).
    ca: str = ""
    # Client certificate whose subject CN is [server] id (as for the collector).
    cert: str = ""
    key: str = ""
    # Shown in the public list (Operator and Message columns).
    operator: str = ""
    message: str = ""
    # The address clients use (IP or host name); empty = the [server] listen
    # address, or this host's name when that is a wildcard.
    address: str = ""
    # ISO 3166-1 alpha-2 code and name shown in the list (CountryShort/Long).
    country: str = ""
    country_name: str = ""
    # Heartbeat interval (with +-10% jitter). VPN Gate's relays report every
    # minute or so; the directory drops a relay after its own window (default 3).
    heartbeat: str = "60s"


@dataclass(frozen=True)
class StoreConfig:
    """The collector's ClickHouse store (relay.central.store)."""

    # http(s)://USER:PASSWORD@HOST:8123/ of a ClickHouse server; empty = the
    # embedded engine (chDB) in the collector's --data-dir.
    url: str = ""
    # With url: the cluster (remote_servers name) the tables are created ON
    # CLUSTER, Replicated and Distributed; empty = one server, MergeTree.
    cluster: str = ""


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
    check("[openvpn] listen", parse_hostport, cfg.openvpn.listen)
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
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(data)


def describe() -> str:
    """Every key with its default, as TOML, for ``--help`` and the README."""
    lines = []
    cfg = Config()
    for name in _SECTION_TYPES:
        lines.append(f"[{name}]")
        section = getattr(cfg, name)
        for f in fields(section):
            value = getattr(section, f.name)
            if isinstance(value, bool):
                rendered = str(value).lower()
            elif isinstance(value, list):
                rendered = str(value)
            else:
                rendered = repr(value).replace("'", '"')
            lines.append(f"  {f.name} = {rendered}")
    return "\n".join(lines)
