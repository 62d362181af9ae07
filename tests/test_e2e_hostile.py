"""Hostile input at the listener: each attempt is dropped with a clear log line,
and a real openconnect session in another namespace keeps working throughout."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import records, scrape

from relay.connlog import daylog
from relay.netns import Topology, relay_ip, run, wait_for

pytestmark = pytest.mark.netns

HOSTILE = str(Path(__file__).with_name("hostile_client.py"))

# scenario -> what the relay's log says about it
SCENARIOS = {
    "tls-garbage": "TLS handshake failed",
    "plain-http": "TLS handshake failed",
    "half-hello": "TLS handshake failed",
    "stall": "TLS handshake failed",
    "wrong-path": "unknown path '/admin/config.php'",
    # Both raised out of the parser before (UnicodeDecodeError, ValueError).
    "non-ascii-target": "bad request line b'GET /\\xff HTTP/1.1'",
    "bad-authority": "unknown path '//[x'",
    "oversized-header": "request head over 16384 bytes",
    "truncated-header": "connection closed mid-request",
    "bad-cookie": "CONNECT with an unknown or expired cookie",
    "bad-cstp": "bad CSTP magic",
}


def test_hostile_input_is_dropped_and_others_keep_serving(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(2)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data, 'handshake_timeout = "2s"\nlogin_timeout = "4s"')
    honest = topo.connect_openconnect(2, data)
    topo.curl(2, "/", "-A", "before")

    for scenario, expected in SCENARIOS.items():
        before = topo.log("relay.log")
        result = run([sys.executable, HOSTILE, scenario, relay_ip(1), "443"], topo.client_ns(1),
                     check=False, timeout=60)
        assert result.returncode == 0, f"{scenario}: {result.stderr}"
        assert "closed" in result.stdout, f"{scenario}: {result.stdout}"
        wait_for(lambda e=expected, b=before: e in topo.log("relay.log")[len(b):], 10,
                 f"the relay to log {expected!r} for {scenario}")
        new_lines = topo.log("relay.log")[len(before):]
        assert "Traceback" not in new_lines, new_lines
        # The honest session is untouched by each attack.
        topo.curl(2, f"/?after-{scenario}")

    assert honest.poll() is None
    text = topo.access_log(*(f"/?after-{s} " for s in SCENARIOS))
    assert all(f"/?after-{s} " in text for s in SCENARIOS)
    # The one hostile client that got a tunnel (bad-cstp) has both records, and
    # the disconnect says why.
    recs = list(daylog.iter_records(data))
    hostile = [r for r in recs if r["client"]["ip"] == "198.18.1.2"]
    assert [r["action"] for r in hostile] == ["connect", "disconnect"]
    assert hostile[1]["reason"] == "protocol-error"
    assert "bad CSTP magic" in hostile[1]["error"]
    # The refusals that happen after TLS carry an HTTP status.
    for scenario, status in (("oversized-header", "431"), ("wrong-path", "404"),
                             ("bad-cookie", "401"), ("non-ascii-target", "400"),
                             ("bad-authority", "404")):
        out = run([sys.executable, HOSTILE, scenario, relay_ip(1), "443"],
                  topo.client_ns(1)).stdout
        assert f"HTTP/1.1 {status}" in out, out


# What the relay may grow by while a client floods it with DPD requests and
# never reads the answers: the link's cap (cstp_link.CLIENT_WRITE_HARD_LIMIT,
# 5 MiB) plus TLS buffers and allocator slack. Measured: +18 MiB; without the
# cap the relay grew by 476 MiB for 256 MiB sent.
NON_READER_RSS_GROWTH_MAX = 48 * 1024 * 1024
FLOOD_BYTES = 256 * 1024 * 1024


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_client_that_never_reads_is_closed_in_bounded_memory_and_client_text_is_cleaned(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(2)
    data = topo.workdir / "data"
    topo.start_web()
    relay = topo.start_relay(data)
    honest = topo.connect_openconnect(2, data)
    topo.curl(2, "/?before")

    # A session whose client declares itself with control and bidi characters.
    out = run([sys.executable, HOSTILE, "hostile-strings", relay_ip(1), "443"],
              topo.client_ns(1), timeout=60).stdout
    assert "closed" in out, out
    [_, hostile] = [r for r in records(data, "connect")]
    assert hostile["client"]["ip"] == "198.18.1.2"
    assert hostile["client_software"] == {"name": "Evil Agent", "version": "v9.1",
                                          "id": "devid", "platform": "linux-64",
                                          "hostname": "host name"}
    [bye] = [r for r in records(data, "disconnect")
             if r["session_id"] == hostile["session_id"]]
    assert bye["reason"] == "client-disconnect: bye[2Jevil forged"

    # A tunnel, then DPD requests as fast as TCP takes them, never a read.
    Path(f"/proc/{relay.pid}/clear_refs").write_text("5")  # peak RSS := RSS now
    before = status_kib(relay.pid, "VmRSS") * 1024
    out = run([sys.executable, HOSTILE, f"dpd-flood:{FLOOD_BYTES}", relay_ip(1), "443"],
              topo.client_ns(1), timeout=120).stdout
    sent = re.fullmatch(r"closed after sending (\d+) bytes \(\w+\)\n", out)
    assert sent is not None, out
    growth = status_kib(relay.pid, "VmHWM") * 1024 - before
    assert growth < NON_READER_RSS_GROWTH_MAX, f"the relay grew by {growth >> 20} MiB"
    assert int(sent.group(1)) < FLOOD_BYTES // 4
    wait_for(lambda: "client does not read" in topo.log("relay.log"), 10,
             "the relay to log the non-reader")
    assert re.search(r"dropped 198\.18\.1\.2:\d+: client does not read: \d+ bytes queued for "
                     r"it \(at most 5242880\)", topo.log("relay.log"))
    assert "Traceback" not in topo.log("relay.log")
    flood = records(data, "connect")[-1]
    [closed] = [r for r in records(data, "disconnect") if r["session_id"] == flood["session_id"]]
    assert closed["reason"] == "client-not-reading"
    assert scrape(topo)[("relay_peer_closed_total", (("reason", "client-not-reading"),))] == 1

    # The honest session never noticed.
    topo.curl(2, "/?after")
    assert honest.poll() is None
    topo.access_log("/?before ", "/?after ")
