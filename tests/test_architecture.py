"""The layer order, checked on the source: who may import whom, no cycles, imports on top.

protocol/ is the base every process agrees on; the queue, the actors and the learner sit
on it; launch/ (the entry points) sits on everything and nothing imports it. The checks
read every module's imports with ``ast``, so they fail on the commit that breaks a rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("protocol", "queue", "actors", "learner", "launch")
ALLOWED = {
    "protocol": {"protocol"},
    "queue": {"protocol", "queue"},
    "actors": {"protocol", "actors"},
    "learner": {"protocol", "queue", "learner"},
    "launch": set(PACKAGES),
}
"""Which packages a package's modules may import (the layer order)."""

DEFERRED = {
    ("actors/actor.py", "dashrl.actors.vllm_engine"),  # imports vLLM: only when engine=vllm
    ("launch/start.py", "dashrl.launch.cli"),  # only once launch/ is off sys.path
}
"""The only first-party imports allowed inside functions, each with its reason."""


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported dashrl module, whether inside a function) for each import in ``path``."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("dashrl."):
                out.append((child.module, in_function))
            elif isinstance(child, ast.Import):
                out.extend(
                    (a.name, in_function) for a in child.names if a.name.startswith("dashrl.")
                )
            fn = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            visit(child, in_function or fn)

    visit(tree, False)
    return out


def _modules() -> dict[str, Path]:
    return {
        str(p.relative_to(REPO)): p for pkg in PACKAGES for p in sorted((REPO / pkg).glob("*.py"))
    }


def test_every_package_imports_only_the_layers_below_it() -> None:
    bad = []
    for rel, path in _modules().items():
        pkg = rel.split("/")[0]
        for module, _ in _imports(path):
            target = module.split(".")[1]
            if target in PACKAGES and target not in ALLOWED[pkg]:
                bad.append(f"{rel} imports {module}")
    assert not bad, "\n".join(bad)


def test_first_party_imports_sit_at_the_top_of_files() -> None:
    inside = {(rel, m) for rel, p in _modules().items() for m, fn in _imports(p) if fn}
    assert inside <= DEFERRED, sorted(inside - DEFERRED)


def test_the_module_graph_has_no_cycle() -> None:
    """Depth-first search over module-level imports (TYPE_CHECKING ones included)."""
    graph: dict[str, set[str]] = {}
    for rel, path in _modules().items():
        name = "dashrl." + rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        graph[name] = {m for m, _ in _imports(path)}
    state: dict[str, int] = {}

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph:
                continue
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*stack, node, nxt])
            if nxt not in state:
                dfs(nxt, [*stack, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [])


def test_nothing_imports_the_entry_points() -> None:
    users = [
        f"{rel} imports {m}"
        for rel, p in _modules().items()
        if not rel.startswith("launch/")
        for m, _ in _imports(p)
        if m.startswith("dashrl.launch")
    ]
    assert not users, users


def package_graph() -> dict[str, set[str]]:
    """Which dashrl packages each package imports (``python tests/test_architecture.py``)."""
    out: dict[str, set[str]] = {pkg: set() for pkg in PACKAGES}
    for rel, path in _modules().items():
        pkg = rel.split("/")[0]
        out[pkg] |= {m.split(".")[1] for m, _ in _imports(path)} - {pkg}
    return out


if __name__ == "__main__":
    for pkg, deps in package_graph().items():
        print(f"{pkg:9} -> {', '.join(sorted(deps)) or '(nothing of ours)'}")
