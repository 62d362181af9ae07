"""Abuse defences at the listener: admission, strikes, bans, refusal summaries.

Pure policy with an injected clock, no sockets: the server asks :meth:`admit`
before any TLS work on an accepted connection and reports what happened with
:meth:`connection_closed`; tests drive it with a fake clock.

- **Connection rate**, per source IP and overall: token buckets.
- **Handshakes in progress** (accept until tunnel or close), per IP and overall.
- **Concurrent sessions per IP.**
- **Strikes**: a connection that closes within ``short_session`` of its accept
  (a connect/disconnect cycle, or a half-finished handshake) and every refusal by
  rate or cap is a strike against its source. ``strikes`` strikes within
  ``strike_window`` ban the source for ``ban`` seconds, doubled on every repeat
  offence (up to ``ban_max``) while offences stay within a day of each other.
- **Bans** persist in ``DATA_DIR/bans.json`` and expire; operators add and remove
  them by IP or CIDR.
- **Refusals** are counted per source and reason and summarised once per
  interval; the audit log never gets one record per refused connection.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from relay.config import AbuseConfig
from relay.errors import RelayError
from relay.fsutil import write_atomic

BANS_FILE = "bans.json"
# An offender's repeat count is forgotten after a day without offences, as
# fail2ban's recidive jail looks back one day.
OFFENCE_MEMORY_S = 86400.0
# Sources listed by name in one refusal summary; the rest are aggregated so a
# distributed flood cannot grow a summary without bound.
SUMMARY_TOP_SOURCES = 50


@dataclass
class Ban:
    network: str  # "198.51.100.7/32" or a wider CIDR
    until: float  # unix time
    reason: str
    offences: int = 1

    def covers(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return ip in ipaddress.ip_network(self.network)


def parse_network(text: str) -> str:
    """An IP or CIDR -> canonical CIDR string; RelayError when it is neither."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise RelayError(f"not an IP address or CIDR: {text!r}") from None


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
    def __init__(self, cfg: AbuseConfig, data_dir: Path, audit: Callable[[dict[str, Any]], None],
                 clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.path = Path(data_dir) / BANS_FILE
        self.audit = audit
        self.clock = clock
        now = clock()
        self.total = TokenBucket(cfg.rate_total, cfg.burst_total, now)
        self.handshakes = 0
        self.sources: dict[str, _Source] = {}
        self.bans: dict[str, Ban] = self._load()
        self.refusals: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.refused_total: Counter[str] = Counter()
        self.summary_started = now

    # -- admission ------------------------------------------------------------------

    def _source(self, ip: str, now: float) -> _Source:
        src = self.sources.get(ip)
        if src is None:
            src = self.sources[ip] = _Source(TokenBucket(self.cfg.rate_per_ip,
                                                         self.cfg.burst_per_ip, now))
        return src

    def admit(self, ip: str) -> str | None:
        """None to let a new connection in (its handshake is then counted until
        :meth:`handshake_done` or :meth:`connection_closed`), else the reason."""
        now = self.clock()
        reason = self._check(ip, now)
        if reason is None:
            self.handshakes += 1
            self._source(ip, now).handshakes += 1
            return None
        self.refusals[ip][reason] += 1
        self.refused_total[reason] += 1
        if reason != "banned":
            self._strike(ip, now, f"refused: {reason}")
        return reason

    def _check(self, ip: str, now: float) -> str | None:
        if self.banned(ip, now):
            return "banned"
        src = self._source(ip, now)
        if not src.bucket.take(now):
            return "rate-per-ip"
        if not self.total.take(now):
            return "rate-total"
        if src.handshakes >= self.cfg.handshakes_per_ip:
            return "handshakes-per-ip"
        if self.handshakes >= self.cfg.handshakes_total:
            return "handshakes-total"
        if src.sessions >= self.cfg.sessions_per_ip:
            return "sessions-per-ip"
        return None

    def handshake_done(self, ip: str) -> None:
        """The connection has a tunnel: it no longer counts as a handshake."""
        src = self.sources[ip]
        src.handshakes -= 1
        src.sessions += 1
        self.handshakes -= 1

    def connection_closed(self, ip: str, lifetime_s: float, had_session: bool) -> None:
        now = self.clock()
        src = self.sources[ip]
        if had_session:
            src.sessions -= 1
        else:
            src.handshakes -= 1
            self.handshakes -= 1
        if lifetime_s < self.cfg.seconds("short_session"):
            self._strike(ip, now, "repeated short sessions")

    # -- strikes and bans -----------------------------------------------------------

    def _strike(self, ip: str, now: float, why: str) -> None:
        src = self._source(ip, now)
        window = self.cfg.seconds("strike_window")
        src.strikes.append(now)
        while src.strikes and src.strikes[0] < now - window:
            src.strikes.popleft()
        if len(src.strikes) < self.cfg.strikes or self.banned(ip, now):
            return
        src.strikes.clear()
        if now - src.last_offence > OFFENCE_MEMORY_S:
            src.offences = 0
        src.offences += 1
        src.last_offence = now
        duration = min(self.cfg.seconds("ban") * 2 ** (src.offences - 1),
                       self.cfg.seconds("ban_max"))
        self.add_ban(ip, duration,
                     f"{self.cfg.strikes} strikes in {self.cfg.strike_window} ({why})",
                     offences=src.offences)

    def banned(self, ip: str, now: float | None = None) -> Ban | None:
        if not self.bans:
            return None
        now = self.clock() if now is None else now
        addr = ipaddress.ip_address(ip)
        for ban in self.bans.values():
            if ban.until > now and ban.covers(addr):
                return ban
        return None

    def add_ban(self, target: str, duration_s: float, reason: str, offences: int = 1,
                by: str = "relay") -> Ban:
        network = parse_network(target)
        ban = Ban(network, self.clock() + duration_s, reason, offences)
        self.bans[network] = ban
        self._save()
        self.audit({"action": "ban", "network": network, "until": ban.until,
                    "duration_s": duration_s, "reason": reason, "offences": offences, "by": by})
        return ban

    def remove_ban(self, target: str, by: str = "operator") -> bool:
        network = parse_network(target)
        ban = self.bans.pop(network, None)
        if ban is None:
            return False
        self._save()
        self.audit({"action": "unban", "network": network, "reason": f"removed by {by}",
                    "by": by})
        return True

    def expire(self) -> None:
        """Drop expired bans (each gets an ``unban`` record) and idle sources."""
        now = self.clock()
        expired = [n for n, b in self.bans.items() if b.until <= now]
        for network in expired:
            del self.bans[network]
            self.audit({"action": "unban", "network": network, "reason": "expired",
                        "by": "relay"})
        if expired:
            self._save()
        window = self.cfg.seconds("strike_window")
        for ip in [ip for ip, s in self.sources.items()
                   if not s.handshakes and not s.sessions
                   and (not s.strikes or s.strikes[-1] < now - window)
                   and now - s.last_offence > OFFENCE_MEMORY_S
                   and s.bucket.tokens + (now - s.bucket.stamp) * s.bucket.rate
                   >= s.bucket.burst]:
            del self.sources[ip]

    def summarise(self) -> dict[str, Any] | None:
        """The refusals since the last summary as one audit record (None if none)."""
        now = self.clock()
        if not self.refusals:
            self.summary_started = now
            return None
        ranked = sorted(self.refusals.items(), key=lambda kv: -sum(kv[1].values()))
        top = {ip: dict(c) for ip, c in ranked[:SUMMARY_TOP_SOURCES]}
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

    # -- persistence ----------------------------------------------------------------

    def _load(self) -> dict[str, Ban]:
        try:
            raw = json.loads(self.path.read_text())
            return {b["network"]: Ban(**b) for b in raw}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise RelayError(f"{self.path}: unreadable ban list ({exc}); fix or remove it") \
                from None

    def _save(self) -> None:
        write_atomic(self.path, json.dumps([asdict(b) for b in self.bans.values()],
                                           indent=1).encode())

    def refuse(self, ip: str, reason: str) -> None:
        """A session refused after admission (the relay is full, no disk to log
        it): counted and summarised like the listener's refusals, but no strike,
        since the client did nothing wrong."""
        self.refusals[ip][reason] += 1
        self.refused_total[reason] += 1
