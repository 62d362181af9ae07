"""The relay's TAP device and its neighbour entries.

The device is attached with the TUNSETIFF ioctl (the only way to get a file
descriptor for it) without TUNSETPERSIST, so the kernel removes it when the relay's
descriptors close, however the relay ends. It has one queue per datapath worker
(IFF_MULTI_QUEUE): the control plane opens them all and lends queue ``i`` to
worker ``i`` (relay.serve.steer says why it keeps them). Addresses, MTU, link
state and the per-session permanent neighbour entries are set through rtnetlink
(pyroute2).

Each session has its own MAC. Client packets are written as Ethernet frames from
that MAC; the permanent neighbour entry for the session's virtual IP makes the
kernel address replies to it, so no ARP ever crosses the device, and the
destination MAC of an outgoing frame names its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import os
import secrets
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from relay.errors import RelayError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
# TUNSETIFF fails with EBUSY when the device exists: without it a second relay
# with the same [tap] name would attach queues to the first one's device.
IFF_TUN_EXCL = 0x8000
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_HLEN = 14
NUD_PERMANENT = 0x80
T = TypeVar("T")
# Frames queued in the kernel towards the relay before it drops; the Linux
# default (500) is sized for slow devices, a busy relay wants more headroom.
TX_QUEUE_LEN = 4096


def random_mac() -> bytes:
    """A locally administered unicast MAC (bit 1 set, bit 0 clear in byte 0)."""
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return bytes(b)


def mac_str(mac: bytes) -> str:
    return ":".join(f"{x:02x}" for x in mac)


class Netlink:
    """rtnetlink calls on one worker thread.

    pyroute2's asyncio API needs a loop that can open AF_NETLINK datagram
    endpoints, which uvloop cannot; its synchronous API cannot run inside a
    running loop. So a sync IPRoute lives on a thread of its own. One thread also
    keeps the calls in order: a neighbour deletion always lands before a later
    replacement for the same address.
    """

    def __init__(self) -> None:
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._ipr: IPRoute | None = None

    async def call(self, fn: Callable[[IPRoute], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._exec, self._run, fn)

    def _run(self, fn: Callable[[IPRoute], T]) -> T:
        if self._ipr is None:
            self._ipr = IPRoute()
        return fn(self._ipr)

    def close(self) -> None:
        if self._ipr is not None:
            self._exec.submit(self._ipr.close).result()
        self._exec.shutdown()


@dataclass(frozen=True)
class Queue:
    """One queue of the TAP device, as a worker's datapath uses it."""

    name: str
    fd: int
    mac: bytes  # the device's own: the source of the frames it sends sessions


def _open_queue(name: str, flags: int) -> int:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RelayError(f"cannot open /dev/net/tun: {exc.strerror} (TUN/TAP support?)") \
            from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                                 IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE | flags))
    except OSError as exc:
        os.close(fd)
        hint = " (is another relay running?)" if exc.errno == errno.EBUSY else ""
        raise RelayError(f"cannot create TAP device {name}: {exc.strerror}{hint}") from None
    return fd


@dataclass
class Tap:
    name: str
    queues: list[int]  # worker i's queue is queues[i]; empty once closed
    index: int
    mac: bytes
    gateway: ipaddress.IPv4Interface
    netlink: Netlink

    @classmethod
    async def create(cls, name: str, gateway: ipaddress.IPv4Interface, mtu: int,
                     queues: int = 1) -> Tap:
        fds = [_open_queue(name, IFF_TUN_EXCL)]
        try:
            fds += [_open_queue(name, 0) for _ in range(queues - 1)]
        except RelayError:
            for fd in fds:
                os.close(fd)
            raise
        _disable_ipv6(name)

        def configure(ipr: IPRoute) -> tuple[int, str]:
            index = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=index, mtu=mtu, txqlen=TX_QUEUE_LEN)
            ipr.addr("add", index=index, address=str(gateway.ip),
                     prefixlen=gateway.network.prefixlen)
            ipr.link("set", index=index, state="up")
            return index, ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")

        netlink = Netlink()
        try:
            index, mac_text = await netlink.call(configure)
        except NetlinkError as exc:
            for fd in fds:
                os.close(fd)
            netlink.close()
            raise RelayError(f"cannot configure {name}: {exc}") from None
        return cls(name, fds, index, bytes.fromhex(mac_text.replace(":", "")), gateway, netlink)

    def queue(self, i: int) -> Queue:
        return Queue(self.name, self.queues[i], self.mac)

    def close(self) -> None:
        if self.queues:
            self.netlink.close()
            for fd in self.queues:  # the kernel removes the device, and its neighbours with it
                os.close(fd)
            self.queues = []

    async def add_neighbour(self, ip: str, mac: bytes) -> None:
        await self.netlink.call(lambda ipr: ipr.neigh(
            "replace", dst=ip, lladdr=mac_str(mac), ifindex=self.index, state=NUD_PERMANENT))

    async def remove_neighbour(self, ip: str) -> None:
        def delete(ipr: IPRoute) -> None:
            with contextlib.suppress(NetlinkError):  # already gone with the device
                ipr.neigh("del", dst=ip, ifindex=self.index)

        await self.netlink.call(delete)


def _disable_ipv6(name: str) -> None:
    # The pool is IPv4; without this the kernel would send router and neighbour
    # solicitations into the device that no session asked for.
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass  # kernel without IPv6
