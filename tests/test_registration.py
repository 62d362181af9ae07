"""relay serve's registration (relay.serve.registration) against a real
``run_directory`` on loopback, in one event loop: heartbeats, refusals by
certificate, back-off, the doctor check; and the directory's own limits (the
slowloris deadline, the abuse admission and its audit records)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from shiputil import Pki, free_port, read_day_dir, start_collector

from relay import config as configmod
from relay.central import directory as d
from relay.connlog import daylog
from relay.connlog.reader import iter_records
from relay.doctor import check_directory
from relay.serve import registration as reg
from relay.serve.abuse import Abuse


def relay_config(pki: Pki, data: Path, port: int, cert: Path, key: Path,
                 server_id: str = "relay-1") -> configmod.Config:
    daylog.ensure_dir(data)  # as relay serve makes it
    return configmod.from_dict({
        "server": {"id": server_id, "listen": "127.0.0.1:4443", "cert": str(pki.server_cert),
                   "key": str(pki.server_key)},
        "logs": {"data_dir": str(data)},
        "directory": {"url": f"https://127.0.0.1:{port}", "ca": str(pki.ca), "cert": str(cert),
                      "key": str(key), "operator": "op", "heartbeat": "1s"}})


@contextlib.asynccontextmanager
async def directory(pki: Pki, data: Path, server_id: str = "dir-1",
                    forward: dict[str, str] | None = None, **abuse: Any) -> AsyncIterator[int]:
    port = free_port()
    cfg = configmod.from_dict({"server": {"id": server_id}, "logs": {"data_dir": str(data)},
                               "metrics": {"listen": ""}, "forward": forward or {},
                               "abuse": {"short_session": "0s", "summary_interval": "1s",
                                         **abuse}})
    stop = asyncio.Event()
    task = asyncio.ensure_future(d.run_directory(
        cfg, f"127.0.0.1:{port}", str(pki.ca), str(pki.server_cert), str(pki.server_key),
        lambda audit: Abuse(cfg.abuse, cfg.data_dir, audit, time.time), window_s=5,
        stop_event=stop))
    for _ in range(100):
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        await asyncio.sleep(0.05)
    try:
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_heartbeat_lists_the_relay_and_the_doctor_says_so(pki: Pki, tmp_path: Path) -> None:
    async def main() -> None:
        async with directory(pki, tmp_path / "dir") as port:
            cfg = relay_config(pki, tmp_path / "relay", port, pki.client_cert, pki.client_key)
            r = reg.Registration(cfg, lambda: {"sessions_active": 1, "sessions_total": 5,
                                               "traffic_bytes": 1000})
            stop = asyncio.Event()
            task = asyncio.ensure_future(r.run(stop))
            for _ in range(100):
                if r.listed:
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await task
            assert r.listed and r.results["ok"] >= 1
            assert check_directory(cfg).status == "ok"
            snap: dict[str, Any] = {"relays": []}
            for _ in range(100):  # refreshed every EXPIRE_INTERVAL_S
                snap = json.loads((tmp_path / "dir" / d.SNAPSHOT_FILE).read_bytes())
                if snap["relays"]:
                    break
                await asyncio.sleep(0.05)
            (row,) = snap["relays"]
            assert (row["id"], row["address"], row["sessions_total"]) == \
                ("relay-1", "127.0.0.1", 5)
            assert row["ports"] == {"cstp": 4443, "openvpn-udp": 1194, "openvpn-tcp": 1194}

    asyncio.run(main())


def test_a_certificate_for_another_relay_is_refused(pki: Pki, tmp_path: Path) -> None:
    async def main() -> None:
        async with directory(pki, tmp_path / "dir") as port:
            # CN=relay-2 while [server] id is relay-1.
            cfg = relay_config(pki, tmp_path / "relay", port, pki.other_relay_cert,
                               pki.other_relay_key)
            r = reg.Registration(cfg, lambda: {"sessions_active": 0, "sessions_total": 0,
                                               "traffic_bytes": 0})
            with pytest.raises(reg.Refused, match="proves the relay id 'relay-2'"):
                await r.beat()
            r._failed("refused", "x", 1.0)
            r._write_status()
            check = check_directory(cfg)
            assert check.status == "FAIL" and "CN must be" in check.fix
        refused = [x for x in iter_records(tmp_path / "dir")
                   if x["action"] == "relay-refused"]
        assert refused[0]["certificate_id"] == "relay-2"
        assert refused[0]["server"]["id"] == "dir-1"

    asyncio.run(main())


def test_a_directory_that_is_down_backs_off_and_never_blocks(pki: Pki, tmp_path: Path) -> None:
    cfg = relay_config(pki, tmp_path / "relay", free_port(), pki.client_cert, pki.client_key)
    r = reg.Registration(cfg, lambda: {"sessions_active": 0, "sessions_total": 0,
                                       "traffic_bytes": 0})

    async def main() -> None:
        with pytest.raises(OSError):
            await r.beat()

    asyncio.run(main())
    delays = [r._failed("error", "down", 60.0) for _ in range(10)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0
    assert all(30.0 <= x <= 60.0 for x in delays[6:])  # capped at the interval


def test_a_slow_client_gets_a_408_record_and_an_idle_one_nothing(
        pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(d, "REQUEST_TIMEOUT_S", 0.5)

    async def main() -> None:
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        async with directory(pki, tmp_path / "dir") as port:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost")
            writer.write(b"GET /api/iphone/ HTTP/1.1\r\nUser-Agent: slow")
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.1 408 ")
            idle_r, idle_w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost")
            assert await asyncio.wait_for(idle_r.read(), 5) == b""
            for w in (writer, idle_w):
                w.close()
        downloads = [x for x in iter_records(tmp_path / "dir")
                     if x["action"] == "list-download"]
        assert [(x["status"], x["reason"]) for x in downloads] == [(408, "timeout")]

    asyncio.run(main())


def test_a_flood_is_reset_summarised_and_banned(pki: Pki, tmp_path: Path) -> None:
    async def main() -> None:
        async with directory(pki, tmp_path / "dir", rate_per_ip=1.0, burst_per_ip=2,
                             strikes=5) as port:
            def flood() -> int:  # blocking sockets, off the directory's event loop
                resets = 0
                for _ in range(12):
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                            s.settimeout(0.3)  # an admitted one waits for our ClientHello
                            resets += s.recv(1) == b""
                    except ConnectionResetError:
                        resets += 1
                    except TimeoutError:
                        pass
                return resets

            resets = await asyncio.to_thread(flood)
            assert resets >= 9
            await asyncio.sleep(1.5)  # the summary interval
        records = list(iter_records(tmp_path / "dir"))
        actions = [x["action"] for x in records]
        assert "refusals" in actions and "ban" in actions
        ban = next(x for x in records if x["action"] == "ban")
        assert ban["network"] == "127.0.0.1/32" and ban["server"]["id"] == "dir-1"

    asyncio.run(main())


def test_the_access_log_is_shipped_like_a_connection_log(pki: Pki, tmp_path: Path) -> None:
    """--forward-* ships the access records to relay collector, under the
    directory's id (its certificate's CN: here the test PKI's relay-1)."""
    cport = free_port()
    collector = start_collector(tmp_path, cport, pki)
    forward = {"collector": f"localhost:{cport}", "ca": str(pki.ca),
               "cert": str(pki.client_cert), "key": str(pki.client_key)}

    async def main() -> None:
        async with directory(pki, tmp_path / "dir", server_id="relay-1",
                             forward=forward) as port:
            def download() -> int:
                ctx = ssl.create_default_context(cafile=str(pki.ca))
                with socket.create_connection(("127.0.0.1", port)) as raw, \
                        ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET /api/iphone/ HTTP/1.1\r\nUser-Agent: shipped/1\r\n\r\n")
                    return len(tls.recv(65536))

            assert await asyncio.to_thread(download) > 0
            for _ in range(200):
                stored = read_day_dir(tmp_path / "collector" / "relay-1")
                if any(r.get("user_agent") == "shipped/1" for r in stored):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"not shipped: {collector.log()[-2000:]}")

    try:
        asyncio.run(main())
    finally:
        collector.stop()
