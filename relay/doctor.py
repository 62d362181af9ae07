"""``relay doctor``: what the relay needs from this host, checked for real.

Each check does the thing the relay will do (open a TAP device, add a clsact
qdisc, create a BPF ring buffer, compile with bcc, bind the ports, write the data
directory) and reports pass, warn or FAIL with the fix. The exit status is
non-zero when a required check fails.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import resource
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay import control
from relay.config import Config, parse_hostport
from relay.errors import RelayError
from relay.fdlimit import nofile_needed
from relay.packetlog.retention import MIN_FREE_BYTES, REFUSE_FREE_BYTES
from relay.serve import nat
from relay.serve.egress import Policy, describe

# Capability bits (linux/capability.h) the relay uses.
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39
CAP_PERFMON = 38
# A clock before this is certainly wrong (the relay did not exist): records
# would carry impossible times.
EARLIEST_SANE_TIME = 1767225600  # 2026-01-01T00:00:00Z
COLLECTOR_TIMEOUT_S = 5.0
PROBE_DEV = "relaydoctor0"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
TINY_PROGRAM = """
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
int probe(struct __sk_buff *skb) { return TC_ACT_OK; }
"""


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "FAIL"
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "FAIL", detail, fix)


def check_privileges() -> Check:
    name = "root or capabilities"
    if os.geteuid() == 0:
        return _ok(name, "running as root")
    caps = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            caps = int(line.split()[1], 16)
    need = {"CAP_NET_ADMIN": CAP_NET_ADMIN, "CAP_BPF": CAP_BPF, "CAP_PERFMON": CAP_PERFMON}
    missing = [n for n, bit in need.items() if not caps >> bit & 1]
    if caps >> CAP_SYS_ADMIN & 1:
        missing = [n for n in missing if n == "CAP_NET_ADMIN"]
    if missing:
        return _fail(name, f"missing {', '.join(missing)}",
                     "run as root, or with AmbientCapabilities=CAP_NET_ADMIN CAP_BPF "
                     "CAP_PERFMON CAP_SYS_ADMIN (see the systemd unit)")
    return _ok(name, "the needed capabilities are effective")


def check_bpf_ringbuf() -> Check:
    name = "BPF syscall and ring buffer"
    from relay.cext import ffi, lib

    fd = lib.relay_bpf_ringbuf_create(4096)
    if fd < 0:
        err = ffi.errno
        return _fail(name, f"bpf(BPF_MAP_CREATE ringbuf): {os.strerror(err)}",
                     "a kernel >= 5.8 with CONFIG_BPF_SYSCALL; run as root (or CAP_BPF); "
                     "check kernel.unprivileged_bpf_disabled does not apply")
    os.close(fd)
    return _ok(name, "a BPF ring buffer map was created")


def check_tun_and_clsact() -> list[Check]:
    """Open a TAP device and put a clsact qdisc on it, as relay serve does."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return [_fail("TUN/TAP", f"/dev/net/tun: {exc.strerror}",
                      "load the tun module (modprobe tun) or enable CONFIG_TUN; in a "
                      "container, pass the device (--device /dev/net/tun)"),
                Check("tc clsact", "FAIL", "not checked: no TAP device", "fix TUN/TAP first")]
    try:
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", PROBE_DEV.encode(),
                                                   IFF_TAP | IFF_NO_PI))
        except OSError as exc:
            return [_fail("TUN/TAP", f"TUNSETIFF: {exc.strerror}",
                          "run as root (CAP_NET_ADMIN)"),
                    Check("tc clsact", "FAIL", "not checked: no TAP device", "fix TUN/TAP")]
        tun = _ok("TUN/TAP", "a TAP device was created")
        try:
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=PROBE_DEV)[0]
                ipr.tc("add", "clsact", index)
        except NetlinkError as exc:
            return [tun, _fail("tc clsact", f"adding a clsact qdisc: {exc}",
                               "a kernel with CONFIG_NET_SCH_INGRESS and CONFIG_NET_CLS_BPF "
                               "(modprobe sch_ingress cls_bpf)")]
        return [tun, _ok("tc clsact", "a clsact qdisc was added to a TAP device")]
    finally:
        os.close(fd)  # the probe device goes with it


def check_bcc(modules_dir: Path = Path("/lib/modules")) -> Check:
    name = "bcc and kernel headers"
    build = modules_dir / platform.release() / "build"
    fix = ("apt-get install linux-headers-$(uname -r); where no package exists for the "
           "running kernel, ./run.sh setup links Debian's linux-headers-amd64 tree as "
           f"{build} (the documented fallback)")
    if not build.exists():
        return _fail(name, f"no kernel headers at {build}", fix)
    try:
        from bcc import BPF
    except ImportError:
        return _fail(name, "python3 cannot import bcc",
                     "apt-get install python3-bpfcc, and use a venv made with "
                     "--system-site-packages (./run.sh setup does)")
    try:
        bpf = BPF(text=TINY_PROGRAM)
        bpf.load_func(b"probe", BPF.SCHED_CLS)
        bpf.cleanup()
    except Exception as exc:  # bcc raises plain Exception on compile errors
        return _fail(name, f"bcc could not compile a tc program: {exc}", fix)
    target = os.path.realpath(build)
    note = "" if platform.release() in target else f" (fallback: build -> {target})"
    return Check(name, "warn" if note else "ok", f"compiled and loaded a tc program{note}",
                 "install the headers of the running kernel when available" if note else "")


def check_nftables() -> Check:
    name = "nftables"
    if shutil.which("nft") is None:
        return _fail(name, "nft not found", "apt-get install nftables")
    proc = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    if proc.returncode != 0:
        return _fail(name, f"nft list tables: {proc.stderr.strip()}",
                     "a kernel with CONFIG_NF_TABLES; run as root")
    return _ok(name, "nft works")


def check_egress(cfg: Config) -> Check:
    """The policy in force for this config, and whether the kernel takes its table
    (``nft -c``: checked, nothing installed)."""
    name = "egress policy"
    policy = Policy.from_config(cfg)
    rules = "\n".join(describe(policy))
    try:
        nat.check(policy, cfg.server.uplink)
    except RelayError as exc:
        return _fail(name, f"{exc}\n{rules}",
                     "a kernel with nf_tables, its inet family, fib and nat expressions "
                     "(CONFIG_NFT_FIB_INET, CONFIG_NFT_NAT); run as root")
    return _ok(name, f"nft accepts the relay's table (check mode)\n{rules}")


def check_ports(cfg: Config) -> list[Check]:
    running = _relay_running(cfg)
    wanted = [("CSTP listener", cfg.server.listen, socket.SOCK_STREAM),
              ("OpenVPN TCP", cfg.openvpn.listen, socket.SOCK_STREAM),
              ("OpenVPN UDP", cfg.openvpn.listen, socket.SOCK_DGRAM)]
    if cfg.server.dtls:
        wanted.append(("CSTP's DTLS", cfg.server.listen, socket.SOCK_DGRAM))
    if cfg.metrics.listen:
        wanted.append(("metrics", cfg.metrics.listen, socket.SOCK_STREAM))
    out = []
    for what, hostport, kind in wanted:
        name = f"port {hostport}{'/udp' if kind == socket.SOCK_DGRAM else ''} ({what})"
        host, port = parse_hostport(hostport)
        if running:
            out.append(_ok(name, "in use by the relay running on this data directory"))
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                out.append(_ok(name, "free"))
            except OSError as exc:
                holder = _port_holder(port, kind)
                out.append(_fail(name, f"cannot bind: {exc.strerror}{holder}",
                                 "stop what holds it, or change the port in the config"))
    return out


def _relay_running(cfg: Config) -> bool:
    try:
        control.request(cfg.data_dir, {"cmd": "ban-list"}, timeout=2)
    except (RelayError, OSError):
        return False
    return True


def _port_holder(port: int, kind: int) -> str:
    flags = "-Hlunp" if kind == socket.SOCK_DGRAM else "-Hltnp"
    proc = subprocess.run(["ss", flags, f"sport = :{port}"], capture_output=True, text=True)
    users = proc.stdout.strip().split("users:")
    return f" (held by {users[1].strip()})" if len(users) > 1 else ""


def check_data_dir(cfg: Config) -> list[Check]:
    d = cfg.data_dir
    name = f"data directory {d}"
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".doctor-") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        hint = " (read-only file system)" if exc.errno == errno.EROFS else ""
        return [_fail(name, f"cannot write: {exc.strerror}{hint}",
                      f"make {d} a writable directory owned by the relay's user, or set "
                      "[logs] data_dir / --data-dir elsewhere")]
    checks = []
    mode = d.stat().st_mode & 0o777
    if mode & 0o007:
        checks.append(_fail(name, f"mode {mode:o}: readable by other users",
                            f"chmod 700 {d} (logs name users' addresses)"))
    else:
        checks.append(_ok(name, f"writable, mode {mode:o}"))
    free = shutil.disk_usage(d).free
    gib = free / (1 << 30)
    if free < REFUSE_FREE_BYTES:
        checks.append(_fail("free space", f"{gib:.2f} GiB free: the relay would refuse "
                            "sessions rather than run unlogged",
                            "free space or move the data directory"))
    elif free < MIN_FREE_BYTES:
        checks.append(Check("free space", "warn", f"{gib:.2f} GiB free: the disk guard will "
                            "delete old archives", "free space or move the data directory"))
    else:
        checks.append(_ok("free space", f"{gib:.1f} GiB free"))
    return checks


def check_clock() -> Check:
    now = time.time()
    if now < EARLIEST_SANE_TIME:
        return _fail("clock", f"the system time {time.ctime(now)} is in the past",
                     "set the clock (NTP: apt-get install systemd-timesyncd or chrony)")
    synced = Path("/run/systemd/timesync/synchronized").exists()
    return Check("clock", "ok" if synced else "warn",
                 f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))}"
                 + ("" if synced else ", NTP synchronisation not confirmed"),
                 "" if synced else "records need a true clock: run an NTP client")


def check_nofile(cfg: Config) -> Check:
    """The open-files limit a relay started from here gets: ``relay serve``
    raises its soft limit up to the hard one, so the hard limit must fit the caps."""
    name = "open-files limit"
    need = nofile_needed(cfg)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        return _fail(name, f"hard limit {hard}, under the {need} the caps need "
                     f"([server] max_sessions {cfg.server.max_sessions} + [abuse] "
                     f"handshakes_total {cfg.abuse.handshakes_total} + reserve)",
                     f"LimitNOFILE={need} in the unit (relay install-service writes it), or "
                     f"ulimit -n {need} before relay serve; or lower [server] max_sessions")
    raised = "" if soft >= need else f" (soft {soft}: relay serve raises it)"
    return _ok(name, f"{need} needed, hard limit "
               f"{'unlimited' if hard == resource.RLIM_INFINITY else hard}{raised}")


def check_collector(cfg: Config) -> Check:
    name = "collector"
    if not cfg.forward.collector:
        return Check(name, "ok", "none configured: the connection log stays local")
    host, port = parse_hostport(cfg.forward.collector)
    try:
        ctx = ssl.create_default_context(cafile=cfg.forward.ca or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cfg.forward.cert:
            ctx.load_cert_chain(cfg.forward.cert, cfg.forward.key or None)
        with socket.create_connection((host, port), timeout=COLLECTOR_TIMEOUT_S) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            version = tls.version()
    except (OSError, ssl.SSLError) as exc:
        return _fail(name, f"{host}:{port}: {exc}",
                     "check [forward] collector, ca, cert and key, and that the collector "
                     "runs and is reachable (records wait in the local log meanwhile)")
    return _ok(name, f"{host}:{port} reachable, {version}, certificate verified")


def check_directory(cfg: Config) -> Check:
    """The registration's last outcome (relay.serve.registration's status file)."""
    from relay.serve.registration import read_status

    name = "directory"
    if not cfg.directory.url:
        return _ok(name, "none configured: this relay is not listed")
    status = read_status(cfg.data_dir)
    if status is None or status.get("url") != cfg.directory.url:
        return Check(name, "warn", f"{cfg.directory.url}: no heartbeat sent yet",
                     "start relay serve; it registers once it listens")
    if status.get("listed"):
        return _ok(name, f"{cfg.directory.url}: listed as {status.get('id')}, last heartbeat "
                         f"{status.get('last_success')}")
    return _fail(name, f"{cfg.directory.url}: not listed: {status.get('last_error')}",
                 "check [directory] url, ca, cert and key (the certificate's CN must be "
                 "[server] id), and that the directory runs and is reachable")


def run_checks(cfg: Config) -> list[Check]:
    checks: list[Check] = [check_privileges()]
    steps: list[Callable[[], Check | list[Check]]] = [
        check_bpf_ringbuf, check_tun_and_clsact, check_bcc, check_nftables,
        lambda: check_egress(cfg), lambda: check_ports(cfg), lambda: check_data_dir(cfg),
        lambda: check_nofile(cfg), check_clock, lambda: check_collector(cfg),
        lambda: check_directory(cfg)]
    for step in steps:
        try:
            result = step()
        except Exception as exc:  # a check that cannot even run is a failure to report
            result = _fail(getattr(step, "__name__", "check"), f"check crashed: {exc}",
                           "report this")
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        first, *more = c.detail.splitlines() or [""]
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {first}")
        lines += [f"{'':<4}  {'':<{width}}    {line}" for line in more]
        if c.fix and c.status != "ok":
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    return "\n".join(lines)
