"""The documents made from the code: relay(8), relay.toml(5), the bash completion
and the README's config table are what python -m relay.docgen makes now (so
they cannot drift), man renders the pages without a warning, and the completion
completes commands, options and their values."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay import config, docgen
from relay.cli import build_parser


def test_committed_documents_are_what_the_code_makes() -> None:
    proc = subprocess.run([sys.executable, "-m", "relay.docgen", "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_man_pages_render_without_warnings_and_hold_everything() -> None:
    assert shutil.which("man"), "man missing: apt-get install man-db groff-base"
    for page in (docgen.MAN_RELAY, docgen.MAN_CONFIG):
        proc = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True,
                              text=True, env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"},
                              timeout=60)
        assert proc.returncode == 0 and proc.stderr == "", (page, proc.stderr)
    relay8 = subprocess.run(["man", "-l", str(docgen.MAN_RELAY)], capture_output=True,
                            text=True, env={"MANWIDTH": "200", "PATH": "/usr/bin:/bin"}).stdout
    for cmd in docgen.commands(build_parser()):
        assert " ".join(cmd.path) in relay8
        for action in cmd.parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            for option in action.option_strings:
                assert option in relay8, (cmd.path, option)
    assert "EXIT STATUS" in relay8 and "results printed, but files" in relay8
    toml5 = docgen.MAN_CONFIG.read_text()
    for name, cls, _ in config.sections():
        assert f".SH [{name}]" in toml5
        for key, _, _ in config.keys(cls):
            assert f"\\fB{docgen.roff(key)}\\fR = " in toml5


def complete(*words: str, cwd: Path | None = None) -> list[str]:
    """What the completion offers with the cursor on the last of ``words``."""
    script = (f"source {docgen.COMPLETION}\n"
              f"COMP_WORDS=(relay {' '.join(repr(w) for w in words)})\n"
              f"COMP_CWORD={len(words)}\n_relay\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return sorted(line for line in proc.stdout.splitlines() if line)


@pytest.mark.parametrize(("words", "offered"), [
    (("lo",), ["logging", "logs"]),
    (("logs", "se"), ["search"]),
    (("logs", "search", "--fo"), ["--format"]),
    (("logs", "search", "--format", ""), ["csv", "json", "table"]),
    (("logs", "search", "--tz", "Asia/Tokyo", "--se"), ["--server-ip", "--session"]),
    (("sessions", ""), ["disconnect", "list", "show"]),
    (("ban", "add", "--f"), ["--for", "--force", "--format"]),
    (("logging", "on", "--d"), ["--data-dir", "--dev"]),
    (("client-config", "openvpn", "--proto", ""), ["tcp", "udp"]),
    (("config", ""), ["check", "example"]),
])
def test_bash_completion(words: tuple[str, ...], offered: list[str]) -> None:
    assert complete(*words) == offered


def test_bash_completion_offers_directories_and_files(tmp_path: Path) -> None:
    (tmp_path / "data1").mkdir()
    (tmp_path / "data2.toml").write_text("")
    assert complete("status", "--data-dir", "da", cwd=tmp_path) == ["data1"]
    assert complete("status", "--config", "da", cwd=tmp_path) == ["data1", "data2.toml"]
