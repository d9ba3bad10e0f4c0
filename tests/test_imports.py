"""No import cycles inside the package, counting imports inside functions too.

A lazy import inside a function still ties the two modules together (main once had train.py ->
experiments/compare.py -> train.py for `--compare`); the graph here is read from the source with
`ast`, so it sees every `import` / `from ... import` wherever it is written.

python -m pytest -q tests/test_imports.py
"""

import ast
import os
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "megatron_ultramem"


def _modules() -> Dict[str, str]:
    out = {}
    for base, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(base, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return out


def import_graph() -> Dict[str, Set[str]]:
    """module -> the package modules it imports (module level or not)."""
    modules = _modules()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from .x import y`: y may be a module of package x, else a name in module x
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[module] |= {t for t in targets if t in modules and t != module}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "megatron_ultramem.experiments.compare" in graph["megatron_ultramem.__main__"]  # in a function
    assert "megatron_ultramem.train" in graph["megatron_ultramem.experiments.compare"]
    # a cycle made of lazy imports is found
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []
