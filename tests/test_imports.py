"""The package's import graph, read from the source: no cycles, every import of a package module at the top of its
module, and the lower layers never reaching up (the data layer and the tasks import nothing of the run)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "livt_ds"
RUN_LAYER = {"livt_ds.engine", "livt_ds.evaluate", "livt_ds.checkpoint", "livt_ds.train_state", "livt_ds.provenance",
             "livt_ds.run_log", "livt_ds.step_feed", "livt_ds.weights", "livt_ds.model_record", "livt_ds.universal",
             "livt_ds.predict", "livt_ds.cli", "livt_ds.compare", "livt_ds.hub"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(tree: ast.Module, modules: set[str]) -> list[tuple[ast.stmt, str]]:
    """(statement, imported package module) for every import of a livt_ds module, wherever it sits."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "livt_ds":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((node, sub if sub in modules else node.module))
        elif isinstance(node, ast.Import):
            found += [(node, alias.name) for alias in node.names if alias.name.split(".")[0] == "livt_ds"]
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """module -> the package modules it imports; and "module:line" of every import below the top level."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph, nested = {}, []
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        top = {id(node) for node in tree.body}
        imports = package_imports(tree, set(files))
        graph[name] = {target for _, target in imports if target in files}
        nested += [f"{name}:{node.lineno}" for node, _ in imports if id(node) not in top]
    return graph, nested


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each reported once, from where the walk met it)."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    return found


def test_no_import_cycles():
    graph, _ = import_graph()
    assert len(graph) > 40 and "livt_ds.engine" in graph and "livt_ds.data.pipeline" in graph
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_package_imports_sit_at_the_top_of_each_module():
    _, nested = import_graph()
    assert nested == []


def test_lower_layers_import_nothing_of_the_run():
    graph, _ = import_graph()
    lower = {name: sorted(targets & RUN_LAYER) for name, targets in graph.items()
             if name.startswith(("livt_ds.data", "livt_ds.models")) or name == "livt_ds.tasks"}
    assert "livt_ds.data.shards" in lower and "livt_ds.tasks" in lower
    assert {name: up for name, up in lower.items() if up} == {}
