"""The installed ``clbench.methods``/``clbench.benchmarks`` never mix with another checkout's
``clbench`` (an editable install maps them to its own tree whatever ``clbench`` is imported)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import clbench

ROOT = Path(clbench.__file__).resolve().parents[1]


def _import(cwd: Path, module: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__file__)"],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_a_second_checkouts_clbench_is_refused_with_the_installed_methods(tmp_path):
    shutil.copytree(ROOT / "clbench", tmp_path / "clbench",
                    ignore=shutil.ignore_patterns("__pycache__", "assets"))
    for module in ("clbench.methods", "clbench.benchmarks"):
        result = _import(tmp_path, module)  # `clbench` from tmp_path (cwd first on sys.path)
        assert result.returncode != 0, result.stdout
        assert "two checkouts are mixed" in result.stderr, result.stderr


def test_one_checkout_imports_its_own_methods():
    result = _import(ROOT, "clbench.methods")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == ROOT / "methods" / "__init__.py"


def _imports(path: Path) -> set[str]:
    """Every clbench module a file imports, at any level (lazy imports count too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clbench"):
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("clbench")}
    return found


def _unit(module: str) -> str:
    """Subpackages count as one unit (clbench.perf.e2e → clbench.perf)."""
    parts = module.split(".")
    grouped = ("perf", "report", "methods", "benchmarks")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1] in grouped else module


def test_no_import_cycle_between_modules_or_subpackages():
    graph: dict[str, set[str]] = {}
    modules = {}
    for folder, package in (("clbench", "clbench"), ("methods", "clbench.methods"),
                            ("benchmarks", "clbench.benchmarks")):
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts
                     if p != "__init__"]
            modules[".".join([package, *parts])] = path
    for module, path in modules.items():
        targets = {_unit(m) for m in _imports(path) if m in modules} - {_unit(module)}
        graph.setdefault(_unit(module), set()).update(targets)

    def reaches(start, goal, seen):
        return any(t == goal or (t not in seen and (seen.add(t) or reaches(t, goal, seen)))
                   for t in graph.get(start, ()))

    cycles = sorted(f"{a} ↔ {b}" for a in graph for b in graph[a] if reaches(b, a, set()))
    assert not cycles, cycles
