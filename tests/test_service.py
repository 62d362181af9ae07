"""The systemd unit: systemd-analyze accepts it, and it holds the least privilege."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from relay import config, fdlimit


def test_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: apt-get install systemd"
    conf = tmp_path / "relay.toml"
    conf.write_text(f'[logs]\ndata_dir = "{tmp_path / "data"}"\n')
    unit = tmp_path / "relay.service"
    out = subprocess.run([sys.executable, "-m", "relay.cli", "install-service", "--config",
                          str(conf), "-o", str(unit)], capture_output=True, text=True, check=True)
    assert str(unit) in out.stdout
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True)
    assert verify.returncode == 0, verify.stderr
    text = unit.read_text()
    directives = dict(line.split("=", 1) for line in text.splitlines()
                      if "=" in line and not line.startswith("#"))
    assert directives["ExecStart"].endswith(f"relay serve --config {conf}")
    assert directives["NoNewPrivileges"] == "yes"
    assert directives["ProtectSystem"] == "strict"
    assert set(directives["CapabilityBoundingSet"].split()) == {
        "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"}
    assert str(tmp_path / "data") in directives["ReadWritePaths"].split()
    assert directives["Restart"] == "on-failure"
    assert directives["StandardError"] == "journal"
    assert directives["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # A socket per session and per handshake at the default caps, plus the reserve.
    assert directives["LimitNOFILE"] == str(4096 + 512 + fdlimit.FD_RESERVE)


def test_open_files_limit_follows_the_caps(tmp_path: Path) -> None:
    conf = tmp_path / "relay.toml"
    conf.write_text(f'[server]\nmax_sessions = 20000\n[abuse]\nhandshakes_total = 1000\n'
                    f'[logs]\ndata_dir = "{tmp_path / "data"}"\n')
    unit = tmp_path / "relay.service"
    subprocess.run([sys.executable, "-m", "relay.cli", "install-service", "--config",
                    str(conf), "-o", str(unit)], capture_output=True, text=True, check=True)
    assert f"\nLimitNOFILE={20000 + 1000 + fdlimit.FD_RESERVE}\n" in unit.read_text()
    assert fdlimit.nofile_needed(config.load(conf)) == 20000 + 1000 + fdlimit.FD_RESERVE


def test_install_service_needs_a_config(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "relay.cli", "install-service", "-o",
                           str(tmp_path / "relay.service")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--config FILE is required" in proc.stderr


def raise_nofile_under(soft: int, hard: int, need: int) -> list[str]:
    """raise_nofile(need) in a process started with these limits: [problem, soft after]."""
    code = ("import resource; from relay.fdlimit import raise_nofile; "
            f"print(raise_nofile({need})); print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    proc = subprocess.run(["sh", "-c", f'ulimit -Sn {soft} && ulimit -Hn {hard} && '
                           f'exec {sys.executable} -c "{code}"'],
                          capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()


def test_relay_raises_its_soft_open_files_limit_within_the_hard_one() -> None:
    assert raise_nofile_under(1024, 8000, 4864) == ["None", "4864"]
    problem, soft = raise_nofile_under(1024, 2000, 4864)
    assert soft == "2000"
    assert problem.startswith("open-files limit 2000 is under the 4864 the caps need")
    assert "LimitNOFILE=4864" in problem


def test_data_dir_goes_to_exec_start_and_uninstall_removes_the_unit(tmp_path: Path) -> None:
    """install-service --data-dir DIR: the service runs relay serve with that
    --data-dir (before, the flag only changed ReadWritePaths, and the relay wrote
    elsewhere); --uninstall removes the unit and leaves the data."""
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: apt-get install systemd"
    conf = tmp_path / "relay.toml"
    conf.write_text("")
    data = tmp_path / "relay data"  # a space: quoted in the command line
    data.mkdir()
    unit = tmp_path / "relay.service"
    subprocess.run([sys.executable, "-m", "relay.cli", "install-service", "--config",
                    str(conf), "--data-dir", str(data), "-o", str(unit)], check=True,
                   capture_output=True)
    directives = dict(line.split("=", 1) for line in unit.read_text().splitlines()
                      if "=" in line and not line.startswith("#"))
    assert directives["ExecStart"].endswith(f'relay serve --config {conf} --data-dir "{data}"')
    assert f'"{data}"' in directives["ReadWritePaths"]
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True)
    assert verify.returncode == 0, verify.stderr
    out = subprocess.run([sys.executable, "-m", "relay.cli", "install-service", "--uninstall",
                          "-o", str(unit)], capture_output=True, text=True, check=True).stdout
    assert f"removed {unit}" in out and "data directory and its logs stay" in out
    assert not unit.exists() and data.is_dir()
