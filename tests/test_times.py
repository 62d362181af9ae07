"""relay/times.py: the logs' RFC 3339 forms and reading them back; zones by name and
offset, DST gaps and folds refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from relay.errors import RelayError
from relay.times import (
    format_in,
    format_utc,
    parse_rfc3339,
    parse_rfc3339_ns,
    parse_time,
    parse_zone,
    rfc3339_ms,
    rfc3339_ns,
    utc_date,
)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_tokyo_and_utc() -> None:
    tokyo = parse_zone("Asia/Tokyo")
    assert parse_time("2026-03-29 09:45", tokyo) == utc("2026-03-29 00:45")
    assert parse_time("2026-03-29 09:45:30", tokyo) == utc("2026-03-29 00:45:30")
    assert parse_time("2026-03-29T09:45:30.250", tokyo) == utc("2026-03-29 00:45:30.250")
    assert parse_time("2026-03-29 09:45", parse_zone("UTC")) == utc("2026-03-29 09:45")
    assert parse_time("2026-03-29 09:45", parse_zone(None)) == utc("2026-03-29 09:45")
    # A time that names its zone ignores --tz.
    assert parse_time("2026-03-29T09:45:00Z", tokyo) == utc("2026-03-29 09:45")
    assert parse_time("2026-03-29T09:45:00+02:00", tokyo) == utc("2026-03-29 07:45")
    t = utc("2026-03-29 00:45:00.123")
    assert format_in(t, tokyo) == "2026-03-29T09:45:00.123+09:00"
    assert format_utc(t) == "2026-03-29T00:45:00.123Z"
    assert format_in(t.timestamp(), UTC) == "2026-03-29T00:45:00.123+00:00"


def test_offsets() -> None:
    assert parse_zone("+09:00") == timezone(timedelta(hours=9))
    assert parse_zone("+0930") == timezone(timedelta(hours=9, minutes=30))
    assert parse_zone("-05") == timezone(timedelta(hours=-5))
    assert parse_zone("UTC+9") == timezone(timedelta(hours=9))
    assert parse_time("2026-03-29 09:45", parse_zone("+09:00")) == utc("2026-03-29 00:45")
    for bad in ("Mars/Olympus", "+25:00", "nine", "../../etc/passwd"):
        with pytest.raises(RelayError, match="--tz"):
            parse_zone(bad)


@pytest.mark.parametrize("zone, gap, fold, fold_utc", [
    ("Europe/Berlin", "2026-03-29 02:30", "2026-10-25 02:30",
     ("2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z")),
    ("America/New_York", "2026-03-08 02:30", "2026-11-01 01:30",
     ("2026-11-01T05:30:00Z", "2026-11-01T06:30:00Z")),
])
def test_dst_change(zone: str, gap: str, fold: str, fold_utc: tuple[str, str]) -> None:
    tz = parse_zone(zone)
    with pytest.raises(RelayError, match=f"does not exist in {zone}: the clocks went forward"):
        parse_time(gap, tz, "--at")
    with pytest.raises(RelayError, match=f"ambiguous in {zone}") as exc:
        parse_time(fold, tz, "--at")
    assert all(t in str(exc.value) for t in fold_utc)
    # With the offset the reader picks one instant; either side of the change works.
    early = fold_utc[0]
    off = "-04:00" if zone == "America/New_York" else "+02:00"
    assert parse_time(fold.replace(" ", "T") + off, tz) == utc(early[:-1])
    assert parse_time(fold, parse_zone("UTC")) == utc(fold)
    before = parse_time(gap.replace("02:30", "01:59:59"), tz)
    after = parse_time(gap.replace("02:30", "03:00"), tz)
    assert after - before == timedelta(seconds=1)  # the hour between never existed


def test_invalid_times() -> None:
    tz = parse_zone("Europe/Berlin")
    for bad in ("2026-02-30 10:00", "2026-13-01 00:00", "yesterday", "2026-03-29 25:00", ""):
        with pytest.raises(RelayError, match="not a valid time"):
            parse_time(bad, tz, "--at")


def test_the_logs_forms_read_back() -> None:
    t = 86400 * 20000 + 10.5
    assert rfc3339_ms(t) == "2024-10-04T00:00:10.500Z" == format_utc(t)
    assert format_utc(datetime.fromtimestamp(t, UTC)) == rfc3339_ms(t)
    assert utc_date(t).isoformat() == "2024-10-04"
    ns = 1_774_745_100_123_456_789
    assert rfc3339_ns(ns) == "2026-03-29T00:45:00.123456789Z"
    assert parse_rfc3339_ns(rfc3339_ns(ns)) == ns  # no float on the way
    assert parse_rfc3339(rfc3339_ms(t)).timestamp() == t
    for text in ("2026-03-29T09:45:00+09:00", "2026-03-29T00:45:00Z", "2026-03-29t00:45:00z"):
        assert parse_rfc3339(text) == utc("2026-03-29 00:45")
    # A record's time without its offset would be read in this host's zone: refused.
    for bad in ("2026-03-29T00:45:00", "2026-02-30T00:00:00Z", "", "None", "\x1b[2J"):
        with pytest.raises(ValueError):
            parse_rfc3339(bad)


def test_times_past_the_logs_range_are_refused_not_overflowed() -> None:
    """Year 1 in Tokyo or year 9999 west of Greenwich do not exist in UTC: one
    error naming the option (before, an OverflowError traceback)."""
    tokyo = parse_zone("Asia/Tokyo")
    for text, tz in (("0001-01-01", tokyo), ("0001-01-01T00:00+09:00", UTC),
                     ("9999-12-31T23:00-05:00", UTC), ("1969-12-31T23:59:59Z", UTC),
                     ("9999-06-01T00:00Z", UTC)):
        with pytest.raises(RelayError, match=r"^--at .*: out of range; the logs hold times "
                                             r"from 1970-01-01T00:00:00Z"):
            parse_time(text, tz, "--at")
    assert parse_time("1970-01-01T09:00", tokyo) == utc("1970-01-01 00:00")
