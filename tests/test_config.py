"""Config: defaults, overrides, and one clear error naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay import config
from relay.config import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "relay.toml"
    p.write_text(text)
    return p


def test_defaults_match_the_architecture() -> None:
    cfg = config.load(None)
    assert cfg.tap.name == "relay0" and cfg.tap.pool == "10.211.0.0/16"
    assert cfg.listen_addr == ("0.0.0.0", 443)
    assert cfg.data_dir == Path("/var/lib/relay")
    assert cfg.server.cert == "" and cfg.server.uplink == ""


def test_file_overrides_and_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, '[server]\nid = "r-9"\nlisten = "[::]:8443"\n'
                                      '[tap]\npool = "10.9.0.0/24"\n'))
    assert cfg.server.id == "r-9" and cfg.listen_addr == ("::", 8443)
    assert str(cfg.pool) == "10.9.0.0/24" and cfg.tap.name == "relay0"
    assert cfg.with_data_dir("/tmp/x").data_dir == Path("/tmp/x")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nlisten = "nope"\n', "[server] listen: expected HOST:PORT"),
        ('[server]\nlisten = "1.2.3.4:70000"\n', "[server] listen"),
        ("[server]\nlisten = 443\n", "[server] listen: expected a str"),
        ('[server]\nlistn = "x"\n', "[server] listn: unknown key"),
        ('[srever]\nid = "x"\n', "[srever]: unknown section"),
        ('[server]\nid = "bad id!"\n', "[server] id"),
        ('[server]\ndpd = "soon"\n', "[server] dpd: expected a duration"),
        ('[server]\ndpd = "0s"\n', "[server] dpd: at least 1s"),
        ('[server]\nhandshake_timeout = "0s"\n', "[server] handshake_timeout: at least 1s"),
        ('[logs]\npacket_segment = "0s"\n', "[logs] packet_segment: at least 1s"),
        ('[server]\ncert = "/x.pem"\n', "[server] cert: cert and key"),
        ('[tap]\npool = "10.0.0.0/33"\n', "[tap] pool"),
        ('[tap]\npool = "10.0.0.0/30"\n', "[tap] pool: 10.0.0.0/30 is too small"),
        ("[tap]\nmtu = 100\n", "[tap] mtu"),
        ('[tap]\ndns = ["not-an-ip"]\n', "[tap] dns"),
        ('[logs]\nconnlog_keep = "30d"\n', "[logs] connlog_keep: the connection log is kept"),
        ('[logs]\ncompress_after = "1d"\n', "[logs] compress_after"),
        ('[forward]\ncollector = "x"\n', "[forward] collector"),
        ('[egress]\nallow = ["banana"]\n', "[egress] allow: 'banana' does not appear"),
        ('[egress]\nallow = "10.0.0.0/8"\n', "[egress] allow: expected a list of strings"),
        ('[egress]\ndeny = ["10.0.0.1/8"]\n', "[egress] deny: 10.0.0.1/8 has host bits set"),
        ('[egress]\ndeny = ["10.0.0.0/8"]\n[tap]\ndns = ["10.0.0.53"]\n',
         "[egress] deny: 10.0.0.0/8 covers 10.0.0.53, a [tap] dns server"),
        ('[egress]\nallw = []\n', "[egress] allw: unknown key"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    assert message in str(err.value)


def test_cli_prints_one_line_and_exits_nonzero(tmp_path: Path) -> None:
    path = write(tmp_path, '[tap]\npool = "banana"\n')
    proc = subprocess.run([sys.executable, "-m", "relay.cli", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("relay: error: [tap] pool")
    assert "Traceback" not in proc.stderr


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "relay.cli", "serve", "--config",
                           str(tmp_path / "absent.toml")], capture_output=True, text=True)
    assert proc.returncode == 1 and "cannot read config" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_help_lists_every_key() -> None:
    out = subprocess.run([sys.executable, "-m", "relay.cli", "serve", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for section, cls in config._SECTION_TYPES.items():
        assert f"[{section}]" in out
        for name in cls.__dataclass_fields__:
            assert f"  {name} = " in out
