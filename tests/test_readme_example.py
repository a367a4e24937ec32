"""The documentation's "a method in one file" walk-through (docs/extending.md) is real code: run
as a plugin, it gives SimpleCIL's counts (the same rule: cosine to class means of the frozen
features)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

EXTENDING = Path(__file__).parents[1] / "docs" / "extending.md"


@pytest.mark.slow
def test_documented_plugin_example_runs_and_matches_simplecil(tmp_path, cli, tiny_checkpoint):
    code = re.search(r"```python\n(# nearest_mean\.py.*?)```", EXTENDING.read_text(), re.S).group(1)
    plugin = tmp_path / "nearest_mean.py"
    plugin.write_text(code)
    rc, _, err = cli("run", "--plugin", plugin, "--methods", "nearest-mean,simplecil", "--tasks", "2",
                     "--checkpoint", tiny_checkpoint, "--out", tmp_path, "--name", "ex", "--no-report")
    assert rc == 0, err
    results = {m: json.loads((tmp_path / "ex" / "digits-2tasks" / m / "seed-1993" / "results.json")
                             .read_text()) for m in ("nearest-mean", "simplecil")}
    assert results["nearest-mean"]["correct"] == results["simplecil"]["correct"]
    assert results["nearest-mean"]["trainable_params"] == [0, 0]
    rc, _, err = cli("run", "--plugin", plugin, "--methods", "nearest-mean", "--set",
                     "nearest-mean.temperature=0", "--out", tmp_path, "--name", "bad")
    assert rc == 2 and "temperature" in err
