"""Times as an investigator types them, read in a chosen time zone.

An abuse report says "2026-03-29 02:30 in Berlin"; the logs are in UTC. This module
turns ``--at``/``--from``/``--to`` text plus ``--tz`` into an aware UTC datetime and
prints times back in both the asked zone and UTC. It refuses rather than guesses:
a local time that happened twice (the clocks went back) or never (they went
forward) is an error naming the candidates, because picking one silently could
name the wrong subscriber.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from relay.errors import RelayError

# "+09:00", "+0900", "-05", "UTC+9": hours up to 23 (the widest real offsets are
# +14:00 and -12:00, but a fixed offset is the investigator's word, not a zone).
_OFFSET = re.compile(r"^(?:UTC|GMT)?([+-])(\d{1,2})(?::?(\d{2}))?$", re.IGNORECASE)
# What the error for an unreadable time shows (datetime.fromisoformat reads both).
_ACCEPTED = "ISO 8601 (2026-03-29T02:30:00+02:00) or YYYY-MM-DD HH:MM[:SS]"


def parse_zone(text: str | None) -> tzinfo:
    """An IANA zone name (Asia/Tokyo), UTC/Z, or a fixed offset (+09:00)."""
    if text is None or text.strip().upper() in ("", "UTC", "Z", "GMT"):
        return UTC
    text = text.strip()
    m = _OFFSET.match(text)
    if m:
        sign, hours, minutes = m.group(1), int(m.group(2)), int(m.group(3) or 0)
        if hours > 23 or minutes > 59:
            raise RelayError(f"--tz {text}: offset out of range")
        delta = timedelta(hours=hours, minutes=minutes)
        return timezone(-delta if sign == "-" else delta)
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise RelayError(f"--tz {text}: not an IANA time zone (e.g. Asia/Tokyo, "
                         "Europe/Berlin, UTC) nor an offset (e.g. +09:00)") from None


def zone_name(tz: tzinfo) -> str:
    return getattr(tz, "key", None) or str(tz)


def _utc_text(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def localize(naive: datetime, tz: tzinfo, what: str) -> datetime:
    """``naive`` wall-clock time in ``tz``; RelayError when it is ambiguous or
    does not exist there."""
    early = naive.replace(tzinfo=tz, fold=0)
    late = naive.replace(tzinfo=tz, fold=1)
    if early.utcoffset() == late.utcoffset():
        return early
    name = zone_name(tz)
    # A wall time in a gap does not survive the round trip through UTC.
    if early.astimezone(UTC).astimezone(tz).replace(tzinfo=None) != naive:
        raise RelayError(
            f"{what} {naive:%Y-%m-%d %H:%M:%S} does not exist in {name}: the clocks went "
            f"forward over it (offset {_fmt_offset(early)} -> {_fmt_offset(late)}); "
            f"give a time before or after the change, or an explicit offset")
    a, b = early.astimezone(UTC), late.astimezone(UTC)
    raise RelayError(
        f"{what} {naive:%Y-%m-%d %H:%M:%S} is ambiguous in {name}: the clocks went back, "
        f"so it happened twice, at {_utc_text(a)} ({_fmt_offset(early)}) and at "
        f"{_utc_text(b)} ({_fmt_offset(late)}); add the offset, e.g. "
        f"{naive:%Y-%m-%dT%H:%M:%S}{_fmt_offset(early)}")


def _fmt_offset(dt: datetime) -> str:
    off = dt.utcoffset() or timedelta(0)
    sign = "-" if off < timedelta(0) else "+"
    minutes = abs(int(off.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def parse_time(text: str, tz: tzinfo, what: str = "time") -> datetime:
    """``text`` as an aware UTC datetime; a time without a zone is read in ``tz``."""
    raw = text.strip()
    try:
        dt = datetime.fromisoformat(raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw)
    except ValueError:
        raise RelayError(f"{what} {text!r}: not a valid time; use {_ACCEPTED}") from None
    if dt.tzinfo is None:
        dt = localize(dt, tz, what)
    return dt.astimezone(UTC)


def format_in(ts: float | datetime | None, tz: tzinfo) -> str:
    """RFC 3339 in ``tz`` (milliseconds, as the connection log, and a numeric
    offset); '' for None."""
    if ts is None:
        return ""
    dt = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, UTC)
    local = dt.astimezone(tz)
    return local.strftime("%Y-%m-%dT%H:%M:%S") + f".{local.microsecond // 1000:03d}" \
        + _fmt_offset(local)


def format_utc(ts: float | datetime | None) -> str:
    if ts is None:
        return ""
    dt = (ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, UTC)).astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{dt.microsecond // 1000:03d}Z"
