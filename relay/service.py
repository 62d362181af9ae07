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

import re
import shutil
import subprocess
import sys
from pathlib import Path

from relay.config import Config
from relay.errors import RelayError
from relay.fdlimit import nofile_needed

UNIT_NAME = "relay.service"
UNIT_DIR = Path("/etc/systemd/system")
CAPABILITIES = "CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_BPF CAP_PERFMON CAP_SYS_ADMIN"
def _word(arg: object) -> str:
    """One command-line word of ExecStart (systemd.service(5) "Command lines"):
    quoted when it holds more than plain path characters, and ``%`` doubled."""
    text = str(arg).replace("%", "%%")
    if re.fullmatch(r"[A-Za-z0-9_./@:+=%-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit(config: Path, data_dir: Path, bpffs: Path, nofile: int,
         data_dir_arg: Path | None = None) -> str:
    """The unit text; ``data_dir_arg`` is passed to relay serve as --data-dir
    (install-service --data-dir), over the config's [logs] data_dir."""
    relay = Path(sys.executable).with_name("relay")
    command = [relay, "serve", "--config", config]
    if data_dir_arg is not None:
        command += ["--data-dir", data_dir_arg]
    return f"""[Unit]
Description=relay: packet-logging VPN relay
Documentation=file://{Path(__file__).resolve().parent.parent / "README.md"}
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
ExecStart={" ".join(_word(a) for a in command)}
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
ReadWritePaths={_word(data_dir)} {_word(bpffs)} /proc/sys/net
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


def install(config: Path, cfg: Config, output: Path | None,
            data_dir: Path | None = None) -> Path:
    """Write the unit for ``cfg`` read from ``config`` (to ``output``, or
    /etc/systemd/system/relay.service); ``data_dir`` as relay serve's --data-dir
    when given (``cfg`` has it already)."""
    path = output or UNIT_DIR / UNIT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit(config, cfg.data_dir.resolve(), Path(cfg.capture.bpffs),
                         nofile_needed(cfg), data_dir))
    return path


def uninstall(output: Path | None) -> list[str]:
    """Stop, disable and remove the unit (``output``: only remove that file); the
    data directory, with its logs, stays. What was done, a line each."""
    path = output or UNIT_DIR / UNIT_NAME
    done = []
    if output is None and systemctl_available() and path.exists():
        # SIGTERM: every session gets its disconnect record before the relay goes.
        proc = subprocess.run(["systemctl", "disable", "--now", UNIT_NAME],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RelayError(f"systemctl disable --now {UNIT_NAME} failed: "
                             f"{proc.stderr.strip() or proc.returncode}")
        done.append(f"stopped and disabled {UNIT_NAME}")
    try:
        path.unlink()
        done.append(f"removed {path}")
    except FileNotFoundError:
        done.append(f"no unit at {path}")
    except OSError as exc:
        raise RelayError(f"{path}: cannot remove: {exc.strerror}") from None
    if output is None and systemctl_available():
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True, check=False)
        done.append("ran systemctl daemon-reload")
    done.append("the data directory and its logs stay; remove them yourself when the "
                "retention you promised is over")
    return done


def systemctl_available() -> bool:
    return shutil.which("systemctl") is not None
