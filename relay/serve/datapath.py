"""The datapath of ``relay serve``: packets between the links and the TAP device.

Client -> kernel: a link hands over its client's IP packets, all those of one
receive at once (:meth:`Datapath.to_kernel_batch`), or, from a bridged client,
whole Ethernet frames (:meth:`Datapath.to_kernel_frames`). Each must come from the
session's own address (attribution in the logs relies on no client sending as
another); then the hot path stamps the User-Agent in place and notes new
destinations, and the packets are written into the TAP as frames from the
session's MAC: one call into C for each step of a batch
(:mod:`relay.serve.batch`, :mod:`relay.serve.hotpath`), none per packet.

Kernel -> client: the frames the kernel sends into the TAP are read in batches
(one call), grouped by destination MAC, the session's own, and each group goes to
its link in one call (:meth:`relay.serve.link.Link.from_kernel_batch`).

What the datapath counts is in :class:`Traffic`; the core exports it.
"""

from __future__ import annotations

import logging
import os
from array import array
from collections import Counter
from typing import Protocol

from relay.serve import batch, hotpath
from relay.serve.batch_py import ETHERTYPE_IPV4
from relay.serve.link import Link
from relay.serve.sessions import Session
from relay.serve.tap import ETH_HLEN

log = logging.getLogger("relay")

# Frames read from the TAP per wake-up before yielding to the other sockets.
TAP_READ_BATCH = 256
# Largest frame the TAP can hand us (64 KiB IP packet + Ethernet header).
TAP_READ_SIZE = 65536 + ETH_HLEN
# The read buffer: a whole batch of frames of the relay's MTU (at most 9000, a
# jumbo frame) fits, and a read always has room for the largest frame.
TAP_READ_BUFFER = TAP_READ_BATCH * (9000 + ETH_HLEN) + TAP_READ_SIZE


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
        self._read_buffer = bytearray(TAP_READ_BUFFER)

    # -- kernel -> client -----------------------------------------------------------

    def on_tap_readable(self) -> None:
        """The frames waiting in the TAP, to their sessions' links a group at a
        time. The buffer is reused: a link sends (or copies) before it returns."""
        buf = self._read_buffer
        spans, err = batch.tap_read(self.tap.fd, buf, TAP_READ_SIZE, TAP_READ_BATCH)
        if err:
            log.error("reading %s: %s", self.tap.name, os.strerror(err))
        if not spans:
            return
        groups = batch.group_by_mac(buf, spans)
        links = self.links
        for g in range(0, len(groups), 2):
            first, n = groups[g], groups[g + 1]
            at = spans[2 * first]
            link = links.get(bytes(buf[at:at + 6]))
            if link is None:
                self.traffic.dropped["no-session"] += n
                continue
            link.from_kernel_batch(buf, spans[2 * first:2 * (first + n)])

    # -- client -> kernel -----------------------------------------------------------

    def to_kernel_batch(self, s: Session, data: bytearray, spans: array[int]) -> None:
        """The IP packets ``data[spans[2i] : spans[2i] + spans[2i+1]]`` from a
        session's client, into the TAP as frames from the session's MAC: source
        check, the hot path (it may stamp ``data`` in place) and the writes, each
        one call into C for the whole batch."""
        ok = batch.from_ipv4(data, spans, s.vip_bytes)
        spoofed = (len(spans) - len(ok)) // 2
        if spoofed:
            self.traffic.dropped["spoofed-source"] += spoofed
        if ok:
            self._hot_path(s, data, ok)
            self._write(s, self.tap.mac + s.mac + ETHERTYPE_IPV4, data, ok, 0)

    def _hot_path(self, s: Session, data: bytearray, spans: array[int]) -> None:
        """User-Agent stamps (in place) and new destinations of a session's packets."""
        if s.seen is None:
            s.seen = hotpath.new_seen()
        seen = hotpath.inspect_batch(data, spans, s.tag_bytes, s.seen)
        self.traffic.ua_stamped += seen.stamped
        self.traffic.ua_missed += seen.ua_missed
        for d in seen.destinations:
            s.add_destination(d)

    def to_kernel_frames(self, s: Session, data: bytearray, spans: array[int]) -> None:
        """Whole Ethernet frames from a bridged (OpenVPN ``dev tap``) client, into
        the TAP; IPv4 goes through the hot path as in :meth:`to_kernel_batch`. The
        source MAC must be the session's, and the IPv4 source or ARP sender the
        session's address; other frames (IPv6, which the relay does not route, ...)
        are dropped."""
        kept = batch.frames_from(data, spans, s.mac, s.vip_bytes)
        if kept.spoofed:
            self.traffic.dropped["spoofed-source"] += kept.spoofed
        if kept.not_ipv4:
            self.traffic.dropped["not-ipv4"] += kept.not_ipv4
        if kept.ips:
            self._hot_path(s, data, kept.ips)
        if kept.frames:
            self._write(s, b"", data, kept.frames, ETH_HLEN)

    def _write(self, s: Session, head: bytes, data: bytearray, spans: array[int],
               header_bytes: int) -> None:
        """Write the packets, each after ``head``, and count them (without the
        ``header_bytes`` of Ethernet each one carries)."""
        done = batch.tap_write(self.tap.fd, head, data, spans)
        if done.errors:
            self.traffic.dropped["tap-write-error"] += done.errors
            log.debug("TAP write failed: %s", os.strerror(done.errno))
        n = done.bytes - header_bytes * done.packets
        s.packets_in += done.packets
        s.bytes_in += n
        self.traffic.packets_in += done.packets
        self.traffic.bytes_in += n
