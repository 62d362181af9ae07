"""Shipping end to end against the real relay: a session whose disconnect record
would have been 80 kB (256 HTTP requests with distinct 255-character Host names,
through the stock openconnect client and nginx) and the records after it all
reach a real ``relay collector``; and a forged sender with a valid certificate
for another relay writes nothing into this relay's store."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import records, wait_records
from shiputil import make_pki, read_day_dir

from relay.netns import INTERNET_IP, Topology, run, wait_for
from relay.protocols import syslog5424 as s5
from relay.serve.hotpath_py import HOST_MAX

pytestmark = pytest.mark.netns

HOSTS = 256
# One keep-alive connection, one request per distinct Host, each answered before
# the next is sent (so each request is a packet of its own for the hot path).
REQUESTS = f"""
import http.client, sys
conn = http.client.HTTPConnection("{INTERNET_IP}", 80, timeout=20)
ok = 0
for i in range({HOSTS}):
    host = f"h{{i:03d}}-" + "x" * ({HOST_MAX} - 5 - len(".test")) + ".test"
    conn.request("GET", f"/?{{i}}", headers={{"Host": host, "User-Agent": "e2e-hosts/1.0"}})
    resp = conn.getresponse()
    resp.read()
    ok += resp.status == 200
print(ok)
"""
# A TLS client with relay-2's valid certificate, sending prepared frames to the
# collector and waiting for its confirmation.
FORGER = """
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.load_cert_chain(sys.argv[3], sys.argv[4])
with socket.create_connection(("127.0.0.1", int(sys.argv[5])), timeout=10) as raw, \\
        ctx.wrap_socket(raw, server_hostname="localhost") as tls:
    tls.sendall(open(sys.argv[1], "rb").read())
    tls.unwrap()
"""


def collector_cmd(collected: Path, pki: Any, port: int) -> list[str]:
    return [sys.executable, "-m", "relay.cli", "collector", "--listen", f"127.0.0.1:{port}",
            "--data-dir", str(collected), "--cert", str(pki.server_cert), "--key",
            str(pki.server_key), "--ca", str(pki.ca)]


def listening(topo: Topology, port: int) -> bool:
    return f"127.0.0.1:{port}" in run(["ss", "-Hltn"], topo.relay_ns).stdout


def frames(recs: list[dict[str, Any]]) -> bytes:
    return b"".join(s5.frame(s5.format_record(r, hostname="relay-1")) for r in recs)


def test_a_256_host_session_ships_whole_and_a_forged_sender_lands_nowhere(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(1)
    data = topo.workdir / "data"
    pki = make_pki(topo.workdir / "pki")
    collected = topo.workdir / "collected"
    store = collected / "relay-1"
    topo.start_web()
    # The relay ships to 6514, where no collector listens yet: its records wait.
    forward = (f'[forward]\ncollector = "localhost:6514"\nca = "{pki.ca}"\n'
               f'cert = "{pki.client_cert}"\nkey = "{pki.client_key}"\nretry_max = "2s"\n')
    topo.start_relay(data, extra_tables=forward)
    client = topo.connect_openconnect(1, data)
    [connect] = wait_records(data, "connect", 1)

    # The forger (relay-2's certificate) reaches the collector first, on another
    # port: relay-1's records with their real ids (one altered), far-future and
    # impossible days; and, as itself, relay-1's id and odd days again.
    forged_connect = {**connect, "client": {**connect["client"], "ip": "203.0.113.66"}}
    odd = [{**connect, "id": f"{i:024x}", "time": t} for i, t in enumerate(
        ("2099-01-01T00:00:00.000Z", "2026-13-45T00:00:00.000Z"))]
    as_relay2 = [{**r, "server": {"id": "relay-2"}} for r in [connect, *odd]]
    forged = topo.workdir / "forged.bin"
    forged.write_bytes(frames([forged_connect, *odd, *as_relay2]))
    first = topo.spawn(topo.relay_ns, collector_cmd(collected, pki, 6515), "collector-1.log")
    wait_for(lambda: listening(topo, 6515), 20, "the collector on 6515")
    run([sys.executable, "-c", FORGER, str(forged), str(pki.ca), str(pki.other_relay_cert),
         str(pki.other_relay_key), "6515"], topo.relay_ns)
    first.send_signal(signal.SIGTERM)
    first.wait(30)

    topo.spawn(topo.relay_ns, collector_cmd(collected, pki, 6514), "collector.log")
    wait_for(lambda: listening(topo, 6514), 20, "the collector on 6514")
    wait_for(lambda: connect in read_day_dir(store), 30, "the real connect record")

    # 256 requests, each to a distinct 255-character Host.
    out = run([sys.executable, "-c", REQUESTS], topo.client_ns(1), timeout=120)
    assert out.stdout.strip() == str(HOSTS), out.stderr
    client.send_signal(signal.SIGINT)
    client.wait(15)
    [disconnect] = wait_records(data, "disconnect", 1)
    hosts = [d for d in disconnect["destinations"] if d["host"].endswith(".test")]
    assert hosts and len(hosts) + disconnect["destinations_dropped"] == HOSTS
    assert len(s5.frame(s5.format_record(disconnect, hostname="relay-1"))) \
        <= s5.COLLECTOR_MAX_MESSAGE_SIZE
    # A record after it: another session.
    again = topo.connect_openconnect(1, data, name="openconnect-again.log")
    later = wait_records(data, "connect", 2)[1]
    wait_for(lambda: {disconnect["id"], later["id"]} <= {r["id"] for r in read_day_dir(store)},
             60, "the disconnect record and the later one at the collector")
    again.send_signal(signal.SIGINT)
    again.wait(15)

    got = read_day_dir(store)
    assert [r for r in got if r["id"] == disconnect["id"]] == [disconnect]  # whole
    # relay-1's store holds relay-1's records, as the relay wrote them, and nothing else.
    local = {r["id"]: r for r in records(data)}
    assert all(local.get(r["id"]) == r for r in got), "a record relay-1 never wrote"
    assert {p.name[:10] for p in store.iterdir()} <= {r["time"][:10] for r in local.values()}
    mine = read_day_dir(collected / "relay-2")
    assert [r["id"] for r in mine] == [r["id"] for r in as_relay2]
    assert [r.get("out_of_window", {}).get("reason") for r in mine] == [
        None, "time more than 24 h in the future", "time is not RFC 3339"]
    assert "(relay-2): closed: 3 records stored, 0 duplicates, 0 other messages, " \
           "0 unparsable, 3 refused: claimed another relay id" in topo.log("collector-1.log")
    assert not (data / "ship" / "set-aside.jsonl").exists()  # nothing needed setting aside
