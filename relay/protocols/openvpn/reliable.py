"""The control channel's reliability layer (``reliable.c``): numbered packets,
acknowledgements, a send window with exponential back-off, in-order delivery."""

from __future__ import annotations

from dataclasses import dataclass

from relay.protocols.openvpn.wire import ControlPacket, Opcode

# --- Limits and timeouts (OpenVPN 2.6 defaults) -----------------------------------------

# ssl_pkt.h TLS_RELIABLE_N_SEND_BUFFERS / TLS_RELIABLE_N_REC_BUFFERS: the send
# window, and how far ahead of the next expected packet id we buffer.
SEND_WINDOW = 6
RECEIVE_WINDOW = 12
# --tls-timeout 2: retransmit an unacknowledged control packet after 2 s,
# doubling the wait on each retry (reliable.c).
TLS_TIMEOUT_S = 2.0


@dataclass(slots=True)
class _Outgoing:
    opcode: Opcode
    payload: bytes
    next_try: float = 0.0  # 0: never sent
    timeout: float = TLS_TIMEOUT_S


class ReliableSend:
    """Numbered control packets, at most SEND_WINDOW unacknowledged, each
    retransmitted with exponential back-off until acknowledged."""

    def __init__(self) -> None:
        self.next_id = 0
        self.base = 0  # the lowest id not acknowledged (next_id when all are)
        self.unacked: dict[int, _Outgoing] = {}
        self.queued_bytes = 0

    def queue(self, opcode: Opcode, payload: bytes) -> None:
        self.unacked[self.next_id] = _Outgoing(opcode, payload)
        self.next_id += 1
        self.queued_bytes += len(payload)

    def ack(self, pid: int) -> None:
        e = self.unacked.pop(pid, None)
        if e is None:
            return
        self.queued_bytes -= len(e.payload)
        while self.base < self.next_id and self.base not in self.unacked:
            self.base += 1

    def _window(self) -> list[int]:
        end = min(self.base + SEND_WINDOW, self.next_id)
        return [pid for pid in range(self.base, end) if pid in self.unacked]

    def due(self, now: float) -> list[tuple[int, _Outgoing]]:
        out = []
        for pid in self._window():
            e = self.unacked[pid]
            if e.next_try <= now:
                if e.next_try:  # a retransmission: back off
                    e.timeout *= 2
                e.next_try = now + e.timeout
                out.append((pid, e))
        return out

    def next_timeout(self) -> float | None:
        tries = [self.unacked[pid].next_try for pid in self._window()]
        return min(tries) if tries else None


class ReliableReceive:
    """Accepts numbered packets within RECEIVE_WINDOW of the next expected id,
    acknowledges them (duplicates again: our ACK may have been lost) and hands
    them over in order."""

    def __init__(self) -> None:
        self.next_id = 0
        self.buffered: dict[int, ControlPacket] = {}
        self.acks: list[int] = []

    def receive(self, p: ControlPacket) -> None:
        pid = p.packet_id
        assert pid is not None
        if pid >= self.next_id + RECEIVE_WINDOW:
            return  # no room: no ACK, the sender retries later
        if pid not in self.acks:
            self.acks.append(pid)
        if pid >= self.next_id:
            self.buffered.setdefault(pid, p)

    def ready(self) -> list[ControlPacket]:
        out = []
        while self.next_id in self.buffered:
            out.append(self.buffered.pop(self.next_id))
            self.next_id += 1
        return out
