"""``relay logging on|off|status [--dev relay0]``: the capture switched from a
separate process, through rtnetlink and the BPF objects ``relay serve`` pinned.

``off`` removes the two tc filters; ``on`` puts them back with the pinned
programs (the same maps, so records resume into the running relay's ring and
session map); ``status`` says whether both filters are there and reads the pinned
per-CPU counters twice to give records/s. The running relay notices either change
through its netlink watcher and audits it.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from relay import packetlog, tcfilter

DEFAULT_DEV = "relay0"
# status samples the counters over this long to give a rate: one second is what
# an operator expects "records/s" to mean.
RATE_SAMPLE_SECONDS = 1.0


def logging_on(dev: str = DEFAULT_DEV, *, netns: str | None = None,
               pin_root: Path = tcfilter.PIN_ROOT) -> None:
    pins = tcfilter.pin_dir(dev, pin_root)
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


def logging_off(dev: str = DEFAULT_DEV, *, netns: str | None = None) -> None:
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


def logging_status(dev: str = DEFAULT_DEV, *, netns: str | None = None,
                   data_dir: str | os.PathLike[str] | None = None,
                   pin_root: Path = tcfilter.PIN_ROOT,
                   sample_seconds: float = RATE_SAMPLE_SECONDS) -> Status:
    """Attached or not, records/s and drops (when the relay's pins exist), and the
    packet log's disk use (when data_dir is given)."""
    with tcfilter.iproute(netns) as ipr:
        ingress, egress = tcfilter.attached_state(ipr, dev)
    records = rate = drops = per_cpu = None
    counters = tcfilter.pin_dir(dev, pin_root) / tcfilter.MAP_COUNTERS
    if counters.exists():
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
    disk = packetlog.disk_use(data_dir) if data_dir is not None else None
    return Status(dev, ingress and egress, ingress, egress, records, rate, drops, per_cpu, disk)
