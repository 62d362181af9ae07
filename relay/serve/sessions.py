"""Sessions: addresses, counters, their connect and disconnect records, and the
journal of open sessions.

A session's ID and its *tag* (what the User-Agent stamp carries) are defined in
relay.sessionid; tags are kept unique among the sessions of the retained
connection log, so a stamp names one session.

Every open session has a journal file ``DATA_DIR/sessions/<id>.json`` holding its
connect record and last counters (refreshed every ``CHECKPOINT_INTERVAL_S``).
A relay that is killed leaves these behind; the next start turns each into a
disconnect record, so no session is left without one.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay import sessionid
from relay.clienttext import clean
from relay.connlog import daylog, reader
from relay.errors import RelayError
from relay.fsutil import write_atomic
from relay.protocols import syslog5424
from relay.serve.hotpath import Destination
from relay.serve.tap import random_mac
from relay.times import parse_rfc3339

JOURNAL_DIR = "sessions"
# Distinct destinations kept per session for its disconnect record; past this
# they are counted, not listed (a scanner touching every host would otherwise
# make one record megabytes long).
MAX_DESTINATIONS = 256
# ... and the bytes they take in the record's JSON, so that the disconnect record
# always travels whole to the collector (256 destinations of 255-character hosts
# would be 80 kB, past its 64 KiB frame). The JSON budget of a record
# (syslog5424.RECORD_JSON_MAX) less room for every other field of a disconnect
# record: about 25 values, the client-declared ones at most 256 characters
# (relay.protocols.cstp), at most 6 bytes per character once escaped in JSON.
DISCONNECT_OTHER_FIELDS_MAX = 16 << 10
# Moves of an OpenVPN client to a new address (float) a disconnect record lists,
# the latest ones; each move also has its own client-float audit record. Mobile
# clients change networks a few times a session; past this the list is only a tail.
MAX_FLOATS = 16
# ... each at most: the time (24 characters), two IPv6 addresses (39) and ports,
# with their JSON keys and punctuation.
FLOAT_MAX_BYTES = 160
DESTINATIONS_MAX_BYTES = (syslog5424.RECORD_JSON_MAX - DISCONNECT_OTHER_FIELDS_MAX
                          - MAX_FLOATS * FLOAT_MAX_BYTES)
# How stale the counters of a killed relay's sessions may be in their
# disconnect record. A minute keeps the journal's write load negligible.
CHECKPOINT_INTERVAL_S = 60.0

# What a disconnect record repeats of its connect record, in record order.
_CONNECT_FIELDS = ("session_id", "server", "client", "protocol", "data_channel",
                   "client_software", "virtual_ip")
# The counters that a disconnect record and the journal carry (Session.counters),
# in record order: a worker's of its traffic (Session.traffic), then the moves
# the control plane recorded.
TRAFFIC_KEYS = ("packets", "bytes", "destinations", "destinations_dropped")
COUNTER_KEYS = (*TRAFFIC_KEYS, "floats")

_TAG_IN_LOG = re.compile(rb'"session_id":"(%s)' % sessionid.TAG_PATTERN)


class _Unchanged(enum.Enum):
    CONNECT = "as in the connect record"


# disconnect_record's client hostname when no better answer is known.
AS_CONNECTED = _Unchanged.CONNECT


class SessionRefused(RelayError):
    """No session can be opened now (the relay is full, ...); the message is for
    the client."""


def tags_in_log(data_dir: Path) -> set[str]:
    """Tags of every session in the retained connection log (a byte scan:
    startup must stay fast with 90 days of records)."""
    tags: set[str] = set()
    for day in reader.log_days(data_dir):
        for _, _, block in reader.blocks(day):
            tags.update(m.decode() for m in _TAG_IN_LOG.findall(block))
    return tags


def destination_doc(d: Destination) -> dict[str, Any]:
    """A destination as the disconnect record lists it."""
    return {"host": d.host, "ip": d.ip, "port": d.port, "scheme": d.scheme}


@dataclass
class Session:
    id: str
    mac: bytes
    virtual_ip: str
    client_ip: str
    client_port: int
    protocol: str
    packets_in: int = 0  # client -> relay
    packets_out: int = 0  # relay -> client
    bytes_in: int = 0
    bytes_out: int = 0
    connect_record: dict[str, Any] = field(default_factory=dict)
    destinations: set[Destination] = field(default_factory=set)
    destinations_dropped: int = 0
    destinations_bytes: int = 0  # of the "destinations" list in the record's JSON
    floats: list[dict[str, Any]] = field(default_factory=list)  # the latest MAX_FLOATS
    vip_bytes: bytes = field(init=False)  # the packed virtual IP, checked per packet
    tag_bytes: bytes = field(init=False)  # the User-Agent stamp
    # The hot path's record of reported destinations (4 KiB): made by the
    # datapath of the worker that carries the session's packets, on its first.
    seen: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.vip_bytes = ipaddress.IPv4Address(self.virtual_ip).packed
        self.tag_bytes = sessionid.tag(self.id).encode()

    def add_destination(self, d: Destination) -> None:
        if d in self.destinations:
            return
        # Each entry adds its JSON and a comma (the list's brackets are 2 bytes).
        size = len(syslog5424.dumps_json(destination_doc(d)).encode()) + 1
        if len(self.destinations) < MAX_DESTINATIONS \
                and 2 + self.destinations_bytes + size <= DESTINATIONS_MAX_BYTES:
            self.destinations.add(d)
            self.destinations_bytes += size
        else:
            self.destinations_dropped += 1

    def moved(self, ip: str, port: int, time: str) -> dict[str, Any]:
        """The client sends from ``ip``, ``port`` since ``time`` (RFC 3339): the
        move, as the disconnect record lists it."""
        move = {"time": time, "from": {"ip": self.client_ip, "port": self.client_port},
                "to": {"ip": ip, "port": port}}
        self.client_ip, self.client_port = ip, port
        self.floats.append(move)
        del self.floats[:-MAX_FLOATS]
        return move

    def traffic(self) -> dict[str, Any]:
        """The counters and destinations of the session's traffic, as the
        disconnect record carries them (TRAFFIC_KEYS)."""
        return {
            "packets": {"in": self.packets_in, "out": self.packets_out},
            "bytes": {"in": self.bytes_in, "out": self.bytes_out},
            "destinations": [
                destination_doc(d)
                for d in sorted(self.destinations, key=lambda d: (d.scheme, d.host, d.ip, d.port))
            ],
            "destinations_dropped": self.destinations_dropped,
        }

    def counters(self, traffic: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The disconnect record's (and the journal's) counters and destinations:
        ``traffic`` (a worker's report of them), else the session's own, and its
        moves."""
        return {**(traffic if traffic is not None else self.traffic()),
                "floats": list(self.floats)}


def connect_record(s: Session, *, server_id: str, server_ip: str,
                   server_hostname: str | None, client_hostname: str | None,
                   software: Mapping[str, object],
                   data_channel: str | None = None) -> dict[str, Any]:
    """The connect record of ``s`` (the connection log stamps its ``id`` and
    ``time``). ``software`` is what the client declared about itself: cleaned here,
    the same way for every protocol. ``data_channel``: how a CSTP session's packets
    travel ("DTLS": over DTLS while its channel is up, else over the TLS
    connection; "TLS": over TLS only); None for other protocols."""
    return {
        "action": "connect",
        "session_id": s.id,
        "server": {"id": server_id, "ip": server_ip, "hostname": server_hostname},
        "client": {"ip": s.client_ip, "port": s.client_port, "hostname": client_hostname},
        "protocol": s.protocol,
        "data_channel": data_channel,
        "client_software": {key: clean(value) for key, value in software.items()},
        "virtual_ip": s.virtual_ip,
    }


def disconnect_record(connect: Mapping[str, Any], counters: Mapping[str, Any], *,
                      reason: str, error: str | None, end_time: float,
                      client_hostname: str | _Unchanged | None = AS_CONNECTED
                      ) -> dict[str, Any]:
    """The disconnect record of the session whose connect record (as logged) is
    ``connect``, ending at ``end_time`` (epoch seconds). ``counters`` is the
    session's :meth:`Session.counters` or its journal entry (a value the entry
    lacks is null). ``client_hostname`` is the reverse lookup's answer at the end,
    or AS_CONNECTED (a session closed after a restart: the lookup died with the
    relay). The connect record may come from a journal on disk: any value is
    copied, none is trusted to be a dict. A client that moved (OpenVPN's float) is
    named at its last address, whose reverse lookup the connect record lacks."""
    record: dict[str, Any] = {"action": "disconnect"}
    for key in _CONNECT_FIELDS:
        value = connect.get(key)
        record[key] = dict(value) if isinstance(value, dict) else value
    floats = counters.get("floats")
    if isinstance(floats, list) and floats and isinstance(floats[-1], dict) \
            and isinstance(floats[-1].get("to"), dict):
        last = floats[-1]["to"]
        record["client"] = {"ip": last.get("ip"), "port": last.get("port"), "hostname": None}
    if client_hostname is not AS_CONNECTED and isinstance(record["client"], dict):
        record["client"]["hostname"] = client_hostname
    record["connect_time"] = connect.get("time")
    record.update({key: counters.get(key) for key in COUNTER_KEYS})
    started = parse_rfc3339(connect["time"]).timestamp() if "time" in connect else end_time
    record.update(duration_s=round(end_time - started, 3), reason=reason, error=error)
    return record


class AddressPool:
    """Virtual IPs of the pool; the first host address is the relay's gateway."""

    def __init__(self, network: ipaddress.IPv4Network) -> None:
        self.network = network
        hosts = network.hosts()
        self.gateway = ipaddress.IPv4Interface(f"{next(hosts)}/{network.prefixlen}")
        self._first = int(self.gateway.ip) + 1
        self._last = int(network.broadcast_address) - 1
        self._next = self._first
        self._used: set[int] = set()

    def allocate(self) -> str:
        size = self._last - self._first + 1
        for _ in range(size):
            candidate = self._next
            self._next = self._first if candidate >= self._last else candidate + 1
            if candidate not in self._used:
                self._used.add(candidate)
                return str(ipaddress.IPv4Address(candidate))
        raise RelayError(f"address pool {self.network} exhausted")

    def release(self, ip: str) -> None:
        self._used.discard(int(ipaddress.IPv4Address(ip)))

    def available(self) -> int:
        """Addresses free now (one of a closed session is free once its neighbour
        entry is gone)."""
        return self._last - self._first + 1 - len(self._used)


class SessionTable:
    def __init__(self, pool: AddressPool, taken_tags: Iterable[str]) -> None:
        self.pool = pool
        self.taken_tags = set(taken_tags)
        self.by_id: dict[str, Session] = {}
        self.by_mac: dict[bytes, Session] = {}

    def open(self, client_ip: str, client_port: int, protocol: str,
             mac: bytes | None = None) -> Session:
        sid = sessionid.new(self.taken_tags)
        self.taken_tags.add(sessionid.tag(sid))
        while mac is None or mac in self.by_mac:
            mac = random_mac()
        s = Session(sid, mac, self.pool.allocate(), client_ip, client_port, protocol)
        self.by_id[sid] = s
        self.by_mac[mac] = s
        return s

    def close(self, s: Session) -> None:
        """Forget the session. Its virtual IP stays taken until the caller has
        removed the neighbour entry and calls ``pool.release``: handing the IP to
        a new session earlier could let the old entry's removal delete the new one."""
        self.by_id.pop(s.id, None)
        self.by_mac.pop(s.mac, None)

    def __len__(self) -> int:
        return len(self.by_id)


class Journal:
    """Open sessions on disk, so a killed relay's sessions still get closed."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = daylog.ensure_dir(Path(data_dir) / JOURNAL_DIR)

    def write(self, s: Session, traffic: Mapping[str, Any] | None = None) -> None:
        """``s``'s entry: its connect record and :meth:`Session.counters`."""
        write_atomic(self.dir / f"{s.id}.json",
                     json.dumps({"connect": s.connect_record, **s.counters(traffic)}).encode())

    def remove(self, s: Session) -> None:
        (self.dir / f"{s.id}.json").unlink(missing_ok=True)

    def leftovers(self) -> list[tuple[Path, dict[str, Any] | None]]:
        """(path, content or None when unreadable) of every journal entry."""
        out: list[tuple[Path, dict[str, Any] | None]] = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                data = json.loads(path.read_bytes())
                out.append((path, data if isinstance(data, dict) else None))
            except (OSError, ValueError):
                out.append((path, None))
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        return out
