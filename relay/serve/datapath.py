"""The datapath of ``relay serve``: packets between the links and the TAP device.

Client -> kernel: a link hands over its client's IP packets (CSTP: all those of
one receive at once, :meth:`Datapath.to_kernel_batch`) or, from a bridged client,
whole Ethernet frames (:meth:`Datapath.to_kernel_frame`). Each must come from the
session's own address (attribution in the logs relies on no client sending as
another); then the hot path stamps the User-Agent in place and notes new
destinations (one call into C per batch), and each packet is written into the TAP
as a frame from the session's MAC.

Kernel -> client: frames the kernel sends into the TAP are routed by destination
MAC, the session's own, to its link (:class:`relay.serve.link.Link`).

What the datapath counts is in :class:`Traffic`; the core exports it.
"""

from __future__ import annotations

import logging
import os
from array import array
from collections import Counter
from typing import Protocol

from relay.serve import hotpath
from relay.serve.link import Link
from relay.serve.sessions import Session
from relay.serve.tap import ETH_HLEN

log = logging.getLogger("relay")

ETHERTYPE_IPV4 = b"\x08\x00"
ETHERTYPE_ARP = b"\x08\x06"
# An ARP packet for IPv4 over Ethernet: 8-byte header, sender and target MAC + IP.
ARP_IPV4_LEN = 28
# Frames read from the TAP per wake-up before yielding to the other sockets.
TAP_READ_BATCH = 256
# Largest frame the TAP can hand us (64 KiB IP packet + Ethernet header).
TAP_READ_SIZE = 65536 + ETH_HLEN


class Device(Protocol):
    """The TAP device as the datapath uses it (relay.serve.tap.Tap)."""

    name: str
    fd: int  # -1 once closed: a late write then fails instead of reaching another file
    mac: bytes


class Traffic:
    """The datapath's counters, kept where they change so that a scrape costs
    the same with 1 or 4096 sessions (the links count what they send)."""

    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()  # packets, by reason
        self.ua_stamped = 0
        self.ua_missed = 0
        # Traffic of every session, added where the sessions count theirs.
        self.packets_in = self.packets_out = 0
        self.bytes_in = self.bytes_out = 0


class Datapath:
    def __init__(self, tap: Device) -> None:
        self.tap = tap
        self.links: dict[bytes, Link] = {}  # by session MAC
        self.traffic = Traffic()

    # -- kernel -> client -----------------------------------------------------------

    def on_tap_readable(self) -> None:
        fd = self.tap.fd
        links = self.links
        for _ in range(TAP_READ_BATCH):
            try:
                frame = os.read(fd, TAP_READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("reading %s: %s", self.tap.name, exc.strerror)
                return
            link = links.get(frame[:6])
            if link is None:
                self.traffic.dropped["no-session"] += 1
                continue
            link.from_kernel(frame)

    # -- client -> kernel -----------------------------------------------------------

    def to_kernel(self, s: Session, packet: bytearray) -> None:
        """One IP packet from a session's client (see :meth:`to_kernel_batch`)."""
        self.to_kernel_batch(s, packet, array("I", (0, len(packet))))

    def to_kernel_batch(self, s: Session, data: bytearray, spans: array[int]) -> None:
        """The IP packets ``data[spans[2i] : spans[2i] + spans[2i+1]]`` from a
        session's client, into the TAP as frames from the session's MAC: source
        check, then the hot path over the whole batch in one call into C (it may
        stamp ``data`` in place), then one write each."""
        ok = array("I")
        for i in range(0, len(spans), 2):
            off, n = spans[i], spans[i + 1]
            if self._source_ok(s, data, off, n):
                ok.append(off)
                ok.append(n)
        if not ok:
            return
        self._hot_path(s, data, ok)
        fd, head, view = self.tap.fd, self.tap.mac + s.mac + ETHERTYPE_IPV4, memoryview(data)
        packets = total = 0
        for i in range(0, len(ok), 2):
            off, n = ok[i], ok[i + 1]
            try:
                os.writev(fd, (head, view[off:off + n]))
            except OSError as exc:
                self.traffic.dropped["tap-write-error"] += 1
                log.debug("TAP write failed: %s", exc.strerror)
                continue
            packets += 1
            total += n
        s.packets_in += packets
        s.bytes_in += total
        self.traffic.packets_in += packets
        self.traffic.bytes_in += total

    def _source_ok(self, s: Session, data: bytearray, off: int, n: int) -> bool:
        """An IPv4 packet from the session's own address: attribution in the logs
        relies on no client sending as another."""
        if n < 20 or data[off] >> 4 != 4 or data[off + 12:off + 16] != s.vip_bytes:
            self.traffic.dropped["spoofed-source"] += 1
            return False
        return True

    def _hot_path(self, s: Session, data: bytearray, spans: array[int]) -> None:
        """User-Agent stamps (in place) and new destinations of a session's packets."""
        seen = hotpath.inspect_batch(data, spans, s.tag_bytes, s.seen)
        self.traffic.ua_stamped += seen.stamped
        self.traffic.ua_missed += seen.ua_missed
        for d in seen.destinations:
            s.add_destination(d)

    def to_kernel_frame(self, s: Session, frame: bytearray) -> None:
        """A whole Ethernet frame from a bridged (OpenVPN ``dev tap``) client, into
        the TAP; IPv4 goes through the hot path as in :meth:`to_kernel`. The source
        MAC must be the session's, and the IPv4 source or ARP sender the session's
        address; other frames (IPv6, which the relay does not route, ...) are dropped."""
        if len(frame) < ETH_HLEN or frame[6:12] != s.mac:
            self.traffic.dropped["spoofed-source"] += 1
            return
        ethertype = frame[12:14]
        if ethertype == ETHERTYPE_IPV4:
            n = len(frame) - ETH_HLEN
            if not self._source_ok(s, frame, ETH_HLEN, n):
                return
            self._hot_path(s, frame, array("I", (ETH_HLEN, n)))
        elif ethertype == ETHERTYPE_ARP:
            if (len(frame) < ETH_HLEN + ARP_IPV4_LEN or frame[22:28] != s.mac
                    or frame[28:32] != s.vip_bytes):
                self.traffic.dropped["spoofed-source"] += 1
                return
        else:
            self.traffic.dropped["not-ipv4"] += 1
            return
        n = len(frame) - ETH_HLEN
        s.packets_in += 1
        s.bytes_in += n
        self.traffic.packets_in += 1
        self.traffic.bytes_in += n
        try:
            os.write(self.tap.fd, frame)
        except OSError as exc:
            self.traffic.dropped["tap-write-error"] += 1
            log.debug("TAP write failed: %s", exc.strerror)
