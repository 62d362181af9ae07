"""The relay command as an operator and an investigator meet it: every bad input is
one line on stderr with a documented exit status (never a traceback), a data
directory that holds no relay data is an error (never "nothing found"), reading
commands change nothing in the data directory, times without a zone are said,
and the exit statuses tell found, nothing, trouble and incomplete apart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_investigate import SID, build

from relay import cli
from relay.cext import EXPECTED_ABI
from relay.connlog import daylog
from relay.errors import EXIT_INCOMPLETE, EXIT_NOTHING, EXIT_OK, EXIT_USAGE
from relay.tlsconf import SELF_SIGNED_CERT

AT = "2026-03-29T00:45:00Z"  # session A is connected, talking to 203.0.113.7:443


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("relaydata")
    build(data)
    return data


@pytest.fixture
def data(built: Path, tmp_path: Path) -> Path:
    """A copy of a relay's data directory with sessions, packets and chains, and
    the files a relay leaves besides: bans (the journal's last line torn by a
    crash) and the forwarder's state."""
    copy = tmp_path / "data"
    shutil.copytree(built, copy)
    (copy / "bans.jsonl").write_text(
        '{"op":"add","network":"192.0.2.0/24","until":4102444800.0,"reason":"t",'
        '"offences":1}\n{"op":"add","netw')
    (copy / "ship").mkdir(mode=0o700)
    (copy / "ship" / "position").write_text('{"day": "2026-03-29", "offset": 0}')
    return copy


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ bad input


def bad_inputs(tmp: Path, data: Path) -> list[tuple[str, list[str], int, str]]:
    """(case, argv, exit status, a word the error line holds)."""
    d = ["--data-dir", str(data)]
    afile = tmp / "afile"
    afile.write_text("x\n")
    empty = tmp / "empty"
    empty.mkdir()
    latin1 = tmp / "latin1.toml"
    latin1.write_bytes(b"[server]\nid = \"caf\xe9\"\n")
    badtoml = tmp / "bad.toml"
    badtoml.write_text("[server\n")
    unknown = tmp / "unknown.toml"
    unknown.write_text("[server]\nlistn = \"x\"\n")
    nocert = tmp / "nocert.toml"
    nocert.write_text(f'[server]\ncert = "{tmp}/absent.pem"\nkey = "{tmp}/absent.key"\n'
                      f'[logs]\ndata_dir = "{data}"\n')
    link = tmp / "link"
    link.symlink_to(tmp / "elsewhere")
    notatar = tmp / "not.tar"
    notatar.write_bytes(b"nonsense")
    at = ["--at", AT]
    return [
        ("slack nan", ["logs", "search", *d, *at, "--slack", "nan"], 2, "--slack"),
        ("slack inf", ["logs", "search", *d, *at, "--slack", "inf"], 2, "--slack"),
        ("slack without a unit", ["logs", "search", *d, *at, "--slack", "30"], 2, "--slack"),
        ("slack negative", ["logs", "search", *d, *at, "--slack=-5s"], 2, "--slack"),
        ("slack over a week", ["logs", "search", *d, *at, "--slack", "8d"], 2, "--slack"),
        ("slack without at", ["logs", "search", *d, "--slack", "5s"], 2, "--slack"),
        ("year 1 in Tokyo", ["logs", "search", *d, "--at", "0001-01-01", "--tz",
                             "Asia/Tokyo"], 2, "out of range"),
        ("year 1 with an offset", ["logs", "search", *d, "--at", "0001-01-01T00:00+09:00"],
         2, "out of range"),
        ("year 9999 west", ["logs", "packets", *d, "--from", "9999-12-31T23:00-05:00"], 2,
         "out of range"),
        ("before the epoch", ["logs", "connections", *d, "--from", "1969-07-20T20:17Z"], 2,
         "out of range"),
        ("not a time", ["logs", "search", *d, "--at", "yesterday"], 2, "not a valid time"),
        ("at and from", ["logs", "search", *d, *at, "--from", AT], 2, "not both"),
        ("empty window", ["logs", "search", *d, "--from", "2026-03-29T02:00Z", "--to",
                          "2026-03-29T01:00Z"], 2, "window is empty"),
        ("DST gap", ["logs", "search", *d, "--at", "2026-03-29 02:30", "--tz",
                     "Europe/Berlin"], 2, "does not exist"),
        ("unknown zone", ["logs", "search", *d, *at, "--tz", "Mars/Olympus"], 2, "--tz"),
        ("offset out of range", ["logs", "packets", *d, "--tz", "+25:00"], 2, "--tz"),
        ("session !!!", ["logs", "search", *d, "--session", "!!!"], 2, "--session"),
        ("packets session !!!", ["logs", "packets", *d, "--session", "!!!"], 2, "--session"),
        ("connections session !!!", ["logs", "connections", *d, "--session", "!!!"], 2,
         "--session"),
        ("client ip", ["logs", "search", *d, "--client-ip", "999.1.1.1"], 2, "--client-ip"),
        ("dst port", ["logs", "search", *d, "--dst", "203.0.113.7:99999"], 2, "--dst"),
        ("dst text", ["logs", "packets", *d, "--dst", "nonsense"], 2, "--dst"),
        ("format", ["logs", "search", *d, "--format", "xml"], 2, "invalid choice"),
        ("unknown command", ["logs", "bogus"], 2, "invalid choice"),
        ("no command", [], 2, "required"),
        ("data dir a file", ["logs", "connections", "--data-dir", str(afile)], 2,
         "holds no relay data"),
        ("data dir missing", ["logs", "search", "--data-dir", str(tmp / "nope")], 2,
         "holds no relay data"),
        ("data dir empty", ["logs", "search", "--data-dir", str(empty), *at], 2,
         "holds no relay data"),
        ("ban list, missing dir", ["ban", "list", "--data-dir", str(tmp / "nope")], 2,
         "holds no relay data"),
        ("ship status, a file", ["ship", "status", "--data-dir", str(afile)], 2,
         "holds no relay data"),
        ("verify, empty dir", ["logs", "verify", "--data-dir", str(empty)], 2,
         "holds no relay data"),
        ("status, empty dir", ["status", "--data-dir", str(empty)], 2, "holds no relay data"),
        ("config not UTF-8", ["logs", "connections", "--config", str(latin1)], 2, "UTF-8"),
        ("config missing", ["logs", "connections", "--config", str(tmp / "nope.toml")], 2,
         "cannot read config"),
        ("config not TOML", ["logs", "connections", "--config", str(badtoml)], 2,
         "not valid TOML"),
        ("config unknown key", ["logs", "connections", "--config", str(unknown)], 2,
         "unknown key"),
        ("check not UTF-8", ["config", "check", str(latin1)], 2, "UTF-8"),
        ("server cert missing", ["client-config", "openvpn", "--config", str(nocert)], 2,
         "[server] cert"),
        ("no self-signed cert yet", ["client-config", "openconnect", "--data-dir",
                                     str(empty)], 2, "start relay serve once"),
        ("-o into a missing folder", ["logs", "search", *d, *at, "-o",
                                      str(tmp / "nodir" / "x.csv")], 2, "no directory"),
        ("-o through a link", ["logs", "verify", *d, "-o", str(link)], 2, "symbolic link"),
        ("client-config -o missing folder", ["client-config", "openvpn", *d, "-o",
                                             str(tmp / "nodir" / "r.ovpn")], 2,
         "no directory"),
        ("export-pcap without -o", ["logs", "export-pcap", *d, *at], 2, "required"),
        ("wide ban", ["ban", "add", *d, "0.0.0.0/0"], 2, "--force"),
        ("ban for 0s", ["ban", "add", *d, "192.0.2.1", "--for", "0s"], 2, "1s"),
        ("ban for 5y", ["ban", "add", *d, "192.0.2.1", "--for", "5y"], 2, "--for"),
        ("ban for 400d", ["ban", "add", *d, "192.0.2.1", "--for", "400d"], 2, "366d"),
        ("ban a name", ["ban", "add", *d, "example.org"], 2, "example.org"),
        ("ban show a network", ["ban", "show", *d, "10.0.0.0/8"], 2, "not an IP"),
        ("sessions, no relay", ["sessions", *d], 2, "no relay is running"),
        ("sessions show, no ID", ["sessions", "show", *d], 2, "ID"),
        ("disconnect, no target", ["sessions", "disconnect", *d], 2, "--client-ip"),
        ("reload, no relay", ["reload", *d], 2, "no relay is running"),
        ("bundle not a tar", ["logs", "verify-bundle", str(notatar)], 2, "not a bundle"),
        ("bundle, data dir missing", ["logs", "verify-bundle", str(notatar), "--data-dir",
                                      str(tmp / "nope")], 2, "holds no relay data"),
        ("ua-lookup, empty", ["logs", "ua-lookup", *d, " "], 2, "empty"),
        ("ua-lookup, no tag", ["logs", "ua-lookup", *d, "curl/8.0 (!!!)"], 2, "tag"),
        ("access slack nan", ["logs", "access", *d, *at, "--slack", "nan"], 2, "--slack"),
        ("directory window", ["directory", "--cert", "c", "--key", "k", "--ca", "a",
                              "--window", "soon"], 2, "--window"),
        ("directory keep", ["directory", "--cert", "c", "--key", "k", "--ca", "a",
                            "--keep", "30d"], 2, "at least 90d"),
        ("directory keep in days", ["directory", "--cert", "c", "--key", "k", "--ca", "a",
                                    "--keep", "90"], 2, "--keep"),
        ("install-service, no config", ["install-service", "-o", str(tmp / "u.service")], 2,
         "--config"),
    ]


def test_every_bad_input_is_one_line_with_a_documented_status(
        capsys: pytest.CaptureFixture[str], data: Path, tmp_path: Path) -> None:
    cases = bad_inputs(tmp_path, data)
    assert len(cases) >= 30
    for case, argv, status, word in cases:
        code, _, err = run(capsys, *argv)
        assert (code, err.count("\n")) == (status, 1), (case, code, err)
        assert err.startswith("relay: error: ") and word in err, (case, err)
        assert "Traceback" not in err and "internal error" not in err, (case, err)


def test_a_damaged_compressed_day_is_a_warning_and_status_3(
        capsys: pytest.CaptureFixture[str], data: Path) -> None:
    """A .jsonl.zst that does not decompress: connections, search and verify each
    read on past it (before, connections said nothing of it in its status and
    verify ended in a ZstdError traceback)."""
    (data / daylog.SUBDIR / "2026-03-27.jsonl.zst").write_bytes(b"not zstd at all")
    code, out, err = run(capsys, "logs", "connections", "--data-dir", str(data))
    assert code == EXIT_INCOMPLETE and err.count("\n") == 1 and "2026-03-27" in err, err
    assert SID["A"] in out
    code, out, err = run(capsys, "logs", "search", "--data-dir", str(data), "--at", AT)
    assert code == EXIT_INCOMPLETE and SID["A"] in out and "2026-03-27" in err, err
    code, out, err = run(capsys, "logs", "verify", "--data-dir", str(data))
    assert code == EXIT_INCOMPLETE and err == "", err
    assert "UNREADABLE: connlog 2026-03-27: cannot be read whole" in out


def test_a_stale_c_module_while_the_parser_is_built_is_one_line(tmp_path: Path) -> None:
    """build_parser imports modules (the collector's); one that finds the C module
    stale raises as it is imported: one line, not a traceback, whatever the command."""
    code = ("import sys, types\n"
            "from relay.errors import RelayError\n"
            "class Stale(types.ModuleType):\n"
            "    def __getattr__(self, name):\n"
            "        raise RelayError('relay._cext is stale (ABI 0, want 1); rebuild with "
            "pip install .')\n"
            "sys.modules['relay.central.collector'] = Stale('relay.central.collector')\n"
            "from relay import cli\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "logs", "connections"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert proc.stderr == "relay: error: relay._cext is stale (ABI 0, want 1); rebuild with " \
                          "pip install .\n"


STALE_C_MODULE = """
import sys, types
from types import SimpleNamespace as NS
fake = types.ModuleType("relay._cext")
fake.lib = NS(RELAY_HP_TAG_LEN=8, relay_cext_abi=lambda: 0)
fake.ffi = NS(typeof=lambda s: NS(fields=[("session_id", NS(type=NS(length=16)))]))
sys.modules["relay._cext"] = fake
from relay import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_stale_c_module_is_one_line_and_version_still_answers(data: Path) -> None:
    """A C module of another ABI: importing the command needs none of it (before,
    importing relay.cli reached it and every command ended in a traceback);
    commands that read the packet log say so in one line."""
    proc = subprocess.run([sys.executable, "-c", STALE_C_MODULE, "--version"],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (EXIT_OK, ""), proc.stderr
    proc = subprocess.run([sys.executable, "-c", STALE_C_MODULE, "logs", "packets",
                           "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_USAGE and proc.stderr == (
        f"relay: error: relay._cext is stale (ABI 0, want {EXPECTED_ABI}); rebuild with "
        "pip install .\n")


def test_an_internal_error_is_one_line_unless_debugging(tmp_path: Path) -> None:
    code = ("import sys\n"
            "from relay import cli, opscli\n"
            "def broken(args, cfg):\n"
            "    return 1 // 0\n"
            "opscli.cmd_status = broken\n"
            "sys.exit(cli.main(['status', '--data-dir', sys.argv[1]]))\n")
    (tmp_path / "connlog").mkdir()
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 4 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("relay: internal error (a bug; please report it): "
                                  "ZeroDivisionError") and "RELAY_DEBUG=1" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env={**env, cli.DEBUG_ENV: "1"})
    assert "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr


# ------------------------------------------------------------------ reading changes nothing


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its mode, size and mtime (ns)."""
    out = {".": (root.stat().st_mode, 0, root.stat().st_mtime_ns)}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def test_reading_commands_change_nothing_in_the_data_directory(
        capsys: pytest.CaptureFixture[str], data: Path, tmp_path: Path) -> None:
    """On an evidence copy: every reading command leaves the tree, sizes and mtimes
    as they were (before, ban list created connlog/ on a wrong path, cut the ban
    journal's torn line off and could write an audit record)."""
    (data / "bans.json").write_text("[]")  # a legacy ban list, not migrated by a reader
    d = ["--data-dir", str(data)]
    bundle = tmp_path / "case.tar"
    assert run(capsys, "logs", "disclose", *d, "--at", AT, "-o", str(bundle))[0] == EXIT_OK
    before = tree(data)
    commands: list[list[str]] = [
        ["logs", "connections", *d], ["logs", "connections", *d, "--json", "--at", AT],
        ["logs", "packets", *d], ["logs", "packets", *d, "--format", "csv", "--at", AT],
        ["logs", "search", *d, "--at", AT], ["logs", "search", *d, "--dst", "203.0.113.7"],
        ["logs", "ua-lookup", *d, f"curl/8.0 {SID['A'][:8]}"],
        ["logs", "access", *d, "--from", "2026-03-29T00:00Z"],
        ["logs", "verify", *d], ["logs", "verify-bundle", str(bundle), *d],
        ["logs", "export-pcap", *d, "--at", AT, "-o", str(tmp_path / "x.pcapng")],
        ["ban", "list", *d], ["ban", "show", *d, "192.0.2.9"], ["ship", "status", *d],
        ["status", *d], ["status", *d, "--json"], ["sessions", *d],
    ]
    for argv in commands:
        run(capsys, *argv)
        assert tree(data) == before, argv
    # The same for a path that is not a data directory at all: nothing is created.
    missing = tmp_path / "typo"
    for argv in (["ban", "list", "--data-dir", str(missing)],
                 ["status", "--data-dir", str(missing)],
                 ["ship", "status", "--data-dir", str(missing)],
                 ["client-config", "openvpn", "--data-dir", str(missing)]):
        assert run(capsys, *argv)[0] == EXIT_USAGE
        assert not missing.exists(), argv


def test_ban_list_on_files_reads_the_torn_journal_without_repairing_it(
        capsys: pytest.CaptureFixture[str], data: Path) -> None:
    code, out, _ = run(capsys, "ban", "list", "--data-dir", str(data), "--json")
    assert code == EXIT_OK
    [ban] = [json.loads(line) for line in out.splitlines()]
    assert ban["network"] == "192.0.2.0/24" and ban["until_utc"] == "2100-01-01T00:00:00.000Z"
    assert (data / "bans.jsonl").read_text().endswith('{"op":"add","netw')


# ------------------------------------------------------------------ statuses and zones


def test_exit_statuses_tell_found_nothing_and_incomplete_apart(
        capsys: pytest.CaptureFixture[str], data: Path) -> None:
    d = ["--data-dir", str(data)]
    assert run(capsys, "logs", "search", *d, "--at", AT)[0] == EXIT_OK
    code, out, err = run(capsys, "logs", "search", *d, "--at", "2026-03-29T04:00Z")
    assert (code, err.strip()) == (EXIT_NOTHING, "relay: no matching session")
    assert run(capsys, "logs", "connections", *d, "--session", "Zzzz")[0] == EXIT_NOTHING
    assert run(capsys, "logs", "packets", *d, "--client-ip", "192.0.2.99")[0] == EXIT_NOTHING
    assert run(capsys, "ban", "show", *d, "198.51.100.1")[0] == EXIT_NOTHING
    assert run(capsys, "ban", "show", *d, "192.0.2.9")[0] == EXIT_OK
    assert run(capsys, "status", *d)[0] == EXIT_NOTHING  # no relay runs on it
    # A segment the window needs is gone (retention deleted it: a chained delete):
    # the answer is incomplete, and says from when to when.
    from relay import chain
    from relay.packetlog import segments

    seg = next(p for p in segments.segment_files(data) if "20260329T000000Z" in p.name)
    sha, size = chain.file_digest(seg)
    chain.append_link(chain.chain_path(data, chain.PACKETS_CHAIN),
                      {"event": "delete", "file": seg.name, "size": size, "sha256": sha,
                       "reason": "disk guard"}, 0.0)
    seg.unlink()
    code, out, err = run(capsys, "logs", "search", *d, "--at", AT, "--json")
    assert code == EXIT_INCOMPLETE and json.loads(out)["session_id"] == SID["A"]
    assert "is deleted (disk guard): packets of 1 session(s) in it are unknown" in err, err
    assert "2026-03-29T00:45:00.000Z" in err  # the deleted segment's records' range
    # A window the deleted segment does not touch is whole.
    assert run(capsys, "logs", "search", *d, "--at", "2026-03-29T02:00Z")[0] == EXIT_OK


def test_a_time_without_a_zone_is_read_in_tz_and_said(
        capsys: pytest.CaptureFixture[str], data: Path) -> None:
    d = ["--data-dir", str(data)]
    code, out, err = run(capsys, "logs", "search", *d, "--at", "2026-03-29 09:45", "--tz",
                         "Asia/Tokyo", "--json")
    assert code == EXIT_OK and json.loads(out)["session_id"] == SID["A"]
    assert err == ("relay: note: times without a zone read in Asia/Tokyo: --at 2026-03-29 "
                   "09:45 is 2026-03-29T00:45:00.000Z\n")
    code, _, err = run(capsys, "logs", "packets", *d, "--from", "2026-03-29 00:45",
                       "--to", "2026-03-29T00:46Z")
    assert code == EXIT_OK and err == ("relay: note: times without a zone read in UTC: "
                                       "--from 2026-03-29 00:45 is 2026-03-29T00:45:00.000Z\n")
    # A time with its zone needs no note.
    assert run(capsys, "logs", "search", *d, "--at", AT)[2] == ""


def test_the_same_options_and_formats_on_every_reading_command(
        capsys: pytest.CaptureFixture[str], data: Path) -> None:
    """--format json|csv and --session/--client-ip/--at on connections, packets,
    ua-lookup and ban list; one session schema for search and ua-lookup."""
    d = ["--data-dir", str(data)]
    code, out, _ = run(capsys, "logs", "connections", *d, "--at", AT, "--format", "json")
    assert code == EXIT_OK
    assert {(r["session_id"], r["action"]) for r in map(json.loads, out.splitlines())} == {
        (SID["A"], "connect"), (SID["A"], "disconnect")}
    code, out, _ = run(capsys, "logs", "connections", *d, "--client-ip", "198.51.100.20",
                       "--format", "csv")
    lines = out.splitlines()
    assert code == EXIT_OK and lines[0].startswith("time,action,session_id,client,")
    assert len(lines) == 3 and all(SID["B"] in line for line in lines[1:])
    code, out, _ = run(capsys, "logs", "packets", *d, "--session", SID["C"][:8], "--format",
                       "csv")
    assert code == EXIT_OK and out.splitlines()[0].startswith("time,session_id,client_ip,")
    assert len(out.splitlines()) == 1 + 7
    search = json.loads(run(capsys, "logs", "search", *d, "--session", SID["A"], "--json")[1])
    code, out, _ = run(capsys, "logs", "ua-lookup", *d, "--json",
                       f"Mozilla/5.0 Firefox/{SID['A'][:8]}")
    assert code == EXIT_OK and json.loads(out) == search
    assert set(search) >= {"session_id", "server_id", "client_ip", "client_port", "protocol",
                           "virtual_ip", "connect", "connect_utc", "disconnect", "reason",
                           "bytes_in", "bytes_out", "destinations", "packets"}
    code, out, _ = run(capsys, "ban", "list", *d, "--format", "csv", "--tz", "+09:00")
    assert out.splitlines() == ["network,until,until_utc,offences,reason",
                                "192.0.2.0/24,2100-01-01T09:00:00.000+09:00,"
                                "2100-01-01T00:00:00.000Z,1,t"]


def test_ipv6_addresses_print_with_brackets(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    log = daylog.ConnectionLog(tmp_path)
    sid = "V6V6V6V6AAAAAAAAAAAAAA"
    log.append({"action": "connect", "session_id": sid, "protocol": "SSL-VPN",
                "client": {"ip": "2001:db8::7", "port": 40001, "hostname": None},
                "server": {"id": "relay-1", "ip": "2001:db8::1"}, "virtual_ip": "10.211.0.2",
                "client_software": {"name": "OpenConnect", "version": "9.12"}})
    log.close()
    code, out, _ = run(capsys, "logs", "connections", "--data-dir", str(tmp_path))
    assert code == EXIT_OK and "[2001:db8::7]:40001" in out
    code, out, _ = run(capsys, "logs", "search", "--data-dir", str(tmp_path))
    assert "[2001:db8::7]:40001" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import relay

    code, out, _ = run(capsys, "--version")
    assert code == EXIT_OK and out == f"relay {relay.__version__}\n"


# ------------------------------------------------------------------ client-config


def test_client_config_never_makes_a_certificate_the_relay_would_not_use(
        capsys: pytest.CaptureFixture[str], data: Path, tmp_path: Path) -> None:
    d = ["--data-dir", str(data)]
    code, _, err = run(capsys, "client-config", "openvpn", *d)
    assert code == EXIT_USAGE and "start relay serve once first" in err
    assert not (data / SELF_SIGNED_CERT).exists()
    from relay.tlsconf import ensure_self_signed

    ensure_self_signed(data, "relay.test")
    out_file = tmp_path / "r.ovpn"
    code, _, _ = run(capsys, "client-config", "openvpn", *d, "-o", str(out_file))
    assert code == EXIT_OK and out_file.stat().st_mode & 0o777 == 0o600
    assert "<ca>" in out_file.read_text()



def test_ipv6_clients_of_the_directory_access_log_print_with_brackets(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    log = daylog.ConnectionLog(tmp_path)
    log.append({"action": "list-download", "client": {"ip": "2001:db8::7", "port": 443},
                "status": 200, "request": {"method": "GET", "path": "/api/iphone/"}})
    log.close()
    code, out, _ = run(capsys, "logs", "access", "--data-dir", str(tmp_path))
    assert code == EXIT_OK and "[2001:db8::7]:443" in out


def test_a_session_id_that_starts_with_a_dash_is_a_value() -> None:
    """One session ID in 64 begins with "-" (URL-safe base64): argparse alone read
    ``--session -g9ZQ...`` as an unknown option (seen in a suite run)."""
    parser = cli.build_parser()
    sid = "-g9ZQFj6-5q4TJlYVA856A"
    args = parser.parse_args(["logs", "search", "--session", sid, "--json", "-o", "-"])
    assert (args.session, args.json, args.output) == (sid, True, "-")
    args = parser.parse_args(["logs", "packets", "--session", "--x", "--at", "--2"])
    assert (args.session, args.at) == ("--x", "--2")
    # An option of the command after a value-taking option is still that option.
    with pytest.raises(SystemExit):
        parser.parse_args(["logs", "search", "--session", "--json"])
    # After "--", nothing is rewritten.
    args = parser.parse_args(["ban", "add", "--reason", "-x", "--", "198.51.100.7"])
    assert args.reason == "-x"


def test_a_positional_session_id_that_starts_with_a_dash_is_told_the_way_out(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``relay sessions show -g9ZQ...`` cannot tell the ID from an option: the one
    error line names '--', the way every parser takes it; an unknown option that is
    no session ID gets no such hint."""
    sid = "-g9ZQFj6-5q4TJlYVA856A"
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["sessions", "show", sid])
    err = capsys.readouterr().err
    assert exit_.value.code == EXIT_USAGE and err.count("\n") == 1
    assert err.startswith(f"relay: error: unrecognized arguments: {sid}; put '--' before")
    assert f"(-- {sid})" in err
    assert cli.build_parser().parse_args(["sessions", "show", "--", sid]).id == sid
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["sessions", "show", "--bogus"])
    assert "'--'" not in capsys.readouterr().err
