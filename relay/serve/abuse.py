"""Abuse defences at the listener: admission, strikes, bans, refusal summaries.

Pure policy with an injected clock, no sockets: the server asks :meth:`admit`
before any TLS work on an accepted connection and reports what happened with
:meth:`connection_closed`; tests drive it with a fake clock.

A **source** is an IPv4 address or an IPv6 ``[abuse] ipv6_prefix`` network (a
/64 by default), whatever its spelling on the socket (``::ffff:a.b.c.d`` is
``a.b.c.d``): see :mod:`relay.netaddr`. Changing address within one's own prefix
does not escape a limit or a ban.

- **Connection rate**, per source and overall: token buckets.
- **Handshakes in progress** (accept until tunnel or close), per source and overall.
- **Concurrent sessions per source.**
- **Strikes**: a connection that closes within ``short_session`` of its accept
  (a connect/disconnect cycle, or a half-finished handshake) and every refusal by
  rate or cap is a strike against its source. ``strikes`` strikes within
  ``strike_window`` ban the source for ``ban`` seconds, doubled on every repeat
  offence (up to ``ban_max``) while offences stay within a day of each other.
- **Bans** cover the offending source (an IPv6 offender's whole prefix), persist
  in the journal ``DATA_DIR/bans.jsonl`` and expire; operators add and remove
  them by IP or CIDR. A connection's ban look-up costs one dict probe per prefix
  length in use, whatever the number of bans.
- **Refusals** are counted per source and reason and summarised once per
  interval; the audit log never gets one record per refused connection.
"""

from __future__ import annotations

import heapq
import ipaddress
import json
import os
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from relay.config import AbuseConfig
from relay.errors import RelayError
from relay.fsutil import PRIVATE_FILE, fsync_dir, write_atomic
from relay.netaddr import (
    Address,
    AddressError,
    abuse_key,
    canonical_address,
    canonical_network,
)

BANS_JOURNAL = "bans.jsonl"
# The ban list of earlier versions, one JSON array rewritten per change: moved
# into the journal at the first start and removed.
LEGACY_BANS_FILE = "bans.json"
# The journal is rewritten as the live set once it holds more than this many
# records per live ban, and at least COMPACT_MIN_RECORDS: Redis rewrites its
# append-only file when it has doubled (auto-aof-rewrite-percentage 100) and not
# below a minimum size (auto-aof-rewrite-min-size), so each record is rewritten
# O(1) times on average and a small journal is never rewritten at all.
COMPACT_FACTOR = 2
COMPACT_MIN_RECORDS = 1024
# An offender's repeat count is forgotten after a day without offences, as
# fail2ban's recidive jail looks back one day.
OFFENCE_MEMORY_S = 86400.0
# Sources listed by name in one refusal summary; the rest are aggregated so a
# distributed flood cannot grow a summary without bound.
SUMMARY_TOP_SOURCES = 50


# The widest bans that need an operator's --force: an IPv4 /8 is a whole legacy
# allocation (16.7 M addresses), and in IPv6 anything wider than a /32, the
# largest assignment to one ISP (RIPE-690, as IPV6_PREFIX_MIN in relay.config),
# spans several networks. A typo in a CIDR must not lock a continent out.
WIDE_BAN_MAX_PREFIX = {4: 8, 6: 31}
# The longest ban: past a year an address has usually changed hands. A ban is
# never for ever; re-add one that must last longer.
BAN_MAX_S = 366 * 86400


@dataclass
class Ban:
    network: str  # canonical CIDR: "198.51.100.7/32", "2001:db8:1:2::/64", ...
    until: float  # unix time
    reason: str
    offences: int = 1


def parse_network(text: str) -> str:
    """An IP or CIDR -> the canonical CIDR string a ban is filed under (a mapped
    ``::ffff:a.b.c.d`` is ``a.b.c.d/32``); RelayError when it is neither."""
    return str(canonical_network(text))


class BanIndex:
    """The bans in force, by network. A look-up costs one dict probe per prefix
    length in use (the address masked to each), not one test per ban; expiry
    pops a heap of end times instead of scanning every ban."""

    def __init__(self) -> None:
        self.by_network: dict[str, Ban] = {}
        # IP version -> prefix length -> network address as int -> ban.
        self._tables: dict[int, dict[int, dict[int, Ban]]] = {4: {}, 6: {}}
        # (until, network); an entry whose ban was since replaced or removed is
        # stale and skipped when it comes up.
        self._ends: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self.by_network)

    def values(self) -> Iterable[Ban]:
        return self.by_network.values()

    def put(self, ban: Ban) -> None:
        net = canonical_network(ban.network)
        ban.network = str(net)  # as parse_network spells it, even if read from a file
        self.by_network[ban.network] = ban
        self._tables[net.version].setdefault(net.prefixlen, {})[int(net.network_address)] = ban
        heapq.heappush(self._ends, (ban.until, ban.network))

    def pop(self, network: str) -> Ban | None:
        ban = self.by_network.pop(network, None)
        if ban is not None:
            net = ipaddress.ip_network(network)
            table = self._tables[net.version]
            del table[net.prefixlen][int(net.network_address)]
            if not table[net.prefixlen]:
                del table[net.prefixlen]
        return ban

    def covering(self, addr: Address, now: float) -> Ban | None:
        """The ban in force over ``addr`` (a canonical address) that lasts
        longest, else None."""
        value, bits = int(addr), addr.max_prefixlen
        best = None
        for prefixlen, bans in self._tables[addr.version].items():
            shift = bits - prefixlen
            ban = bans.get(value >> shift << shift)
            if ban is not None and ban.until > now and (best is None or ban.until > best.until):
                best = ban
        return best

    def all_covering(self, addr: Address, now: float) -> list[Ban]:
        """Every ban in force over ``addr``, the longest-lasting first (the one
        :meth:`covering` gives)."""
        value, bits = int(addr), addr.max_prefixlen
        found = []
        for prefixlen, bans in self._tables[addr.version].items():
            shift = bits - prefixlen
            ban = bans.get(value >> shift << shift)
            if ban is not None and ban.until > now:
                found.append(ban)
        return sorted(found, key=lambda b: -b.until)

    def pop_expired(self, now: float) -> Iterator[Ban]:
        """Remove the bans whose time is up, yielding each."""
        while self._ends and self._ends[0][0] <= now:
            until, network = heapq.heappop(self._ends)
            ban = self.by_network.get(network)
            if ban is not None and ban.until == until:
                self.pop(network)
                yield ban


class BanJournal:
    """``DATA_DIR/bans.jsonl``, mode 0600: one JSON record per line, ``{"op":
    "add", <ban>}`` or ``{"op": "remove", "network": ...}``, each appended and
    fdatasync'ed on its own, so a ban costs one short write however many there
    are. Replayed at start (a torn last line, from a crash mid-write, is cut
    off); rewritten as the live set by :meth:`compact`. Expiry writes nothing:
    an expired ban leaves the file at the next compaction."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / BANS_JOURNAL
        self.legacy = Path(data_dir) / LEGACY_BANS_FILE
        self.records = 0  # lines in the file

    def load(self, repair: bool = True) -> list[Ban]:
        """Every ban the journal leaves in place (expired ones too, for
        :meth:`Abuse.expire` to record); migrates a legacy ``bans.json`` and cuts
        a torn last line off, unless ``repair`` is false (a reader's look, which
        changes nothing on disk)."""
        if self.legacy.exists():
            if not repair:
                return self._legacy() if not self.path.exists() else self._read(repair)
            self._migrate()
        return self._read(repair)

    def _read(self, repair: bool) -> list[Ban]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RelayError(f"{self.path}: unreadable ban journal ({exc.strerror})") from None
        whole = data.rfind(b"\n") + 1
        if whole < len(data) and repair:
            # A crash cut the last append short: it never happened.
            os.truncate(self.path, whole)
        bans: dict[str, Ban] = {}
        lines = data[:whole].splitlines()
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                op = rec.pop("op")
                if op == "add":
                    bans[rec["network"]] = Ban(**rec)
                elif op == "remove":
                    bans.pop(rec["network"], None)
                else:
                    raise ValueError(f"unknown op {op!r}")
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise RelayError(f"{self.path}:{n}: unreadable ban record ({exc}); fix or "
                                 "remove the line") from None
        self.records = len(lines)
        return list(bans.values())

    def _legacy(self) -> list[Ban]:
        try:
            raw = json.loads(self.legacy.read_text())
            return [Ban(**b) for b in raw]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise RelayError(f"{self.legacy}: unreadable ban list ({exc}); fix or remove "
                             "it") from None

    def _migrate(self) -> None:
        if not self.path.exists():
            self.compact(self._legacy())
        # The journal is on disk (now, or by a start that stopped before this).
        self.legacy.unlink()
        fsync_dir(self.legacy.parent)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     PRIVATE_FILE)
        try:
            os.write(fd, line)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)
        self.records += 1

    def compact(self, bans: Iterable[Ban]) -> None:
        """Replace the journal with one ``add`` record per ban in ``bans``."""
        lines = [json.dumps({"op": "add", **asdict(b)}, separators=(",", ":")) for b in bans]
        write_atomic(self.path, "".join(line + "\n" for line in lines).encode())
        self.records = len(lines)

    def needs_compaction(self, live: int) -> bool:
        return self.records >= COMPACT_MIN_RECORDS and self.records > COMPACT_FACTOR * live


class TokenBucket:
    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class _Source:
    bucket: TokenBucket
    handshakes: int = 0
    sessions: int = 0
    strikes: deque[float] = field(default_factory=deque)
    offences: int = 0
    last_offence: float = 0.0


class Abuse:
    """Every per-source structure (rate bucket, handshakes, sessions, strikes,
    refusal counts) is keyed by :func:`relay.netaddr.abuse_key`: an IPv4 address,
    or the IPv6 ``[abuse] ipv6_prefix`` network; callers pass the address as the
    socket gave it (mapped or not)."""

    def __init__(self, cfg: AbuseConfig, data_dir: Path, audit: Callable[[dict[str, Any]], None],
                 clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.audit = audit
        self.clock = clock
        now = clock()
        self.total = TokenBucket(cfg.rate_total, cfg.burst_total, now)
        self.handshakes = 0
        self.sources: dict[str, _Source] = {}
        self.journal = BanJournal(data_dir)
        self.bans = BanIndex()
        for ban in self.journal.load():
            try:
                self.bans.put(ban)
            except AddressError as exc:
                raise RelayError(f"{self.journal.path}: {exc}; fix or remove that ban") \
                    from None
        self.refusals: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.refused_total: Counter[str] = Counter()
        self.summary_started = now

    def key(self, ip: str | Address) -> str:
        return abuse_key(ip, self.cfg.ipv6_prefix)

    # -- admission ------------------------------------------------------------------

    def _source(self, key: str, now: float) -> _Source:
        src = self.sources.get(key)
        if src is None:
            src = self.sources[key] = _Source(TokenBucket(self.cfg.rate_per_ip,
                                                          self.cfg.burst_per_ip, now))
        return src

    def admit(self, ip: str, new_session: bool = True) -> str | None:
        """None to let a new connection in (its handshake is then counted until
        :meth:`handshake_done` or :meth:`connection_closed`), else the reason.
        ``new_session`` False: the handshake of a session's second channel (DTLS),
        held to everything but the per-source session cap and ended with
        :meth:`handshake_over`."""
        now = self.clock()
        addr = canonical_address(ip)
        key = self.key(addr)
        reason = self._check(key, addr, now, new_session)
        if reason is None:
            self.handshakes += 1
            self._source(key, now).handshakes += 1
            return None
        self._count_refusal(key, reason)
        if reason != "banned":
            self._strike(key, addr, now, f"refused: {reason}")
        return reason

    def refuse(self, ip: str, reason: str) -> None:
        """A connection refused for the relay's capacity, not the source's doing:
        counted in the refusal summary, no strike."""
        self._count_refusal(self.key(ip), reason)

    def _count_refusal(self, key: str, reason: str) -> None:
        self.refusals[key][reason] += 1
        self.refused_total[reason] += 1

    def _check(self, key: str, addr: Address, now: float, new_session: bool) -> str | None:
        if self.bans.covering(addr, now):
            return "banned"
        src = self._source(key, now)
        if not src.bucket.take(now):
            return "rate-per-ip"
        if not self.total.take(now):
            return "rate-total"
        if src.handshakes >= self.cfg.handshakes_per_ip:
            return "handshakes-per-ip"
        if self.handshakes >= self.cfg.handshakes_total:
            return "handshakes-total"
        if new_session and src.sessions >= self.cfg.sessions_per_ip:
            return "sessions-per-ip"
        return None

    def handshake_done(self, ip: str) -> None:
        """The connection has a tunnel: it no longer counts as a handshake."""
        src = self.sources[self.key(ip)]
        src.handshakes -= 1
        src.sessions += 1
        self.handshakes -= 1

    def handshake_over(self, ip: str, strike: bool) -> None:
        """A handshake admitted with ``new_session=False`` ended: its slot is free;
        ``strike`` when it failed or was abandoned, a strike as a half-finished TLS
        handshake is."""
        now = self.clock()
        addr = canonical_address(ip)
        key = self.key(addr)
        self.sources[key].handshakes -= 1
        self.handshakes -= 1
        if strike:
            self._strike(key, addr, now, "abandoned handshakes")

    def moved(self, old_ip: str, new_ip: str) -> None:
        """A session's client now sends from ``new_ip`` (an OpenVPN float): its
        session counts there from now on, so it ends where it is counted."""
        now = self.clock()
        self.sources[self.key(old_ip)].sessions -= 1
        self._source(self.key(new_ip), now).sessions += 1

    def forget(self, ip: str, handshakes: int, sessions: int) -> None:
        """A worker died with these connections from ``ip`` open: ``handshakes``
        admitted and not yet a session, ``sessions`` with one. They end without a
        strike: the relay failed, not the source."""
        src = self.sources[self.key(ip)]
        src.handshakes -= handshakes
        self.handshakes -= handshakes
        src.sessions -= sessions

    def connection_closed(self, ip: str, lifetime_s: float, had_session: bool) -> None:
        now = self.clock()
        addr = canonical_address(ip)
        key = self.key(addr)
        src = self.sources[key]
        if had_session:
            src.sessions -= 1
        else:
            src.handshakes -= 1
            self.handshakes -= 1
        if lifetime_s < self.cfg.seconds("short_session"):
            self._strike(key, addr, now, "repeated short sessions")

    # -- strikes and bans -----------------------------------------------------------

    def _strike(self, key: str, addr: Address, now: float, why: str) -> None:
        src = self._source(key, now)
        window = self.cfg.seconds("strike_window")
        src.strikes.append(now)
        while src.strikes and src.strikes[0] < now - window:
            src.strikes.popleft()
        if len(src.strikes) < self.cfg.strikes or self.bans.covering(addr, now):
            return
        src.strikes.clear()
        if now - src.last_offence > OFFENCE_MEMORY_S:
            src.offences = 0
        src.offences += 1
        src.last_offence = now
        duration = min(self.cfg.seconds("ban") * 2 ** (src.offences - 1),
                       self.cfg.seconds("ban_max"), BAN_MAX_S)
        # The key: an IPv6 offender's whole prefix, as its limits were.
        self.add_ban(key, duration,
                     f"{self.cfg.strikes} strikes in {self.cfg.strike_window} ({why})",
                     offences=src.offences)

    def banned(self, ip: str, now: float | None = None) -> Ban | None:
        """The longest-lasting ban in force over ``ip`` (any spelling), else None."""
        return self.bans.covering(canonical_address(ip), self.clock() if now is None else now)

    def add_ban(self, target: str, duration_s: float, reason: str, offences: int = 1,
                by: str = "relay", force: bool = False) -> Ban:
        """Ban ``target`` (an IP or CIDR) for ``duration_s``; the ban in force on
        that network afterwards. A ban already there that lasts longer stays as it
        is and is returned: a new ban never shortens one. A network as wide as
        WIDE_BAN_MAX_PREFIX needs ``force``."""
        network = parse_network(target)
        if not 0 < duration_s <= BAN_MAX_S:
            raise RelayError(f"ban for {duration_s:g}s: give a duration from 1s to "
                             f"{BAN_MAX_S // 86400}d")
        net = ipaddress.ip_network(network)
        if net.prefixlen <= WIDE_BAN_MAX_PREFIX[net.version] and not force:
            raise RelayError(f"{network} covers {net.num_addresses:,} addresses; ban a "
                             "range this wide only with --force")
        current = self.bans.by_network.get(network)
        until = self.clock() + duration_s
        if current is not None and current.until >= until:
            return current
        ban = Ban(network, until, reason, offences)
        self.journal.append({"op": "add", **asdict(ban)})
        self.bans.put(ban)
        self._compact_if_due()
        self.audit({"action": "ban", "network": network, "until": ban.until,
                    "duration_s": duration_s, "reason": reason, "offences": offences, "by": by})
        return ban

    def remove_ban(self, target: str, by: str = "operator") -> bool:
        network = parse_network(target)
        if network not in self.bans.by_network:
            return False
        self.journal.append({"op": "remove", "network": network})
        self.bans.pop(network)
        self._compact_if_due()
        self.audit({"action": "unban", "network": network, "reason": f"removed by {by}",
                    "by": by})
        return True

    def expire(self) -> None:
        """Drop expired bans (each gets an ``unban`` record) and idle sources."""
        now = self.clock()
        for ban in self.bans.pop_expired(now):
            self.audit({"action": "unban", "network": ban.network, "reason": "expired",
                        "by": "relay"})
        self._compact_if_due()
        window = self.cfg.seconds("strike_window")
        for key in [key for key, s in self.sources.items()
                    if not s.handshakes and not s.sessions
                    and (not s.strikes or s.strikes[-1] < now - window)
                    and now - s.last_offence > OFFENCE_MEMORY_S
                    and s.bucket.tokens + (now - s.bucket.stamp) * s.bucket.rate
                    >= s.bucket.burst]:
            del self.sources[key]

    def _compact_if_due(self) -> None:
        if self.journal.needs_compaction(len(self.bans)):
            self.journal.compact(self.bans.values())

    def summarise(self) -> dict[str, Any] | None:
        """The refusals since the last summary as one audit record (None if none);
        sources are named by their key (an IPv4 address or an IPv6 prefix)."""
        now = self.clock()
        if not self.refusals:
            self.summary_started = now
            return None
        ranked = sorted(self.refusals.items(), key=lambda kv: -sum(kv[1].values()))
        top = {key: dict(c) for key, c in ranked[:SUMMARY_TOP_SOURCES]}
        rest: Counter[str] = Counter()
        for _, c in ranked[SUMMARY_TOP_SOURCES:]:
            rest.update(c)
        record = {"action": "refusals", "from": self.summary_started, "to": now,
                  "total": sum(sum(c.values()) for c in self.refusals.values()),
                  "sources": top}
        if rest:
            record["other_sources"] = {"count": len(ranked) - SUMMARY_TOP_SOURCES,
                                       "refusals": dict(rest)}
        self.refusals.clear()
        self.summary_started = now
        return record
