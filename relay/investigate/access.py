"""``relay logs access``: the directory's access log, searched by time and address.

The records are relay.central.directory's (``list-download``, ``relay-register``,
``relay-refused``, ``relay-expire``) in a connection log (written by
relay.connlog.daylog, read by relay.connlog.reader), so a copy of a directory's
data directory, or the collector's directory for it, is searched the same way.
Each is a point in time: ``--at T`` names the records within ``--slack`` seconds
of T (default :data:`DEFAULT_AT_SLACK_S`), ``--from``/``--to`` a window. Day files
outside the window are not opened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from relay.connlog import reader
from relay.netaddr import AddressError, canonical_ip, hostport
from relay.times import parse_rfc3339, utc_date

ACCESS_ACTIONS = frozenset({"list-download", "relay-register", "relay-refused", "relay-expire"})
# A report names the time a list was fetched by the reporter's clock, and the
# download's record is stamped when the answer was written: a minute covers
# both clocks and a slow client (nginx gives up on a silent client after 60 s).
DEFAULT_AT_SLACK_S = 60.0


def search_access(data_dir: Path, *, lo: float | None, hi: float | None,
                  client_ip: str | None, on_error: Callable[[str], None]
                  ) -> Iterator[dict[str, Any]]:
    """Access records with ``lo <= time < hi`` (None = open) from ``client_ip``
    (any spelling), oldest first."""
    want_ip = canonical_ip(client_ip) if client_ip else None
    first = utc_date(lo).isoformat() if lo is not None else ""
    last = utc_date(hi).isoformat() if hi is not None else "~"
    for day in reader.log_days(data_dir):
        if not first <= day.name <= last:
            continue
        for path, lineno, rec in reader.records(day, on_error):
            if rec.get("action") not in ACCESS_ACTIONS:
                continue
            t = record_time(rec)
            if t is None:
                on_error(f"{path}:{lineno}: no RFC 3339 time, skipped")
                continue
            if (lo is not None and t < lo) or (hi is not None and t >= hi):
                continue
            if want_ip is not None and _client_ip(rec) != want_ip:
                continue
            yield rec


def record_time(rec: dict[str, Any]) -> float | None:
    try:
        return parse_rfc3339(str(rec.get("time"))).timestamp()
    except ValueError:
        return None


def _client_ip(rec: dict[str, Any]) -> str | None:
    client = rec.get("client")
    if not isinstance(client, dict):
        return None
    try:
        return canonical_ip(str(client.get("ip")))
    except AddressError:
        return None


COLUMNS = ("time", "action", "client", "status", "format", "relays", "user_agent", "reason")


def row(rec: dict[str, Any]) -> dict[str, Any]:
    """The table's :data:`COLUMNS` of one record (absent fields empty)."""
    client = rec.get("client") if isinstance(rec.get("client"), dict) else {}
    served = rec.get("served") if isinstance(rec.get("served"), dict) else {}
    relay = rec.get("relay") if isinstance(rec.get("relay"), dict) else {}
    return {"time": rec.get("time"), "action": rec.get("action"),
            "client": hostport(client.get("ip", ""), client.get("port", "")) if client else "",
            "status": rec.get("status", ""), "format": rec.get("format") or "",
            "relays": served.get("count", relay.get("id", "")),
            "user_agent": rec.get("user_agent") or "", "reason": rec.get("reason") or ""}
