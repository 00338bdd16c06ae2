"""The package's import graph: no cycles (function-level imports count), and imports point down."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mamlpp"
# Layers, top to bottom. A module may import its own layer's modules and those below, never above.
TOP = {"mamlpp", "mamlpp.api", "mamlpp.cli", "mamlpp.__main__", "mamlpp.bench", "mamlpp.report", "mamlpp.sample",
       "mamlpp.sweep", "mamlpp.data.cli", "mamlpp.launch"}
RUN = {"mamlpp.experiment", "mamlpp.evaluation", "mamlpp.trainer"}


def module_graph() -> dict[str, set[str]]:
    modules = {}
    for f in PACKAGE.rglob("*.py"):
        parts = ("mamlpp",) + f.relative_to(PACKAGE).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in modules.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            # a package's own __init__ is not an edge from its submodules (Python imports it first anyway)
            edges |= {c for c in candidates if c in modules and c != name and not name.startswith(c + ".")}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(module_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_down():
    graph = module_graph()
    assert "mamlpp.trainer" in graph and "mamlpp.cli" in graph  # the walk found the package
    upward = []
    for module, targets in graph.items():
        above = TOP | RUN if module not in TOP | RUN else (TOP if module in RUN else set())
        upward += [f"{module} -> {t}" for t in targets if t in above]
    assert upward == []
