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

import shutil
import sys
from pathlib import Path

from relay.config import Config
from relay.fdlimit import nofile_needed

UNIT_NAME = "relay.service"
UNIT_DIR = Path("/etc/systemd/system")
CAPABILITIES = "CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_BPF CAP_PERFMON CAP_SYS_ADMIN"
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
