"""The layering rule (docs/DESIGN.md, "What lives where"), checked on the source:

- `edgemoe.node` (what every device runs) never imports `edgemoe.coordinator`;
- the engine (the streaming model, the per-layer dispatcher, the expert store, cache and
  compute, the generation loop) never reaches the daemon, the CLI, the server or the
  cluster client, directly or through another module;
- `edgemoe.protos` imports nothing of ours;
- no import cycles, and no hand-written module over MAX_LINES.

Imports inside functions count (they run when called); those under `if TYPE_CHECKING:`
do not (they never run). Module names come from pyproject's package-dir, as installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 400

ENGINE = {
    "edgemoe.coordinator.streaming",
    "edgemoe.coordinator.dispatch",
    "edgemoe.coordinator.counters",
    "edgemoe.coordinator.generate",
    "edgemoe.node.store",
    "edgemoe.node.pending",
    "edgemoe.node.cache",
    "edgemoe.node.local",
    "edgemoe.node.misses",
    "edgemoe.node.staging",
    "edgemoe.node.mapped",
    "edgemoe.node.filemap",
    "edgemoe.node.prefetch",
    "edgemoe.node.direct_io",
    "edgemoe.node.compute",
    "edgemoe.node.manifest",
    "edgemoe.node.architecture",
}
DAEMON = ("edgemoe.node.daemon", "edgemoe.node.service", "edgemoe.node.advertise")
CLI = ("edgemoe.coordinator.cli", "edgemoe.coordinator.commands", "edgemoe.coordinator.chat")
SERVER = ("edgemoe.coordinator.server",)
CLUSTER_CLIENT = ("edgemoe.coordinator.cluster", "edgemoe.coordinator.peers", "edgemoe.coordinator.discovery")


def package_dirs() -> dict[str, Path]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {name: REPO / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def source_modules() -> dict[str, Path]:
    """Every module of ours by its import name (subpackages of a mapped folder included)."""
    modules: dict[str, Path] = {}
    for package, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that `name` imports (a `from X import Y` of a submodule Y counts as X.Y)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            for child in ast.iter_child_nodes(node):
                visit(child)
            return
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)

    visit(ast.parse(path.read_text(), str(path)))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = source_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_our_modules(graph):
    # A parser that found nothing would pass every rule below.
    assert ENGINE <= set(graph)
    assert "edgemoe.coordinator.dispatch" in graph["edgemoe.coordinator.loader"]
    assert "edgemoe.node.local" in graph["edgemoe.coordinator.dispatch"]
    assert "edgemoe.coordinator.server.worker" in reachable(graph, "edgemoe.coordinator.cli")


def test_node_never_imports_the_coordinator(graph):
    bad = {(m, t) for m, targets in graph.items() if m.startswith("edgemoe.node") for t in targets
           if t.startswith("edgemoe.coordinator")}
    assert not bad


def test_the_engine_never_reaches_daemon_cli_server_or_cluster_client(graph):
    forbidden = DAEMON + CLI + SERVER + CLUSTER_CLIENT
    bad = {m: sorted(t for t in reachable(graph, m) if _under(t, forbidden)) for m in ENGINE}
    assert not {m: t for m, t in bad.items() if t}


def test_protos_import_nothing_of_ours(graph):
    bad = {(m, t) for m, targets in graph.items() if m.startswith("edgemoe.protos") for t in targets
           if not t.startswith("edgemoe.protos")}
    assert not bad


def test_no_import_cycles(graph):
    cycles = [m for m in graph if m in reachable(graph, m)]
    assert not cycles, f"modules on an import cycle: {sorted(cycles)}"


def test_no_module_is_too_long_to_read():
    long = {str(p.relative_to(REPO)): n for p in source_modules().values()
            if "_pb2" not in p.name and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these along their seams: {long}"
