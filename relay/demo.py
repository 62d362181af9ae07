"""``relay demo``: the relay end to end in three network namespaces.

Builds client / relay / internet namespaces (see relay.netns), starts nginx in
"internet", ``relay serve`` in "relay" with NAT towards "internet" only, connects
the stock openconnect client from "client", fetches a page through the tunnel,
then prints the connection log and what the web server saw. Everything is torn
down at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from relay import config
from relay.connlog import reader
from relay.errors import RelayError
from relay.netns import INTERNET_IP, Topology, relay_ip, wait_for
from relay.packetlog import segments

# Packet records printed: enough to show a handshake and a request.
DEMO_PACKET_LINES = 6


def _say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def demo_config(data: Path, uplink: str) -> str:
    """The demo relay's config, made as relay config example makes one: every key
    with what it does, the demo's own values set."""
    return config.example({"server": {"listen": "0.0.0.0:443", "uplink": uplink},
                           "logs": {"data_dir": str(data)}})


def run_demo(keep_going: bool = False) -> int:
    if os.geteuid() != 0:
        raise RelayError("the demo builds network namespaces: run it as root")
    topo = Topology(prefix=f"rdemo{os.getpid() % 10000}", clients=1)
    _say("building namespaces: client, relay, internet (veth pairs, 198.18.0.0/15)")
    topo.create()
    try:
        data = topo.workdir / "relay-data"
        _say(f"starting nginx on {INTERNET_IP}:80 in {topo.internet_ns}")
        access = topo.start_web()
        _say(f"starting relay serve in {topo.relay_ns} (TAP relay0, NAT towards "
             f"{topo.uplink} only, data in {data})")
        relay = topo.start_relay(data, config=demo_config(data, topo.uplink))
        _say(f"connecting the stock openconnect client from {topo.client_ns(1)} "
             f"to https://{relay_ip(1)}/")
        client = topo.connect_openconnect(1, data)
        _say(f"tunnel up: the client has {topo.tunnel_ip(1)}; fetching http://{INTERNET_IP}/")
        page = topo.curl(1, "/", "-A", "relay-demo/1.0 (curl)")
        print(page.strip())
        if keep_going:
            _say(f"running; try: ip netns exec {topo.client_ns(1)} curl http://{INTERNET_IP}/ "
                 "(Ctrl-C to stop)")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        _say("disconnecting the client and stopping the relay")
        client.send_signal(signal.SIGINT)
        client.wait(15)
        wait_for(lambda: sum(1 for r in reader.iter_records(data)
                             if r.get("action") == "disconnect") >= 1, 15, "the disconnect record")
        os.killpg(relay.pid, signal.SIGTERM)
        relay.wait(15)
        _say("connection log (relay logs connections --json)")
        for rec in reader.iter_records(data):
            print(json.dumps(rec, indent=2))
        records = list(segments.iter_records(data))
        _say(f"packet log: {len(records)} TCP header records; the first "
             f"{min(len(records), DEMO_PACKET_LINES)} (relay logs packets --json)")
        for rec in records[:DEMO_PACKET_LINES]:
            print(json.dumps(rec))
        _say("what the web server saw (nginx access log; the User-Agent ends in the "
             "session's tag)")
        print(access.read_text().strip())
        return 0
    except (RelayError, subprocess.TimeoutExpired) as exc:
        print(f"relay demo failed: {exc}", file=sys.stderr)
        for name in ("relay.log", "openconnect-1.log", "nginx-error.log"):
            text = topo.log(name).strip()
            if text:
                print(f"--- {name} ---\n{text[-3000:]}", file=sys.stderr)
        return 1
    finally:
        _say("tearing down the namespaces")
        started = time.monotonic()
        topo.destroy()
        print(f"    done in {time.monotonic() - started:.1f} s")
