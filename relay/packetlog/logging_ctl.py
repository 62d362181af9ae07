"""``relay logging on|off|status [--dev relay0]``: the capture switched from a
separate process, through rtnetlink and the BPF objects ``relay serve`` pinned.

``off`` removes the two tc filters; ``on`` puts them back with the pinned
programs (the same maps, so records resume into the running relay's ring and
session map); ``status`` says whether both filters are there and reads the pinned
per-CPU counters twice to give records/s. The running relay notices either change
through its netlink watcher and audits it.

The pins are opened through ``/proc/PID/root`` of the running relay
(:func:`relay_pins`): that is the relay's own view of the file system, so the
bpffs it mounted in its own mount namespace (``ip netns exec`` gives every
command one) is reached from any other, and on a plain host it is the same
/sys/fs/bpf.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from relay import control
from relay.packetlog import segments, tcfilter

# status samples the counters over this long to give a rate: one second is what
# an operator expects "records/s" to mean.
RATE_SAMPLE_SECONDS = 1.0


def relay_pid(data_dir: str | os.PathLike[str]) -> int:
    """The pid of the relay serving ``data_dir``: the peer credentials of its
    control socket (SO_PEERCRED names the process that listens). The connection
    carries no request; the relay answers it as an empty one and closes it."""
    path = Path(data_dir) / control.SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise control.NotRunning(f"no relay is running on {data_dir} ({path}): "
                                     "start relay serve first") from None
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", creds)[0]
    return pid


def relay_pins(data_dir: str | os.PathLike[str], dev: str,
               pin_root: Path = tcfilter.PIN_ROOT) -> Path:
    """Where the relay serving ``data_dir`` pinned the capture of ``dev``, as this
    process reaches it: under /proc/PID/root, the relay's own mount namespace."""
    root = Path(f"/proc/{relay_pid(data_dir)}/root")
    return tcfilter.pin_dir(dev, root / pin_root.relative_to(pin_root.anchor))


def logging_on(dev: str, pins: Path, *, netns: str | None = None) -> None:
    """Attach the programs pinned in ``pins`` (see :func:`relay_pins`)."""
    fd_in = tcfilter.obj_get(pins / tcfilter.PROG_IN)
    try:
        fd_out = tcfilter.obj_get(pins / tcfilter.PROG_OUT)
        try:
            with tcfilter.iproute(netns) as ipr:
                tcfilter.attach(ipr, dev, fd_in, fd_out)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def logging_off(dev: str, *, netns: str | None = None) -> None:
    with tcfilter.iproute(netns) as ipr:
        tcfilter.detach(ipr, dev)


@dataclass
class Status:
    dev: str
    attached: bool
    ingress: bool
    egress: bool
    records: int | None
    records_per_s: float | None
    drops: int | None
    drops_per_cpu: list[int] | None
    disk_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def logging_status(dev: str, pins: Path | None, *, netns: str | None = None,
                   data_dir: str | os.PathLike[str] | None = None,
                   sample_seconds: float = RATE_SAMPLE_SECONDS) -> Status:
    """Attached or not, records/s and drops (when ``pins`` holds the relay's
    counters), and the packet log's disk use (when data_dir is given)."""
    with tcfilter.iproute(netns) as ipr:
        ingress, egress = tcfilter.attached_state(ipr, dev)
    records = rate = drops = per_cpu = None
    counters = pins / tcfilter.MAP_COUNTERS if pins is not None else None
    if counters is not None and counters.exists():
        fd = tcfilter.obj_get(counters)
        try:
            first = tcfilter.read_counters(fd)
            t0 = time.monotonic()
            time.sleep(sample_seconds)
            last = tcfilter.read_counters(fd)
            elapsed = time.monotonic() - t0
        finally:
            os.close(fd)
        records = sum(last.records)
        rate = (records - sum(first.records)) / elapsed
        drops = sum(last.drops)
        per_cpu = last.drops
    disk = segments.disk_use(data_dir) if data_dir is not None else None
    return Status(dev, ingress and egress, ingress, egress, records, rate, drops, per_cpu, disk)
