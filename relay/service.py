"""The systemd unit for running the relay unattended, with the least privilege
that works.

The relay needs: CAP_NET_ADMIN (TAP device, rtnetlink, tc, nftables),
CAP_BPF and CAP_PERFMON (loading the tc programs, the ring buffer), CAP_SYS_ADMIN
(pinning in bpffs, and bcc on kernels that still ask for it),
CAP_NET_BIND_SERVICE (port 443). Everything else is dropped from the bounding set;
the file system is read-only but for the data directory and bpffs; /proc/sys/net
stays writable for ip_forward and the TAP's disable_ipv6. ``LimitNOFILE`` fits the
caps (:func:`nofile_needed`), which ``relay doctor`` checks too.
"""

from __future__ import annotations

import resource
import shutil
import sys
from pathlib import Path

from relay.config import Config

UNIT_NAME = "relay.service"
UNIT_DIR = Path("/etc/systemd/system")
CAPABILITIES = "CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_BPF CAP_PERFMON CAP_SYS_ADMIN"
# Descriptors besides one per session and one per handshake in progress. An idle
# relay holds about 40 (measured: the TAP device, netlink sockets, BPF maps and
# ring buffer, the three listeners, control and metrics servers, log files,
# uvloop's epoll, eventfd and signal pipe); the rest covers reverse lookups in
# flight (relay.serve.rdns.MAX_PENDING_LOOKUPS), control and metrics clients, the
# forwarder's connection and packet-log rotation and retention.
FD_RESERVE = 256


def nofile_needed(cfg: Config) -> int:
    """Open files the relay needs at its caps: a socket per session
    (``[server] max_sessions``) and per handshake (``[abuse] handshakes_total``),
    plus :data:`FD_RESERVE`. The unit's ``LimitNOFILE``, what ``relay serve``
    raises its soft limit to, and what ``relay doctor`` checks."""
    return cfg.server.max_sessions + cfg.abuse.handshakes_total + FD_RESERVE


def raise_nofile(need: int) -> str | None:
    """Raise this process's soft open-files limit to ``need`` where the hard
    limit allows (as Go programs do at start); the problem, or None."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need and (hard == resource.RLIM_INFINITY or hard > soft):
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < need:
        return (f"open-files limit {soft} is under the {need} the caps need "
                "([server] max_sessions + [abuse] handshakes_total + reserve): "
                f"past it connections fail; set LimitNOFILE={need} (relay "
                f"install-service writes it) or ulimit -n {need}")
    return None


def unit(config: Path, data_dir: Path, bpffs: Path, nofile: int) -> str:
    relay = Path(sys.executable).with_name("relay")
    return f"""[Unit]
Description=relay: packet-logging VPN relay
Documentation=file://{Path(__file__).resolve().parent.parent / "README.md"}
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
ExecStart={relay} serve --config {config}
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM: every session gets its disconnect record, then the TAP device, tc
# filters, pins, neighbours and the nftables table are removed.
KillSignal=SIGTERM
TimeoutStopSec=60
Restart=on-failure
RestartSec=5s
# A socket per session and per handshake at the configured caps, plus a reserve
# (relay doctor checks the same figure).
LimitNOFILE={nofile}
# Logs go to the journal through stderr.
StandardOutput=journal
StandardError=journal

CapabilityBoundingSet={CAPABILITIES}
AmbientCapabilities={CAPABILITIES}
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={data_dir} {bpffs} /proc/sys/net
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def install(config: Path, cfg: Config, output: Path | None) -> Path:
    """Write the unit for ``cfg`` read from ``config`` (to ``output``, or
    /etc/systemd/system/relay.service)."""
    path = output or UNIT_DIR / UNIT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit(config, cfg.data_dir.resolve(), Path(cfg.capture.bpffs),
                         nofile_needed(cfg)))
    return path


def systemctl_available() -> bool:
    return shutil.which("systemctl") is not None
