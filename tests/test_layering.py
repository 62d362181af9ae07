"""The package's import graph, read from the source (every import, in functions
too, and under TYPE_CHECKING): no cycle, and no import from a lower layer to a
higher one. Layers, lowest first (README "Layout", ARCHITECTURE.md): the shared
modules at the top of the package and the sans-IO protocols; connlog and
packetlog; investigate and central; serve; the apps. The concerns of one layer
stand on the layers below, not on each other. Protocols import nothing of the
relay but protocols. Inside serve, the links know the core only through the seam:
the seam and the datapath below the links, the links below the core."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import relay

PACKAGE = Path(relay.__file__).parent
# Top-level modules that are applications (commands), not shared building blocks.
APPS = {"relay.cli", "relay.opscli", "relay.docgen", "relay.doctor", "relay.service",
        "relay.demo", "relay.netns"}
# Sub-packages by layer (the top-level modules not in APPS are layer 0).
LAYERS = {"relay.protocols": 0, "relay.connlog": 1, "relay.packetlog": 1,
          "relay.investigate": 2, "relay.central": 2, "relay.serve": 3}
APP_LAYER = 4
# Inside serve: what a module may import of serve is what sits lower here; a
# module not listed is a building block (tap, sessions, hot path, NAT, abuse, ...).
SERVE_LEVELS = {"relay.serve.link": 1, "relay.serve.datapath": 2,
                "relay.serve.dtls_link": 3,  # the CSTP link's DTLS channel
                "relay.serve.cstp_link": 4, "relay.serve.openvpn_link": 4,
                # The worker runs the links; the control plane runs workers (as
                # processes: it imports none of them) and speaks relay.serve.wire.
                "relay.serve.worker": 5, "relay.serve.core": 5}
# Imports that break the rules, each waiting on the issue named; this test fails
# when one is gone too, so that the list shrinks as they are fixed. None today.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    """Every Python module of the package, imported (the C extension is no source)."""
    found = {"relay": PACKAGE / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE)], "relay."):
        module = importlib.import_module(info.name)
        assert module.__file__ is not None
        if module.__file__.endswith(".py"):
            found[info.name] = Path(module.__file__)
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The relay module an imported name lives in (a package for a name in it)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # "from relay.serve import rdns" imports a module, "from x import y" a name.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target == "relay" or target.startswith("relay."):
                module = resolve(target, known)
                if module is not None and module != name:
                    found.add(module)
    return found


def concern(name: str) -> str:
    """The sub-package a module belongs to; "shared" or "apps" at the top."""
    for package in LAYERS:
        if name == package or name.startswith(package + "."):
            return package
    return "apps" if name in APPS else "shared"


def layer(name: str) -> int:
    where = concern(name)
    return LAYERS.get(where, APP_LAYER if where == "apps" else 0)


def problem(src: str, dst: str) -> str | None:
    if src.startswith("relay.protocols.") and not dst.startswith("relay.protocols"):
        return "a protocol imports the relay"
    if layer(dst) > layer(src):
        return f"layer {layer(src)} imports layer {layer(dst)}"
    if layer(dst) == layer(src) and 0 < layer(src) < APP_LAYER \
            and concern(src) != concern(dst):
        return "a concern imports another of its own layer"
    if concern(src) == concern(dst) == "relay.serve" \
            and SERVE_LEVELS.get(dst, 0) >= max(SERVE_LEVELS.get(src, 0), 1):
        return "inside serve, an import upwards (or sideways between links)"
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_imports_and_is_in_the_graph(graph: dict[str, set[str]]) -> None:
    for name in SERVE_LEVELS:
        assert name in graph
    links = {"relay.serve.link", "relay.serve.datapath", "relay.serve.cstp_link",
             "relay.serve.openvpn_link"}
    assert graph["relay.serve.worker"] >= links
    # The control plane holds no link: the workers do.
    assert not graph["relay.serve.core"] & links
    assert graph["relay.serve.core"] >= {"relay.serve.wire", "relay.serve.rpc"}
    # Imports inside functions count too (cli imports serve's core lazily).
    assert "relay.serve.core" in graph["relay.cli"]


def test_no_import_from_a_lower_layer_to_a_higher_one(graph: dict[str, set[str]]) -> None:
    found = {(src, dst): why for src, dsts in graph.items() for dst in dsts
             if (why := problem(src, dst)) is not None}
    unexpected = {edge: why for edge, why in found.items() if edge not in KNOWN_EXCEPTIONS}
    assert unexpected == {}
    assert set(found) == KNOWN_EXCEPTIONS, "a known exception is fixed: strike it off the list"


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    # Iterative depth-first search; a back edge closes a cycle.
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                cycle = [*path[path.index(child):], child]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))


def test_the_rules_catch_what_they_are_for() -> None:
    """The checker itself: each rule flags its case and lets the right ones by."""
    assert problem("relay.serve.cstp_link", "relay.serve.core") is not None
    assert problem("relay.serve.openvpn_link", "relay.serve.cstp_link") is not None
    assert problem("relay.serve.link", "relay.serve.datapath") is not None
    assert problem("relay.serve.datapath", "relay.serve.link") is None
    assert problem("relay.serve.core", "relay.serve.tap") is None
    assert problem("relay.serve.tap", "relay.serve.core") is not None
    assert problem("relay.serve.sessions", "relay.serve.link") is not None
    assert problem("relay.serve.link", "relay.serve.sessions") is None
    assert problem("relay.protocols.cstp", "relay.errors") is not None
    assert problem("relay.config", "relay.protocols.syslog5424") is None
    assert problem("relay.connlog.daylog", "relay.serve.sessions") is not None
    assert problem("relay.packetlog.segments", "relay.connlog.daylog") is not None
    assert problem("relay.investigate.search", "relay.packetlog.segments") is None
    assert problem("relay.cli", "relay.serve.core") is None
    assert problem("relay.metrics", "relay.cli") is not None
