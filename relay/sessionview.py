"""A session as every command prints it: one JSON schema for ``relay logs
search``, ``relay logs ua-lookup`` and ``relay sessions`` (live), built from the
session's connection-log records (or, while it is open, its connect record and
its counters so far).

Fields, in this order: ``session_id``, ``server_id``, ``server_ip``,
``client_ip``, ``client_port``, ``client_hostname``, ``client_software`` (name
and version), ``protocol``, ``virtual_ip``, ``connect``/``disconnect`` (RFC 3339
in the asked zone) with ``connect_utc``/``disconnect_utc``, ``reason``,
``packets_in``/``packets_out``/``bytes_in``/``bytes_out`` (``in`` = from the
client) and ``destinations`` (the HTTP Host / TLS SNI reached, as the disconnect
record lists them). A value that is not known, or of the wrong type in a record
(an older relay, a forged copy), is null.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import tzinfo
from typing import Any

from relay.times import format_in, format_utc, parse_rfc3339


def record_time(text: Any) -> float | None:
    """Epoch seconds of a record's RFC 3339 time; None unless it is one."""
    if not isinstance(text, str):
        return None
    try:
        return parse_rfc3339(text).timestamp()
    except ValueError:
        return None


def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def session_json(session_id: str, connect: Mapping[str, Any] | None,
                 disconnect: Mapping[str, Any] | None, tz: tzinfo, *,
                 counters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The session ``session_id`` from its records (either may be missing: a log
    day lost); ``counters`` are an open session's (sessions.Session.counters),
    else the disconnect record's are used."""
    records = [r for r in (disconnect, connect) if r]

    def value(key: str) -> Any:  # the disconnect record's first: the final word
        for rec in records:
            if rec.get(key) is not None:
                return rec[key]
        return None

    client, server, sw = _obj(value("client")), _obj(value("server")), \
        _obj(value("client_software"))
    start = record_time((connect or {}).get("time") or (disconnect or {}).get("connect_time"))
    end = record_time(disconnect.get("time")) if disconnect else None
    counts = counters if counters is not None else (disconnect or {})
    packets, octets = _obj(counts.get("packets")), _obj(counts.get("bytes"))
    destinations = counts.get("destinations")
    return {
        "session_id": session_id,
        "server_id": server.get("id"), "server_ip": server.get("ip"),
        "client_ip": client.get("ip"), "client_port": client.get("port"),
        "client_hostname": client.get("hostname"),
        "client_software": " ".join(str(v) for v in (sw.get("name"), sw.get("version"))
                                    if v) or None,
        "protocol": value("protocol"), "virtual_ip": value("virtual_ip"),
        "connect": format_in(start, tz) or None, "connect_utc": format_utc(start) or None,
        "disconnect": format_in(end, tz) or None, "disconnect_utc": format_utc(end) or None,
        "reason": (disconnect or {}).get("reason"),
        "packets_in": _int(packets.get("in")), "packets_out": _int(packets.get("out")),
        "bytes_in": _int(octets.get("in")), "bytes_out": _int(octets.get("out")),
        "destinations": destinations if isinstance(destinations, list) else None,
    }
