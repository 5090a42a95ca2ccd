"""The package's layers (docs/architecture.md), checked rather than remembered: every import, including one inside
a function, goes to the module's own layer or below, and the module graph has no cycle.

An import of ``a.b.c`` counts as an edge to the module ``a.b.c`` (or the deepest existing module of that dotted
name); the package ``__init__`` files it runs on the way are not counted as edges of the importer. Imports under
``if TYPE_CHECKING:`` never run (annotations only) and are not counted."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fedshift": ROOT / "fedshift", "fedshift.strategies": ROOT / "strategies",
            "fedshift.clients": ROOT / "clients"}

# lowest first; a module may import its own layer and the layers before it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("fedshift.core",)),
    ("schema", ("fedshift.schema",)),
    ("components", ("fedshift.shift", "fedshift.data", "fedshift.nets", "fedshift.augment", "fedshift.adapt")),
    ("algorithm API", ("fedshift.strategies.base", "fedshift.strategies.server_optimizer",
                       "fedshift.strategies.multibranch", "fedshift.clients.base", "fedshift.clients.utils",
                       "fedshift.evaluation")),
    ("plug-ins", ("fedshift.strategies", "fedshift.clients")),
    ("composition", ("fedshift.scenario", "fedshift.build")),
    ("runtime", ("fedshift.runtime",)),
    ("apps", ("fedshift.apps", "fedshift")),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> int:
    best, index = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    assert index is not None, f"{module} is in no layer: add it to LAYERS in tests/test_layers.py"
    return index


def imports_of(module: str) -> list[tuple[int, str]]:
    """(line, module) of every fedshift import of ``module``, lazy ones included."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for n in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES and target != module:
                found.append((node.lineno, target))
    return found


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_go_to_the_same_layer_or_below():
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line} ({LAYERS[layer_of(m)][0]}) imports {t} "
              f"({LAYERS[layer_of(t)][0]})"
              for m in MODULES for line, t in imports_of(m) if layer_of(t) > layer_of(m)]
    assert not upward, "imports upwards:\n" + "\n".join(upward)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_module_graph_has_no_cycle():
    edges = {m: {t for _, t in imports_of(m)} for m in MODULES}
    assert cycles(edges) == []


def test_the_checks_see_what_they_must(tmp_path):
    # a cycle is found, an upward import is ranked upward, and a lazy import inside a function counts
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("fedshift.core.errors") < layer_of("fedshift.schema") < layer_of("fedshift.nets.models")
    assert layer_of("fedshift.strategies.base") < layer_of("fedshift.strategies.fedtkm") < layer_of("fedshift.build")
    assert layer_of("fedshift.runtime.worker") < layer_of("fedshift.apps.cli")
    lazy = [t for _, t in imports_of("fedshift.nets.modules")]
    assert "fedshift.core.tensors" in lazy  # imported inside feature_map_blocks
