"""The package's import graph: layers only point down (cli -> runner -> loop -> methods/evaluators -> data,
models, checkpoint, run dir), with no cycles. Read from the source with `ast`, function-level imports
included, so a lazy import cannot hide a back-edge."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "robustft"


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """module -> the robustft modules it imports (`from a import b` counts a.b when b is a module)."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                found |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if not state.get(nxt) and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (cycle := visit(node, [])):
            return cycle
    return None


def importers(graph: dict[str, set[str]], target: str) -> set[str]:
    return {m for m, deps in graph.items() if target in deps}


def test_graph_reader_sees_relative_lazy_and_from_imports(tmp_path):
    graph = import_graph()
    assert "robustft.runner" in graph["robustft.cli"]  # a lazy import inside cli.run
    assert "robustft.checkpoint" in graph["robustft.loop"]  # `from robustft import checkpoint as ckpt`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    graph = {m: deps - {m} for m, deps in import_graph().items()}
    # a package __init__ re-exporting its submodules is not a back-edge of the submodules
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not m.startswith(d + ".")}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_layers_point_down():
    graph = import_graph()
    # `python -m robustft` (robustft/__main__.py) is the console script too
    assert importers(graph, "robustft.cli") <= {"robustft.__main__"}, "nothing below the console script imports it"
    assert importers(graph, "robustft.launch") <= {"robustft.cli"}, "starting a run across processes is the CLI's"
    assert importers(graph, "robustft.parallel") <= {"robustft.loop"}, "only the loop wraps the training step"
    assert importers(graph, "robustft.runner") <= {"robustft.cli"}, "only the CLI starts runs"
    assert importers(graph, "robustft.loop") <= {"robustft.runner"}, "only the runner (and its stages) trains"
    below_loop = [m for m in graph if m.startswith(("robustft.methods", "robustft.robustness"))]
    for m in below_loop:
        assert not graph[m] & {"robustft.cli", "robustft.runner", "robustft.loop"}, m
