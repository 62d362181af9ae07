"""relay serve as a service: metrics, shipping to relay collector, reload, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import records, scrape
from shiputil import make_pki, read_day_dir

from relay.netns import Topology, relay_ip, run, wait_for

pytestmark = pytest.mark.netns

FLOOD = str(Path(__file__).with_name("flood_client.py"))


def test_metrics_shipping_reload_and_clean_shutdown(
        make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(1)
    data = topo.workdir / "data"
    pki = make_pki(topo.workdir / "pki")
    collected = topo.workdir / "collected"
    topo.spawn(topo.relay_ns, [sys.executable, "-m", "relay.cli", "collector", "--listen",
                               "127.0.0.1:6514", "--data-dir", str(collected), "--cert",
                               str(pki.server_cert), "--key", str(pki.server_key), "--ca",
                               str(pki.ca)], "collector.log")
    wait_for(lambda: "6514" in run(["ss", "-Hltn"], topo.relay_ns).stdout, 20, "the collector")
    topo.start_web()
    # The relay's client certificate: CN=relay-1, its [server] id.
    forward = (f'[forward]\ncollector = "localhost:6514"\nca = "{pki.ca}"\n'
               f'cert = "{pki.client_cert}"\nkey = "{pki.client_key}"\nretry_max = "2s"\n')
    relay = topo.start_relay(data, extra_tables=forward)
    client = topo.connect_openconnect(1, data)

    # Metrics: Prometheus text format, and the counters move with traffic.
    before = scrape(topo)
    assert before[("relay_sessions_active", (("protocol", "SSL-VPN"),))] == 1
    topo.curl(1, "/big.bin", "-o", "/dev/null")
    topo.curl(1, "/", "-A", "metrics-test/1.0")
    moving = (("relay_packets_total", (("direction", "in"),)),
              ("relay_packets_total", (("direction", "out"),)),
              ("relay_bytes_total", (("direction", "out"),)),
              ("relay_capture_records_total", ()),
              ("relay_capture_drained_records_total", ()),
              ("relay_ua_stamps_total", ()))

    def still() -> list[str]:
        now = scrape(topo)
        return [name for name, labels in moving
                if now[(name, labels)] <= before.get((name, labels), 0)]

    # The drain reaches the counters within its flush interval.
    wait_for(lambda: not still(), 10, "the counters to move")
    after = scrape(topo)
    assert after[("relay_bytes_total", (("direction", "out"),))] > 4 * 1024 * 1024
    assert after[("relay_capture_drops_total", (("cpu", "0"),))] == 0
    assert after[("relay_capture_attached", ())] == 1
    assert after[("relay_data_dir_free_bytes", ())] > 0

    # Shipping: the connect record reaches the collector.
    wait_for(lambda: any(r.get("action") == "connect"
                         for r in read_day_dir(collected / "relay-1")), 30,
             "the connect record at the collector")
    wait_for(lambda: scrape(topo).get(("relay_ship_last_success_timestamp_seconds", ()), 0)
             > 0, 20, "the shipping metrics to show a success")
    assert ("relay_ship_backlog_records", ()) in scrape(topo)
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "relay.cli", "ship", "status", "--json", "--data-dir",
         str(data)], capture_output=True, text=True, check=True).stdout)
    assert status["last_success"] is not None

    # Reload: a limit changes and is enforced at once, the session stays.
    def one_more_connection() -> dict[str, int]:
        out = run([sys.executable, FLOOD, "cycles", "1", relay_ip(1), "443"],
                  topo.client_ns(1)).stdout
        return json.loads(out)

    assert one_more_connection() == {"completed": 1, "refused": 0}
    conf = topo.workdir / "relay.toml"
    conf.write_text(conf.read_text().replace("[abuse]\n", "[abuse]\nsessions_per_ip = 1\n"))
    out = run([sys.executable, "-m", "relay.cli", "reload", "--config", str(conf)],
              topo.relay_ns)
    assert out.stdout.strip() == "config reloaded"
    assert one_more_connection() == {"completed": 0, "refused": 1}  # its one session is up
    assert scrape(topo)[("relay_refusals_total", (("reason", "sessions-per-ip"),))] == 1
    good = conf.read_text()
    # A key that needs a restart is reported and kept, the rest taken.
    conf.write_text(good + "[tap]\nmtu = 1300\n")
    out = run([sys.executable, "-m", "relay.cli", "reload", "--config", str(conf)],
              topo.relay_ns)
    assert out.stdout.strip() == \
        "config reloaded; [tap] changed but need a restart (kept as running)"
    assert "mtu 1400" in run(["ip", "link", "show", "relay0"], topo.relay_ns).stdout
    # A broken config is refused.
    conf.write_text(good.replace("sessions_per_ip = 1", 'sessions_per_ip = "lots"'))
    bad = run([sys.executable, "-m", "relay.cli", "reload", "--config", str(conf)],
              topo.relay_ns, check=False)
    assert bad.returncode == 2 and "reload refused" in bad.stderr
    assert "[abuse] sessions_per_ip" in bad.stderr
    relay.send_signal(signal.SIGHUP)  # the relay itself refuses it too
    wait_for(lambda: "reload refused" in topo.log("relay.log"), 10, "the relay's refusal")
    conf.write_text(good)
    reloads = topo.log("relay.log").count("config reloaded")
    relay.send_signal(signal.SIGHUP)  # SIGHUP reloads like relay reload
    wait_for(lambda: topo.log("relay.log").count("config reloaded") > reloads, 10,
             "SIGHUP reload")
    assert client.poll() is None
    topo.curl(1, "/")
    assert [r["action"] for r in records(data, "config-reload")] == ["config-reload"] * 3

    # The pins live in a bpffs the relay mounted in its own mount namespace (it is
    # run with `ip netns exec`), not in the host's: they go away with it.
    assert (Path(f"/proc/{relay.pid}/root/sys/fs/bpf/relay/relay0") / "prog_in").exists()
    assert not Path("/sys/fs/bpf/relay/relay0").exists()

    # SIGTERM: every session closed, everything the relay made removed.
    relay.send_signal(signal.SIGTERM)
    relay.wait(30)
    [disconnect] = records(data, "disconnect")
    assert disconnect["reason"] == "relay-shutdown"
    assert run(["ip", "link", "show", "relay0"], topo.relay_ns, check=False).returncode != 0
    assert "relay" not in run(["nft", "list", "tables"], topo.relay_ns).stdout
    assert not (data / "control.sock").exists()
    assert list((data / "sessions").iterdir()) == []
    client.wait(30)  # told by a DISCONNECT packet, it exits rather than reconnect
