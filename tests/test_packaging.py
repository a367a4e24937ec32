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
