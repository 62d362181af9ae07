"""The capture's tc filters and pinned BPF objects: attach, detach, look up.

Shared by the relay (relay/packetlog/capture.py) and the separate ``relay logging`` command
(relay/packetlog/logging_ctl.py): both name the same pinned programs under
``/sys/fs/bpf/relay/<dev>/`` and the same two filters, so either can remove or
restore what the other made. Operators see the filters with
``tc filter show dev relay0 ingress`` (and ``egress``) as ``relay_capture_in`` /
``relay_capture_out``.

``ip netns exec`` starts each command in a mount namespace of its own with a
fresh /sys, where /sys/fs/bpf is an empty sysfs directory, not the host's bpffs;
a bpffs mounted there is a new instance that no other ``ip netns exec`` sees.
So the relay mounts a bpffs of its own wherever the configured path has none
(:func:`ensure_bpffs`), and ``relay logging`` reaches the pins through the
relay's own view of the file system, ``/proc/PID/root`` (relay/packetlog/logging_ctl.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from relay.cext import ffi, lib
from relay.errors import RelayError

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "relay"
# statfs(2) f_type of a bpffs (linux/magic.h).
BPF_FS_MAGIC = 0xCAFE4A11
PROG_IN = "prog_in"
PROG_OUT = "prog_out"
MAP_EVENTS = "events"
MAP_SESSIONS = "sessions"
MAP_COUNTERS = "counters"

FILTER_IN = "relay_capture_in"
FILTER_OUT = "relay_capture_out"
# clsact parents (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / _EGRESS) in pkt_sched.h).
PARENT_INGRESS = 0xFFFFFFF2
PARENT_EGRESS = 0xFFFFFFF3
# A fixed priority and handle make our filters findable and removable by exactly
# these two numbers, beside any filter an operator adds; 0xC0DE is just a number
# unlikely to clash with hand-made filters (tc picks 49152 and up by default).
FILTER_PRIO = 0xC0DE
FILTER_HANDLE = 1
ETH_P_ALL = 0x0003

# Per-CPU counter slots (ebpf/record.h RELAY_CNT_*).
CNT_RECORDS = 0
CNT_DROPS = 1


def pin_dir(dev: str, root: Path = PIN_ROOT) -> Path:
    return root / dev


@contextlib.contextmanager
def iproute(netns: str | None = None) -> Iterator[IPRoute]:
    ipr = IPRoute(netns=netns) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def ifindex(ipr: IPRoute, dev: str) -> int:
    idx = ipr.link_lookup(ifname=dev)
    if not idx:
        raise RelayError(f"no network device {dev!r}")
    return int(idx[0])


def _filters(ipr: IPRoute, index: int, parent: int) -> list[str]:
    try:
        msgs = ipr.get_filters(index=index, parent=parent)
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT):  # no clsact qdisc
            return []
        raise
    names = []
    for m in msgs:
        opts = m.get_attr("TCA_OPTIONS")
        if m.get_attr("TCA_KIND") == "bpf" and opts is not None:
            names.append(opts.get_attr("TCA_BPF_NAME") or "")
    return names


def attached_state(ipr: IPRoute, dev: str) -> tuple[bool, bool]:
    """(ingress filter present, egress filter present)."""
    index = ifindex(ipr, dev)
    return (FILTER_IN in _filters(ipr, index, PARENT_INGRESS),
            FILTER_OUT in _filters(ipr, index, PARENT_EGRESS))


def attach(ipr: IPRoute, dev: str, fd_in: int, fd_out: int) -> None:
    """Add the clsact qdisc if missing and both filters (replacing ours if there)."""
    index = ifindex(ipr, dev)
    try:
        ipr.tc("add", "clsact", index)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise
    for parent, fd, name in ((PARENT_INGRESS, fd_in, FILTER_IN),
                             (PARENT_EGRESS, fd_out, FILTER_OUT)):
        ipr.tc("replace-filter", "bpf", index, FILTER_HANDLE, fd=fd, name=name,
               parent=parent, prio=FILTER_PRIO, protocol=ETH_P_ALL, direct_action=True)


def detach(ipr: IPRoute, dev: str) -> None:
    """Remove our two filters; the clsact qdisc stays (others may use it)."""
    index = ifindex(ipr, dev)
    for parent in (PARENT_INGRESS, PARENT_EGRESS):
        try:
            ipr.tc("del-filter", "bpf", index, FILTER_HANDLE, parent=parent,
                   prio=FILTER_PRIO, protocol=ETH_P_ALL)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL):
                raise


_libc = ctypes.CDLL(None, use_errno=True)


def is_bpffs(path: Path) -> bool:
    """Whether a bpffs is mounted at ``path`` (statfs(2), as the kernel checks)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return False
    # f_type, the first field, is a long.
    return (struct.unpack_from("l", buf)[0] & 0xFFFFFFFF) == BPF_FS_MAGIC


def ensure_bpffs(path: Path) -> bool:
    """Mount a bpffs at ``path`` unless one is there; True when this mounted it.

    Under ``ip netns exec`` the mount is in the process's own mount namespace and
    goes away with it, pins and all. Raises RelayError saying what to do when the
    mount fails."""
    if is_bpffs(path):
        return False
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RelayError(f"[capture] bpffs {path}: not a bpffs and cannot be made a mount "
                         f"point ({exc.strerror}): point [capture] bpffs at a bpffs "
                         "(mount -t bpf bpf DIR)") from None
    # mode=0700 as systemd mounts /sys/fs/bpf: the pins are root's alone.
    if _libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise RelayError(f"[capture] bpffs {path}: not a bpffs, and mounting one failed "
                         f"({os.strerror(err)}): run 'mount -t bpf bpf {path}' as root, or "
                         "point [capture] bpffs at a bpffs")
    return True


def obj_get(path: Path) -> int:
    fd = lib.relay_bpf_obj_get(str(path).encode())
    if fd < 0:
        err = ffi.errno
        raise RelayError(f"cannot open pinned BPF object {path}: {os.strerror(err)} "
                         "(is relay serve running on this device and data directory?)")
    return int(fd)


def obj_pin(fd: int, path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if lib.relay_bpf_obj_pin(fd, str(path).encode()) < 0:
        raise RelayError(f"cannot pin BPF object at {path}: {os.strerror(ffi.errno)}")


def possible_cpus() -> int:
    """Per-CPU maps hold one value per possible CPU (not just the online ones)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


@dataclass
class Counters:
    records: list[int]
    drops: list[int]


def read_counters(fd: int) -> Counters:
    n = possible_cpus()
    buf = ffi.new("uint64_t[]", n)
    out = []
    for slot in (CNT_RECORDS, CNT_DROPS):
        if lib.relay_bpf_percpu_u64(fd, slot, buf, n) < 0:
            raise RelayError(f"cannot read capture counters: {os.strerror(ffi.errno)}")
        out.append(list(buf))
    return Counters(*out)
