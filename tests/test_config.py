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
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("relay: error: [tap] pool")
    assert "Traceback" not in proc.stderr


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "relay.cli", "serve", "--config",
                           str(tmp_path / "absent.toml")], capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot read config" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_help_lists_every_key() -> None:
    out = subprocess.run([sys.executable, "-m", "relay.cli", "serve", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for section, cls in config._SECTION_TYPES.items():
        assert f"[{section}]" in out
        for name in cls.__dataclass_fields__:
            assert f"  {name} = " in out


def test_every_key_is_documented_once() -> None:
    """The example, relay.toml(5) and the README's table all come from the
    schema's field metadata: a key without words there fails here."""
    for name, cls, about in config.sections():
        assert about, f"[{name}] has no docstring"
        for key, _, doc in config.keys(cls):
            assert doc, f"[{name}] {key} has no documentation"


def test_example_has_every_key_commented_at_its_default_and_checks(tmp_path: Path) -> None:
    text = config.example()
    for name, cls, _ in config.sections():
        assert f"\n[{name}]\n" in text
        for key, default, doc in config.keys(cls):
            assert f"\n#{key} = {config.toml_value(default)}\n" in text, key
            assert doc.split()[0] in text
    assert config.from_text(text.encode(), "example") == config.Config()
    # relay config example | relay config check -
    example = subprocess.run([sys.executable, "-m", "relay.cli", "config", "example"],
                             capture_output=True, check=True)
    assert example.stdout.decode() == text
    check = subprocess.run([sys.executable, "-m", "relay.cli", "config", "check", "-"],
                           input=example.stdout, capture_output=True)
    assert (check.returncode, check.stdout) == (0, b"-: ok (every key at its default)\n")


def test_example_with_values_sets_them_and_is_refused_when_bad(tmp_path: Path) -> None:
    text = config.example({"server": {"uplink": "eth0", "id": "relay-7"},
                           "tap": {"dns": ["192.0.2.53"]}, "openvpn": {"tls_crypt": True}})
    assert '\nuplink = "eth0"\n' in text and '\n#listen = "0.0.0.0:443"\n' in text
    cfg = config.from_text(text.encode(), "x")
    assert (cfg.server.uplink, cfg.tap.dns, cfg.openvpn.tls_crypt) == (
        "eth0", ["192.0.2.53"], True)
    assert config.changed_keys(cfg) == ["[server] id", "[server] uplink", "[tap] dns",
                                        "[openvpn] tls_crypt"]
    with pytest.raises(ConfigError, match=r"\[server\] id"):
        config.example({"server": {"id": "relay-\"7\""}, "tap": {}})
    path = write(tmp_path, config.example({"server": {"uplink": "eth0"}}))
    check = subprocess.run([sys.executable, "-m", "relay.cli", "config", "check", str(path)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.endswith("(1 keys set: [server] uplink)\n")


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_bytes(b'[directory]\noperator = "M\xfcller"\n')
    with pytest.raises(ConfigError, match=r"relay.toml: not UTF-8 text \(byte 25\)"):
        config.load(path)


def test_the_demo_config_is_the_example_with_its_values(tmp_path: Path) -> None:
    from relay.demo import demo_config

    text = demo_config(tmp_path / "data", "veth-up0")
    cfg = config.from_text(text.encode(), "demo")
    assert cfg.server.uplink == "veth-up0" and cfg.data_dir == tmp_path / "data"
    assert config.changed_keys(cfg) == ["[server] uplink", "[logs] data_dir"]
    assert text == config.example({"server": {"listen": "0.0.0.0:443", "uplink": "veth-up0"},
                                   "logs": {"data_dir": str(tmp_path / "data")}})
