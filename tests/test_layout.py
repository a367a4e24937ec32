"""House rules read off the source tree: every file small enough to read in one sitting, one way to
leave autocast (``clbench.precision.exact``), gradient clipping through the core's
``clip_gradients`` hook rather than a method's own ``optimizer_step``."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

import clbench
from clbench.precision import exact

ROOT = Path(clbench.__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("clbench", "methods", "benchmarks")
                 for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
MAX_LINES = 400


def test_the_source_tree_is_where_this_test_reads_it():
    assert (ROOT / "clbench" / "strategy.py") in SOURCES and (ROOT / "methods").is_dir()
    assert any(p.parent.name == "prompt" for p in SOURCES)


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these files (at most {MAX_LINES} lines each): {long}"


def test_autocast_is_left_only_through_precision_exact():
    by_hand = re.compile(r"autocast\([^)]*enabled\s*=\s*False")
    sites = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES if p.name != "precision.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if by_hand.search(line)]
    assert not sites, f"use clbench.precision.exact(device) instead: {sites}"


def test_no_method_overrides_optimizer_step():
    """Clipping (and anything else before a step) goes through ``clip_gradients``, which the
    core calls before every step; an ``optimizer_step`` override would bypass the core's."""
    overrides = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in SOURCES
                 if p.parts[len(ROOT.parts)] in ("methods", "benchmarks")
                 for node in ast.walk(ast.parse(p.read_text()))
                 if isinstance(node, ast.FunctionDef) and node.name == "optimizer_step"]
    assert not overrides, overrides


def test_exact_regions_run_in_full_precision_inside_a_bf16_forward():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with exact(a.device):
            inside = a @ b
        with exact("cpu"):
            assert (a @ b).dtype == torch.float32
        assert (a @ b).dtype == torch.bfloat16  # autocast resumes after the region
    torch.testing.assert_close(inside, a @ b, rtol=0, atol=0)
