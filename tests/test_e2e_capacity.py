"""A full relay, end to end: with ``[server] max_sessions = 1`` a second stock
client is refused with a reason it prints (openconnect: 503 + X-Reason; openvpn:
AUTH_FAILED,TEMP), the refusal is a metric and an audit summary, and the relay
keeps serving (the first session, then the second once the first has left)."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable

import pytest
from conftest import records, scrape, wait_records

from relay.clientconfig import openvpn_config
from relay.config import Config
from relay.netns import Topology, client_ip, relay_ip, wait_for

pytestmark = pytest.mark.netns

FULL = "the relay is full; try again later or another relay"


def test_a_full_relay_refuses_cleanly_and_keeps_serving(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(2)
    data = topo.workdir / "data"
    topo.start_web()
    topo.start_relay(data, "max_sessions = 1", abuse_keys='summary_interval = "1s"')
    first = topo.connect_openconnect(1, data)

    second = topo.connect_openconnect(2, data, wait=False)
    wait_for(lambda: second.poll() is not None, 30, "the second openconnect to give up")
    assert f"VPN service unavailable; reason: {FULL}" in topo.log("openconnect-2.log")
    assert topo.tunnel_ip(2) is None
    assert re.search(rf"refused a session from {client_ip(2)}:\d+: {FULL}",
                     topo.log("relay.log"))

    # OpenVPN asks through the same core and is told to come back later.
    conf = topo.workdir / "client-2.ovpn"
    conf.write_text(openvpn_config(Config().with_data_dir(data), data, "tcp", "tun",
                                   remote=relay_ip(2)))
    openvpn = topo.spawn(topo.client_ns(2), ["openvpn", "--config", str(conf)], "openvpn-2.log")
    wait_for(lambda: f"AUTH_FAILED,TEMP:{FULL}" in topo.log("openvpn-2.log"), 30,
             "openvpn to be refused")
    openvpn.send_signal(signal.SIGTERM)
    openvpn.wait(15)

    # Each refusal is counted, and summarised per source into the audit log.
    refused = scrape(topo)[("relay_refusals_total", (("reason", "max-sessions"),))]
    assert refused >= 2

    def summarised() -> float:
        return sum(r["sources"].get(client_ip(2), {}).get("max-sessions", 0)
                   for r in records(data, "refusals"))

    wait_for(lambda: summarised() == refused, 10, "the audit summaries of the refusals")
    assert "Traceback" not in topo.log("relay.log")

    # The relay keeps serving: the first session works, and once it has left
    # the second client gets the freed slot.
    topo.curl(1, "/?first")
    first.send_signal(signal.SIGINT)
    first.wait(15)
    wait_records(data, "disconnect", 1)
    topo.connect_openconnect(2, data, name="openconnect-2-again.log")
    topo.curl(2, "/?second")
    topo.access_log("/?first ", "/?second ")
