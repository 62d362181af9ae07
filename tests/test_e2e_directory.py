"""End to end: relays register with ``relay directory``, a client downloads the
list with curl, its access record is found by address and time, a killed relay
drops out, a relay with another id's certificate is refused, a published VPN Gate
list parser (npm ``vpn-gate``) reads the CSV, and stock openvpn connects with a
``.ovpn`` taken from it.

Four ``relay serve`` in the topology's relay namespace, each with its own id,
certificate, ports, TAP device, pool and data directory; the directory listens
there too, on the address client namespace 1 reaches (198.18.1.1).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from shiputil import _ca, _leaf

from relay.connlog import reader
from relay.netns import Topology, relay_command, relay_ip, run, wait_for

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
VPNGATE_NPM = ROOT / ".node" / "node_modules" / "vpn-gate"
DIRECTORY_PORT = 8443
WINDOW_S = 6
UA = "Investigator-UA/7.7 (e2e)"
CLIENT_PORT = 45678
# Runs the published parser as the vpn-gate CLI does (lib/vpnProvider.js):
# csvLoader pulls the list from its configured URL, getSearch splits it, and
# vpnConfigHolder makes the server objects.
PARSER_JS = """
const lib = process.argv[2];
require(lib + '/configs/config').sourceURL = process.argv[3];
const csvLoader = require(lib + '/lib/csvLoader');
const holder = require(lib + '/lib/vpnConfigHolder');
csvLoader.load(null, true).then(function () {
  const lines = csvLoader.getSearch([], {commentChar: '*'})();
  const configs = holder(lines).getAll();
  console.log(JSON.stringify({errors: csvLoader.getErrors().map(String),
    servers: configs.map(c => ({host: c['#HostName'], ip: c.getIP(),
      country: c.getCountryID(), name: c.getCountryName(), ovpn: c.getConfigData()}))}));
});
"""


def dir_records(data: Path, action: str) -> list[dict[str, Any]]:
    return [r for r in reader.iter_records(data) if r["action"] == action]


def listed(topo: Topology, data: Path, *, up: bool = False) -> list[str]:
    """The relays listed; with ``up``, those that have reported an uptime of a
    second or more (a relay's first heartbeat, sent at start, says 0 s)."""
    proc = run([*relay_command(), "directory", "list", "--data-dir", str(data), "--json"],
               check=False)
    rows = [json.loads(line) for line in proc.stdout.splitlines()] \
        if proc.returncode == 0 else []
    return [r["id"] for r in rows if not up or r["uptime_s"] > 0]


def fetch(topo: Topology, ca: Path, path: str, *args: str) -> str:
    """curl from client namespace 1; the body exactly (CRLFs kept)."""
    proc = subprocess.run(["ip", "netns", "exec", topo.client_ns(1), "curl", "-sS", "--fail",
                           "-m", "20", "--cacert", str(ca), *args,
                           f"https://{relay_ip(1)}:{DIRECTORY_PORT}{path}"],
                          capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode()


def test_directory_end_to_end(make_topology: Callable[..., Topology]) -> None:
    if not (VPNGATE_NPM / "lib" / "csvLoader.js").exists():
        pytest.fail(f"the VPN Gate list parser is missing ({VPNGATE_NPM}): run ./run.sh setup")
    topo = make_topology(1)
    pki = topo.workdir / "pki"
    pki.mkdir()
    ca, ca_key, ca_path = _ca(pki, "relays-ca")
    dir_cert, dir_key = _leaf(pki, "directory", "directory.test", ca, ca_key,
                              ips=(relay_ip(1),))
    dir_data = topo.workdir / "directory"
    directory = topo.spawn(topo.relay_ns, [
        *relay_command(), "directory", "--listen", f"0.0.0.0:{DIRECTORY_PORT}",
        "--data-dir", str(dir_data), "--cert", str(dir_cert), "--key", str(dir_key),
        "--ca", str(ca_path), "--window", f"{WINDOW_S}s"], "directory.log")
    wait_for(lambda: "listening on" in topo.log("directory.log") or directory.poll() is not None,
             30, "relay directory to listen")
    assert directory.poll() is None, topo.log("directory.log")

    # relay-d presents a certificate for relay-x: the directory must refuse it.
    relays: dict[str, subprocess.Popen[bytes]] = {}
    for n, (rid, cn) in enumerate((("relay-a", "relay-a"), ("relay-b", "relay-b"),
                                   ("relay-c", "relay-c"), ("relay-d", "relay-x"))):
        cert, key = _leaf(pki, rid, cn, ca, ca_key)
        relays[rid] = topo.start_relay(
            topo.workdir / rid, name=rid, nat=False, listen=f"0.0.0.0:{4430 + n}",
            server_keys=f'id = "{rid}"\n',
            extra_tables=(
                f'[tap]\nname = "rl{n}"\npool = "10.{220 + n}.0.0/24"\n'
                f'[openvpn]\nlisten = "0.0.0.0:{11940 + n}"\n'
                f'[metrics]\nlisten = "127.0.0.1:{9820 + n}"\n'
                f'[directory]\nurl = "https://{relay_ip(1)}:{DIRECTORY_PORT}"\n'
                f'ca = "{ca_path}"\ncert = "{cert}"\nkey = "{key}"\n'
                f'address = "{relay_ip(1)}"\nheartbeat = "1s"\n'
                f'operator = "Volunteer {n}, e2e"\nmessage = "relay number {n}"\n'
                'country = "JP"\ncountry_name = "Japan"\n'))

    wait_for(lambda: sorted(listed(topo, dir_data, up=True))
             == ["relay-a", "relay-b", "relay-c"], 30, "three relays listed, up")
    wait_for(lambda: any(r.get("certificate_id") == "relay-x"
                         for r in dir_records(dir_data, "relay-refused")), 10,
             "relay-d refused")
    refused = next(r for r in dir_records(dir_data, "relay-refused")
                   if r.get("certificate_id") == "relay-x")
    assert refused["status"] == 403 and "relay-x" in refused["reason"]
    assert refused["client"]["ip"] == relay_ip(1)
    assert "directory refused this relay" in topo.log("relay-d.log")
    assert "relay-d" not in listed(topo, dir_data)

    # The lists, downloaded from the client namespace with a custom User-Agent.
    csv_text = fetch(topo, ca_path, "/api/iphone/", "-A", UA, "--local-port", str(CLIENT_PORT))
    lines = csv_text.split("\r\n")
    assert lines[0] == "*vpn_servers" and lines[1].startswith("#HostName,IP,Score,Ping,Speed,")
    assert lines[-2:] == ["*", ""]
    header = lines[1][1:].split(",")
    rows = {r["HostName"]: r for r in (dict(zip(header, line.split(","), strict=True))
                                       for line in lines[2:-2])}
    assert sorted(rows) == ["relay-a", "relay-b", "relay-c"]
    for n, rid in enumerate(("relay-a", "relay-b", "relay-c")):
        row = rows[rid]
        assert row["IP"] == relay_ip(1) and row["CountryShort"] == "JP"
        assert row["Operator"] == f"Volunteer {n}_ e2e" and row["Message"] == f"relay number {n}"
        assert row["LogType"] == "2weeks" and int(row["Uptime"]) > 0
        ovpn = base64.b64decode(row["OpenVPN_ConfigData_Base64"]).decode()
        assert f"remote {relay_ip(1)} {11940 + n}" in ovpn and "<ca>" in ovpn
    js = json.loads(fetch(topo, ca_path, "/api/servers.json"))
    by_id = {r["id"]: r for r in js["relays"]}
    assert by_id["relay-b"]["ports"] == {"cstp": 4431, "openvpn-udp": 11941,
                                         "openvpn-tcp": 11941}
    assert by_id["relay-b"]["log_policy"]["connlog_keep"] == "90d"
    assert [r["id"] for r in js["relays"]] == [h for h in rows]  # the same order

    # The access record: address, port, User-Agent; found by address and time.
    def download() -> dict[str, Any] | None:
        return next((r for r in dir_records(dir_data, "list-download")
                     if r.get("user_agent") == UA), None)

    wait_for(download, 10, "the access record")
    rec = download()
    assert rec is not None
    assert rec["client"] == {"ip": "198.18.1.2", "port": CLIENT_PORT}
    assert rec["status"] == 200 and rec["format"] == "csv"
    assert sorted(rec["served"]["relays"]) == ["relay-a", "relay-b", "relay-c"]
    assert (dir_data / "connlog").stat().st_mode & 0o777 == 0o700
    found = run([*relay_command(), "logs", "access", "--data-dir", str(dir_data),
                 "--client-ip", "198.18.1.2", "--at", rec["time"], "--slack", "1s", "--json"])
    assert rec["id"] in [json.loads(line)["id"] for line in found.stdout.splitlines()]
    elsewhere = run([*relay_command(), "logs", "access", "--data-dir", str(dir_data),
                     "--client-ip", "198.18.1.3", "--at", rec["time"], "--json"], check=False)
    assert elsewhere.returncode == 1 and elsewhere.stdout == ""  # 1: nothing found

    # A published VPN Gate list parser reads the list.
    home = topo.workdir / "node-home"
    home.mkdir()
    script = topo.workdir / "parse.js"
    script.write_text(PARSER_JS)
    parsed = run(["env", f"HOME={home}", f"NODE_EXTRA_CA_CERTS={ca_path}", "node",
                  str(script), str(VPNGATE_NPM),
                  f"https://{relay_ip(1)}:{DIRECTORY_PORT}/api/iphone/"], topo.client_ns(1))
    result = json.loads(parsed.stdout)
    assert result["errors"] == []
    servers = {s["host"]: s for s in result["servers"]}
    assert sorted(servers) == ["relay-a", "relay-b", "relay-c"]
    assert all(s["ip"] == relay_ip(1) and s["country"] == "JP" and s["name"] == "Japan"
               and "remote " in s["ovpn"] for s in servers.values())

    # Stock openvpn connects with relay-c's .ovpn from the CSV.
    conf = topo.workdir / "from-list.ovpn"
    conf.write_text(base64.b64decode(rows["relay-c"]["OpenVPN_ConfigData_Base64"]).decode())
    vpn = topo.spawn(topo.client_ns(1), ["openvpn", "--config", str(conf)], "openvpn.log")
    wait_for(lambda: "Initialization Sequence Completed" in topo.log("openvpn.log")
             or vpn.poll() is not None, 30, "openvpn to connect with the listed .ovpn")
    assert vpn.poll() is None, topo.log("openvpn.log")[-3000:]
    wait_for(lambda: any(r["action"] == "connect" and r["protocol"] == "OpenVPN"
                         for r in reader.iter_records(topo.workdir / "relay-c")), 10,
             "relay-c's connect record")

    # A killed relay drops out after its window.
    os.killpg(relays["relay-b"].pid, signal.SIGKILL)
    relays["relay-b"].wait()
    wait_for(lambda: sorted(listed(topo, dir_data)) == ["relay-a", "relay-c"], WINDOW_S + 10,
             "relay-b to drop out")
    expired = dir_records(dir_data, "relay-expire")
    assert [r["relay"]["id"] for r in expired] == ["relay-b"]
    assert "relay-b" not in fetch(topo, ca_path, "/api/iphone/")
    metrics = run(["curl", "-sS", "--fail", "http://127.0.0.1:9811/metrics"], topo.relay_ns).stdout
    csv_served = [r for r in dir_records(dir_data, "list-download")
                  if r["format"] == "csv" and r["status"] == 200]
    assert len(csv_served) == 3  # curl twice, the parser once
    assert ('relay_directory_list_downloads_total{format="csv",status="200"} '
            f'{len(csv_served)}.0') in metrics
    assert 'relay_directory_registrations_total{result="new"} 3.0' in metrics
    assert "relay_directory_expired_total 1.0" in metrics
    relay_metrics = run(["curl", "-sS", "--fail", "http://127.0.0.1:9823/metrics"],
                        topo.relay_ns).stdout
    assert 'relay_directory_heartbeats_total{result="refused"}' in relay_metrics
    assert "relay_directory_listed 0.0" in relay_metrics
