"""Times: the RFC 3339 forms the logs write, reading them back, and times as an
investigator types them in a chosen time zone.

The logs are in UTC: the connection log and the chains stamp RFC 3339 with
milliseconds (:func:`rfc3339_ms`), the packet log with nanoseconds
(:func:`rfc3339_ns`). :func:`parse_rfc3339` is the one reader of a time a record
holds: it takes only a time with its offset, since a naive one would be read in
this host's zone and name the wrong moment.

An abuse report says "2026-03-29 02:30 in Berlin": :func:`parse_time` turns
``--at``/``--from``/``--to`` text plus ``--tz`` into an aware UTC datetime, and
:func:`format_in`/:func:`format_utc` print times back in both the asked zone and
UTC. It refuses rather than guesses: a local time that happened twice (the clocks
went back) or never (they went forward) is an error naming the candidates, because
picking one silently could name the wrong subscriber.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from relay.errors import RelayError

NS = 1_000_000_000
# "+09:00", "+0900", "-05", "UTC+9": hours up to 23 (the widest real offsets are
# +14:00 and -12:00, but a fixed offset is the investigator's word, not a zone).
_OFFSET = re.compile(r"^(?:UTC|GMT)?([+-])(\d{1,2})(?::?(\d{2}))?$", re.IGNORECASE)
# What the error for an unreadable time shows (datetime.fromisoformat reads both).
_ACCEPTED = "ISO 8601 (2026-03-29T02:30:00+02:00) or YYYY-MM-DD HH:MM[:SS]"
# The times an investigator may name: the logs stamp UTC times since the epoch, and
# a window built around a time (--at with --slack, the packet window) must still
# be a datetime, whose range ends with the year 9999: a year's margin is plenty.
TIME_MIN = datetime(1970, 1, 1, tzinfo=UTC)
TIME_MAX = datetime(9999, 1, 1, tzinfo=UTC)


# ------------------------------------------------------------ the logs' forms


def _wall_ms(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{dt.microsecond // 1000:03d}"


def rfc3339_ms(ts: float) -> str:
    """UTC, millisecond precision, 'Z' suffix: 2026-11-25T21:05:32.123Z."""
    return _wall_ms(datetime.fromtimestamp(ts, UTC)) + "Z"


def rfc3339_ns(ns: int) -> str:
    """UTC, nanosecond precision, 'Z' suffix (the packet log's records)."""
    s, frac = divmod(ns, NS)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{frac:09d}Z"


def parse_rfc3339_ns(text: str) -> int:
    """Nanoseconds since the epoch of a :func:`rfc3339_ns` time (a float would
    lose the nanoseconds)."""
    secs = datetime.fromisoformat(text[:19]).replace(tzinfo=UTC).timestamp()
    return int(secs) * NS + int(text[20:29])


def _fromiso(text: str) -> datetime:
    # RFC 3339 section 5.6 allows a lower-case "z", which fromisoformat refuses.
    return datetime.fromisoformat(text[:-1] + "Z" if text.endswith("z") else text)


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 time as an aware datetime; ValueError unless it is one with its
    offset (``Z`` or ``+hh:mm``)."""
    dt = _fromiso(text)
    if dt.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset")
    return dt


def utc_date(ts: float) -> date:
    """The UTC day of an epoch time (the day files' day)."""
    return datetime.fromtimestamp(ts, UTC).date()


# ------------------------------------------------------------ an investigator's times


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
    try:
        dt = _fromiso(text.strip())
    except ValueError:
        raise RelayError(f"{what} {text!r}: not a valid time; use {_ACCEPTED}") from None
    try:
        if dt.tzinfo is None:
            dt = localize(dt, tz, what)
        dt = dt.astimezone(UTC)
        in_range = TIME_MIN <= dt < TIME_MAX
    except OverflowError:  # a zone's offset took it past year 1 or 9999
        in_range = False
    if not in_range:
        raise RelayError(f"{what} {text!r}: out of range; the logs hold times from "
                         f"{_utc_text(TIME_MIN)} to {_utc_text(TIME_MAX)}")
    return dt


def has_zone(text: str) -> bool:
    """Whether the time ``text`` names its zone (an offset or Z); a time that does
    not is read in ``--tz``, which the commands then say."""
    try:
        return _fromiso(text.strip()).tzinfo is not None
    except ValueError:
        return False


def format_in(ts: float | datetime | None, tz: tzinfo) -> str:
    """RFC 3339 in ``tz`` (milliseconds, as the connection log, and a numeric
    offset); '' for None."""
    if ts is None:
        return ""
    dt = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, UTC)
    local = dt.astimezone(tz)
    return _wall_ms(local) + _fmt_offset(local)


def format_utc(ts: float | datetime | None) -> str:
    """:func:`rfc3339_ms` of an epoch time or an aware datetime; '' for None."""
    if ts is None:
        return ""
    if isinstance(ts, datetime):
        return _wall_ms(ts.astimezone(UTC)) + "Z"
    return rfc3339_ms(ts)
