"""``relay demo`` (what ``./run.sh demo`` runs after the set-up) as a smoke test:
it builds its namespaces, fetches a page through the stock openconnect client,
prints the records and the web server's log, and leaves nothing behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import require_root_and_tools

from relay.netns import run

pytestmark = pytest.mark.netns

UA = "relay-demo/1.0 (curl)"  # what the demo's curl sends
TAG_LEN = 8


def test_demo_fetches_a_page_stamps_it_and_prints_the_records() -> None:
    require_root_and_tools()
    proc = subprocess.run([sys.executable, "-m", "relay.cli", "demo"], capture_output=True,
                          text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "<h1>hello from the internet namespace</h1>" in out
    # The connection log, printed as indented JSON objects: a connect and a disconnect
    # of one session ...
    connlog = out.split("==> connection log", 1)[1].split("\n", 1)[1].split("==> packet log")[0]
    decoder, objects, pos = json.JSONDecoder(), [], 0
    while (start := connlog.find("{", pos)) != -1:
        obj, pos = decoder.raw_decode(connlog, start)
        objects.append(obj)
    connect, disconnect = [r for r in objects if "session_id" in r]
    assert (connect["action"], disconnect["action"]) == ("connect", "disconnect")
    session = connect["session_id"]
    assert disconnect["session_id"] == session and connect["protocol"] == "SSL-VPN"
    # ... and the audit record of the packet-log segment closed at the relay's stop.
    assert "packetlog-rotate" in [r["action"] for r in objects]
    # Packet records of that session, one JSON object a line.
    packets = [json.loads(line) for line in out.splitlines() if line.startswith('{"time"')]
    assert packets and {p["session_id"] for p in packets} == {session}
    # The web server's access log: the User-Agent's tail is the session's tag.
    assert f'"{UA[:-TAG_LEN]}{session[:TAG_LEN]}"' in out
    # Torn down: none of its namespaces is left.
    [prefix] = set(re.findall(r"\b(rdemo\d+)-relay\b", out))
    assert prefix not in run(["ip", "netns", "list"]).stdout
