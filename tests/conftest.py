"""Shared fixtures. End-to-end tests need root and the Debian packages that
``./run.sh test`` installs; without them they fail loudly, never skip."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from shiputil import Pki, make_pki

from relay.netns import Topology

REQUIRED_TOOLS = ("ip", "nft", "openconnect", "openvpn", "nginx", "curl", "ss", "tshark", "tc")
_counter = itertools.count()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def require_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (network namespaces, TAP, nftables)")
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: run ./run.sh setup (or ./run.sh test)")


@pytest.fixture
def make_topology(request: pytest.FixtureRequest) -> Iterator[Callable[..., Topology]]:
    """Build a namespace topology; on failure, print every log it collected."""
    require_root_and_tools()
    made: list[Topology] = []

    def make(clients: int = 1) -> Topology:
        topo = Topology(prefix=f"rt{os.getpid() % 1000}x{next(_counter)}", clients=clients)
        made.append(topo)
        return topo.create()

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for topo in made:
        if failed:
            for path in sorted(topo.workdir.glob("*.log")) + sorted(topo.workdir.glob("*.out")):
                print(f"----- {path.name} -----\n{path.read_text(errors='replace')[-4000:]}")
        topo.destroy()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A test CA, a wrong CA, and server and client certificates from each."""
    return make_pki(tmp_path / "pki")
