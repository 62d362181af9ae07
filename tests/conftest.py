"""Shared fixtures. End-to-end tests need root and the Debian packages that
``./run.sh test`` installs; without them they fail loudly, never skip."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families
from shiputil import Pki, make_pki

from relay.connlog import reader
from relay.netns import Topology, run, wait_for

REQUIRED_TOOLS = ("ip", "nft", "openconnect", "openvpn", "nginx", "curl", "ss", "tshark", "tc")


# Fixtures that build network namespaces: a test using one must carry the netns
# marker, so that `./run.sh test -m 'not netns'` is the fast unit run.
NETNS_FIXTURES = frozenset({"make_topology", "make_module_topology", "tapns"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = [item.nodeid for item in items
                if NETNS_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("netns") is None]
    if unmarked:
        raise pytest.UsageError(f"tests that build network namespaces lack the netns "
                                f"marker: {unmarked}")


# Topologies alive now: a failing test's report carries their logs.
LIVE_TOPOLOGIES: list[Topology] = []
LOG_TAIL_CHARS = 4000
# A SIGKILLed process (its process group: ip netns exec and the client) is reaped
# within this: seconds on an idle machine, but 5 s was not always enough at a load
# average of 40 (a client stopped with SIGSTOP first, then killed).
REAP_TIMEOUT_S = 30


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for topo in LIVE_TOPOLOGIES:
            for path in sorted(topo.workdir.glob("*.log")) + sorted(topo.workdir.glob("*.out")):
                report.sections.append((f"{topo.prefix} {path.name}",
                                        path.read_text(errors="replace")[-LOG_TAIL_CHARS:]))


def require_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (network namespaces, TAP, nftables)")
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: run ./run.sh setup (or ./run.sh test)")


@contextlib.contextmanager
def topologies() -> Iterator[Callable[..., Topology]]:
    """A factory of namespace topologies, all destroyed at the end."""
    require_root_and_tools()
    made: list[Topology] = []

    def make(clients: int = 1) -> Topology:
        # Random per topology: two test runs at once (or a leftover of a killed one)
        # never share a namespace name.
        topo = Topology(prefix=f"rt{secrets.token_hex(4)}", clients=clients)
        made.append(topo)
        LIVE_TOPOLOGIES.append(topo)
        return topo.create()

    try:
        yield make
    finally:
        for topo in made:
            LIVE_TOPOLOGIES.remove(topo)
            topo.destroy()


@pytest.fixture
def make_topology() -> Iterator[Callable[..., Topology]]:
    """Build namespace topologies for one test."""
    with topologies() as make:
        yield make


@pytest.fixture(scope="module")
def make_module_topology() -> Iterator[Callable[..., Topology]]:
    """Build namespace topologies shared by the tests of one module (each relay
    start compiles the eBPF capture: seconds on a loaded machine)."""
    with topologies() as make:
        yield make


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A new event loop, also the current one: synchronous calls that start tasks
    (the core's close_session) find it, whatever an earlier test left behind."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A test CA, a wrong CA, and server and client certificates from each."""
    return make_pki(tmp_path / "pki")


def records(data: Path, action: str | None = None) -> list[dict[str, Any]]:
    """The connection-log records of a data directory, of one action or all."""
    return [r for r in reader.iter_records(data) if action is None or r["action"] == action]


def wait_records(data: Path, action: str, count: int, timeout: float = 20
                 ) -> list[dict[str, Any]]:
    """Wait until the connection log holds ``count`` records of ``action``."""
    wait_for(lambda: len(records(data, action)) >= count, timeout, f"{count} {action} records")
    return records(data, action)


def scrape(topo: Topology) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The relay's metrics (default address, in the relay namespace): (name,
    sorted labels) -> value."""
    text = run(["curl", "-sS", "--fail", "http://127.0.0.1:9810/metrics"], topo.relay_ns).stdout
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


# setns(2)'s flag for a network namespace (linux/sched.h).
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """fn on a thread that joined namespace ``ns`` (setns changes only the calling
    thread), so the sockets and TAP devices it makes live there."""
    out: dict[str, Any] = {}

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            out["value"] = fn()
        except BaseException as exc:
            out["err"] = exc
        finally:
            os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "err" in out:
        raise out["err"]
    return out["value"]  # type: ignore[no-any-return]
