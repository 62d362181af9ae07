"""Hostile input at the listener: each attempt is dropped with a clear log line,
and a real openconnect session in another namespace keeps working throughout."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from relay import connlog
from relay.netns import Topology, relay_ip, run, wait_for

HOSTILE = str(Path(__file__).with_name("hostile_client.py"))

# scenario -> what the relay's log says about it
SCENARIOS = {
    "tls-garbage": "TLS handshake failed",
    "plain-http": "TLS handshake failed",
    "half-hello": "TLS handshake failed",
    "stall": "TLS handshake failed",
    "wrong-path": "unknown path '/admin/config.php'",
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
    recs = list(connlog.iter_records(data))
    hostile = [r for r in recs if r["client"]["ip"] == "198.18.1.2"]
    assert [r["action"] for r in hostile] == ["connect", "disconnect"]
    assert hostile[1]["reason"] == "protocol-error"
    assert "bad CSTP magic" in hostile[1]["error"]
    # The refusals that happen after TLS carry an HTTP status.
    for scenario, status in (("oversized-header", "431"), ("wrong-path", "404"),
                             ("bad-cookie", "401")):
        out = run([sys.executable, HOSTILE, scenario, relay_ip(1), "443"],
                  topo.client_ns(1)).stdout
        assert f"HTTP/1.1 {status}" in out, out
