"""The import rules of agent/ (docs/design.md, "The map"): no two modules
import each other, even only for type checking, and each folder imports
only what its process may load. Read from the source with ast, so that an
import inside a function or under TYPE_CHECKING counts too."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"
NATIVE = "agent._native"  # the C extension, built by cffi

# What a folder may import besides itself and the shared modules (agent/*.py
# other than the two entry points). agent.core.main is the one module that
# knows both the core's loop and the status server.
EXTRA: dict[str, set[str]] = {
    "agent.__main__": {"agent.watchdog", "agent.core.main"},
    "agent.watchdog": {"agent.control.tokens"},  # it writes the tokens the status server checks
    "agent.core.main": {"agent.control.server", "agent.control.provider"},
    "control": {"agent.core.pool", "agent.core.engine"},  # the data it shows, not the loop
    "cli": {"agent.control.client"},  # agentctl never loads the core or the engine
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(AGENT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(AGENT.rglob("*.py"))}


def imported(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """The modules of agent/ (and the extension) that a module's source names."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                # `from agent.core import policy` imports a module; `from
                # agent.core.pool import App` imports from one.
                full = f"{base}.{alias.name}"
                yield full if full in known or full == NATIVE else base


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = imported(tree, name, path.name == "__init__.py", known)
        graph[name] = {t for t in targets if (t in known or t == NATIVE) and t != name}
    return graph


def area(name: str) -> str:
    """The folder a module belongs to: core, control, cli, loaders, or
    shared (agent/*.py); the two entry points stand alone."""
    parts = name.split(".")
    if name in ("agent.__main__", "agent.watchdog"):
        return name
    if len(parts) > 1 and parts[1] in ("core", "control", "cli", "loaders"):
        return parts[1]
    return "shared"


def may_import(source: str, target: str) -> bool:
    if target == NATIVE:
        return source == "agent.core.engine"  # the one typed wrapper of the C side
    here, there = area(source), area(target)
    if here == "loaders":
        # Copied beside the app and run by its own interpreter: nothing of
        # the agent but the speedups and the loaders beside it (`from .
        # import`, where the agent's tests import the loader from the package).
        return target == "agent.loaders" or area(target) == "loaders"
    if there == "shared":
        return True
    if here == "shared":
        return False
    if here == there:
        return True
    return target in EXTRA.get(source, set()) | EXTRA.get(here, set())


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*stack[stack.index(target):], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "agent.core.pool" in graph["agent.core.policy"]          # from agent.core.pool import ...
    assert "agent.core.policy" in graph["agent.core.loop"]          # from agent.core import policy
    assert "agent.core.main" in graph["agent.__main__"]             # inside a function
    assert NATIVE in graph["agent.core.engine"]


def test_no_module_imports_itself_through_others() -> None:
    assert find_cycle(import_graph()) is None


def test_find_cycle_reports_one_under_type_checking() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from agent.a import A\n"
    graph = {"agent.b": set(imported(ast.parse(source), "agent.b", False, {"agent.a"})), "agent.a": {"agent.b"}}
    assert find_cycle(graph) == ["agent.a", "agent.b", "agent.a"]


def test_each_folder_imports_only_what_its_process_may() -> None:
    wrong = sorted(f"{source} -> {target}" for source, targets in import_graph().items()
                   for target in targets if not may_import(source, target))
    assert wrong == []


# The loaders' own C module (csrc/loader_speedups.c), installed next to them.
LOADER_SPEEDUPS = "_agent_loader_speedups"
# The loaders themselves, copied into one directory: one may import another.
LOADERS = {path.stem for path in (AGENT / "loaders").glob("*.py")} - {"__init__"}


# What a loader takes from the app's environment when it is there (uvloop for
# agent_asgi_loop auto): only inside a try that catches ImportError.
FROM_THE_APPS_ENVIRONMENT = {"uvloop"}


def guarded_by_import_error(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """node sits in the body of a try with an `except ImportError`."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body and any(
                isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in parent.handlers):
            return True
        child, parent = parent, parents.get(parent)
    return False


def test_loaders_use_the_standard_library_only() -> None:
    for path in (AGENT / "loaders").glob("*.py"):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                if name in FROM_THE_APPS_ENVIRONMENT:
                    assert guarded_by_import_error(node, parents), f"{path.name} imports {name} unguarded"
                    continue
                assert name.split(".")[0] in sys.stdlib_module_names or name in {LOADER_SPEEDUPS, *LOADERS}, \
                    f"{path.name} imports {name}"


def test_an_import_from_the_apps_environment_must_be_guarded() -> None:
    guarded = ast.parse("try:\n    import uvloop\nexcept ImportError:\n    pass\n")
    bare = ast.parse("try:\n    import uvloop\nexcept ValueError:\n    pass\n")
    for tree, expected in ((guarded, True), (bare, False)):
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.Import))
        assert guarded_by_import_error(node, parents) is expected
