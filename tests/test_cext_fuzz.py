"""Fuzzing of the C parsers under AddressSanitizer and UBSan, for a bounded time
each: the hot path and the OpenVPN data channel (packets from the network), and the
packet-log block codec (segments read back, maybe corrupt). libFuzzer through
tests/fuzz/run.sh, the documented command for longer runs. A missing clang or
libFuzzer runtime fails the test: it is never skipped."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
SECONDS = int(os.environ.get("RELAY_FUZZ_SECONDS", "25"))


def _make_corpus() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_corpus", FUZZ / "make_corpus.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_seed_corpus_is_up_to_date(tmp_path: Path) -> None:
    _make_corpus().main([str(tmp_path)])
    expected = _files(tmp_path)
    assert _files(FUZZ / "corpus") == expected, "run: python tests/fuzz/make_corpus.py"
    names = {n.removeprefix("hotpath/") for n in expected if n.startswith("hotpath/")}
    for kind in (
        "truncated",
        "ihl",
        "doff",
        "v6-ext",
        "empty-payload",
        "pipelined",
        "split-ua",
        "tls-sni",
        "garbage",
        "scan",
    ):
        assert any(kind in n for n in names), kind
    assert {"blockcodec/block-web", "blockcodec/records-web"} <= set(expected)
    assert {"ovpn/open-genuine", "ovpn/stream-genuine", "ovpn/runs", "ovpn/seal"} <= set(expected)


@pytest.mark.parametrize("target", ["hotpath", "blockcodec", "ovpn"])
def test_fuzz_bounded(tmp_path: Path, target: str) -> None:
    assert shutil.which("clang"), "clang is needed to fuzz the C code (apt-get install clang)"
    proc = subprocess.run(
        [str(FUZZ / "run.sh"), target, str(SECONDS)],
        env={**os.environ, "FUZZ_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=SECONDS + 240,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "Done " in log and "stat::number_of_executed_units" in log, log[-3000:]
    runs = int(log.split("stat::number_of_executed_units:")[1].split()[0])
    assert runs > 10_000, log[-3000:]
    assert not list(tmp_path.glob("crash-*"))
