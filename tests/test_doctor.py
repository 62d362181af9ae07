"""relay doctor on this host: passes when set up, and names the fix for what is
broken (kernel headers hidden, a read-only data directory, a port taken)."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
from pathlib import Path

from conftest import require_root_and_tools

from relay.fdlimit import FD_RESERVE

RELAY = [sys.executable, "-m", "relay.cli"]


def config(tmp_path: Path, port: int, metrics_port: int) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\n'
                    f'[openvpn]\nlisten = "127.0.0.1:{free_port()}"\n'
                    f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
                    f'[logs]\ndata_dir = "{tmp_path / "data"}"\n')
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def doctor(conf: Path, wrapper: str = "") -> tuple[int, dict[str, dict], str]:
    cmd = " ".join([*RELAY, "doctor", "--json", "--config", str(conf)])
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f"{wrapper} {cmd}"] if wrapper
                          else [*RELAY, "doctor", "--json", "--config", str(conf)],
                          capture_output=True, text=True, timeout=120)
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    return proc.returncode, checks, proc.stderr


def test_doctor_passes_on_a_set_up_host(tmp_path: Path) -> None:
    require_root_and_tools()
    rc, checks, err = doctor(config(tmp_path, free_port(), free_port()))
    assert rc == 0, err
    for name in ("root or capabilities", "BPF syscall and ring buffer", "TUN/TAP",
                 "tc clsact", "nftables", "free space", "collector", "open-files limit"):
        assert checks[name]["status"] == "ok", checks[name]
    # Two checks warn for a reason this test can see for itself: the kernel headers
    # fallback (build points at another kernel's tree) and an unconfirmed NTP sync.
    build = Path("/lib/modules", platform.release(), "build").resolve()
    headers = checks["bcc and kernel headers"]
    if platform.release() in str(build):
        assert headers["status"] == "ok", headers
    else:
        assert headers["status"] == "warn" and f"fallback: build -> {build}" in \
            headers["detail"], headers
    clock = checks["clock"]
    if Path("/run/systemd/timesync/synchronized").exists():
        assert clock["status"] == "ok", clock
    else:
        assert clock["status"] == "warn" and "NTP synchronisation not confirmed" in \
            clock["detail"], clock
    # The egress policy in force, checked by the kernel (nft -c).
    egress = checks["egress policy"]
    assert egress["status"] == "ok", egress
    assert "nft accepts" in egress["detail"]
    for line in ("deny (always dropped): none", "drop client-to-client: 10.211.0.0/16",
                 "drop private: 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7",
                 "drop link-local: 169.254.0.0/16 fe80::/10"):
        assert line in egress["detail"]


def test_doctor_names_the_fix_for_missing_headers_a_bad_dir_and_a_taken_port(
        tmp_path: Path) -> None:
    require_root_and_tools()
    port = free_port()
    conf = config(tmp_path, port, free_port())
    data = tmp_path / "data"
    data.mkdir()
    # A private mount namespace: hide the kernel headers, make the data dir read-only.
    wrapper = (f"mount -t tmpfs tmpfs /lib/modules && mount -t tmpfs -o ro tmpfs {data} &&")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        rc, checks, err = doctor(conf, wrapper)
    assert rc == 1
    headers = checks["bcc and kernel headers"]
    assert headers["status"] == "FAIL" and "no kernel headers" in headers["detail"]
    assert "linux-headers" in headers["fix"]
    bad_dir = checks[f"data directory {data}"]
    assert bad_dir["status"] == "FAIL" and "read-only" in bad_dir["detail"]
    assert "writable" in bad_dir["fix"]
    busy = checks[f"port 127.0.0.1:{port} (CSTP listener)"]
    assert busy["status"] == "FAIL" and "in use" in busy["detail"].lower()
    assert "python" in busy["detail"]  # who holds it
    assert "required check(s) failed" in err
    # The host itself is untouched by the private mounts.
    assert Path(f"/lib/modules/{platform.release()}/build").exists()


def test_doctor_checks_the_open_files_limit_against_the_caps(tmp_path: Path) -> None:
    require_root_and_tools()
    conf = config(tmp_path, free_port(), free_port())
    need = 4096 + 512 + FD_RESERVE
    # A hard limit under the caps: relay serve could not raise its soft limit far enough.
    rc, checks, err = doctor(conf, f"ulimit -n {need - 1} &&")
    limit = checks["open-files limit"]
    assert rc == 1 and limit["status"] == "FAIL", limit
    assert f"hard limit {need - 1}, under the {need} the caps need" in limit["detail"]
    assert f"LimitNOFILE={need}" in limit["fix"] and f"ulimit -n {need}" in limit["fix"]
    assert "open-files limit" in err
    # A soft limit under the caps is fine when the hard one allows raising it.
    rc, checks, _ = doctor(conf, f"ulimit -Sn 1024 && ulimit -Hn {need} &&")
    assert checks["open-files limit"]["status"] == "ok"
    assert "soft 1024: relay serve raises it" in checks["open-files limit"]["detail"]
