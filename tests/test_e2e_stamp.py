"""The User-Agent stamp and destinations end to end, with the stock openconnect
client and nginx: what the web server logs points back to one session."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest
from conftest import wait_records

from relay.netns import INTERNET_IP, WEB_TLS_NAME, Topology, run

pytestmark = pytest.mark.netns

PIPELINED = (
    "import socket\n"
    f"s = socket.create_connection(('{INTERNET_IP}', 80), timeout=10)\n"
    "s.sendall(b'GET /?one HTTP/1.1\\r\\nHost: pipe.example.test\\r\\n"
    "User-Agent: pipeline-one/1.0\\r\\n\\r\\nGET /?two HTTP/1.1\\r\\nHost: pipe.example.test\\r\\n"
    "User-Agent: pipeline-two/2.0 (X11)\\r\\nConnection: close\\r\\n\\r\\n')\n"
    "data = b''\n"
    "while chunk := s.recv(65536):\n"
    "    data += chunk\n"
    "print(data.count(b'HTTP/1.1 200'))\n"
)


def logged_agents(access_text: str) -> dict[str, str]:
    """request target -> User-Agent as nginx logged it."""
    out = {}
    for line in access_text.splitlines():
        m = re.match(r'\S+ "GET (\S+) HTTP/1.1" \d+ "([^"]*)"', line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_user_agents_carry_the_session_tag_and_destinations_are_logged(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(1)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data)
    client = topo.connect_openconnect(1, data)
    [connect] = wait_records(data, "connect", 1)
    tag = connect["session_id"][:8]

    topo.curl(1, "/?curl", "-A", "curl-stamp/1.0 (Linux)")
    topo.curl(1, "/?lower", "-H", "user-agent: lower-case-agent/3")
    topo.curl(1, "/?short", "-A", "tiny")
    assert run([sys.executable, "-c", PIPELINED], topo.client_ns(1)).stdout.strip() == "2"
    topo.curl(1, "/?tls", "-A", "https-agent/1.0", https=True)

    agents = logged_agents(topo.access_log("/?curl", "/?lower", "/?short", "/?one", "/?two",
                                           "/?tls"))
    assert agents["/?curl"] == "curl-stamp/1.0 (Linux)"[:-8] + tag
    assert agents["/?lower"] == "lower-case-agent/3"[:-8] + tag
    assert agents["/?short"] == tag[:4]
    assert agents["/?one"] == "pipeline-one/1.0"[:-8] + tag
    assert agents["/?two"] == "pipeline-two/2.0 (X11)"[:-8] + tag
    assert agents["/?tls"] == "https-agent/1.0"  # HTTPS passes unchanged

    # ua-lookup finds the session from what the web server logged.
    out = subprocess.run([sys.executable, "-m", "relay.cli", "logs", "ua-lookup", "--json",
                          "--data-dir", str(data), agents["/?two"]],
                         capture_output=True, text=True, check=True).stdout
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row["session_id"] == connect["session_id"]
    assert row["client_ip"] == connect["client"]["ip"]
    assert row["client_port"] == connect["client"]["port"] and row["server_id"] == "relay-1"
    assert row["packets"] > 0  # its packets, counted in the packet log

    client.send_signal(signal.SIGINT)
    client.wait(15)
    [disconnect] = wait_records(data, "disconnect", 1)
    dests = {(d["scheme"], d["host"], d["ip"], d["port"]) for d in disconnect["destinations"]}
    assert ("http", INTERNET_IP, INTERNET_IP, 80) in dests
    assert ("http", "pipe.example.test", INTERNET_IP, 80) in dests
    assert ("https", WEB_TLS_NAME, INTERNET_IP, 443) in dests
    assert len(disconnect["destinations"]) == len(dests)  # deduplicated
    assert disconnect["destinations_dropped"] == 0
    after = subprocess.run([sys.executable, "-m", "relay.cli", "logs", "ua-lookup",
                            "--data-dir", str(data), agents["/?curl"]],
                           capture_output=True, text=True, check=True).stdout
    assert connect["session_id"] in after and disconnect["time"][:19] in after
