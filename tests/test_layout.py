"""Every Flower detail lives in fedshift/runtime/flower/: no other module imports flwr or ray, not even inside a
function (the in-process executor and everything it uses must run where neither is installed), and the deprecated
``run_simulation`` is called in one place."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [ROOT / "fedshift", ROOT / "strategies", ROOT / "clients"]
FLOWER = ROOT / "fedshift" / "runtime" / "flower"
# the plain-Flower comparison of `fedshift bench` ("written as Flower's tutorials write it") is Flower by design
ALLOWED = {ROOT / "fedshift" / "apps" / "flower_baseline.py"}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _modules():
    for package in PACKAGES:
        yield from sorted(package.rglob("*.py"))


def test_only_the_flower_folder_imports_flwr_or_ray():
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for path in _modules() if FLOWER not in path.parents and path not in ALLOWED
                 for line, name in _imports(path) if name.split(".")[0] in ("flwr", "ray")]
    assert not offenders, "\n".join(offenders)


def test_run_simulation_is_called_in_one_place():
    calls = [f"{path.relative_to(ROOT)}:{node.lineno}"
             for path in _modules() if path not in ALLOWED
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "run_simulation"]
    assert calls == ["fedshift/runtime/flower/runtime.py:" + calls[0].split(":")[1]] and len(calls) == 1, calls


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    probe = tmp_path / "m.py"
    probe.write_text("def f():\n    import ray.util\n    from flwr.app import Message\n")
    assert [name for _, name in _imports(probe)] == ["ray.util", "flwr.app"]
