"""``clbench perf --quick`` smoke test: every section runs and lands in the JSON, a method that
fails is reported as skipped without stopping the others. No timing assertions (speed is what
the command measures, not what a test can assert on a shared machine)."""
from __future__ import annotations

import json
import math

import pytest

from clbench.registry import METHODS, register_method
from clbench.strategy import CLStrategy


@pytest.fixture
def broken_method():
    """A registered method that fails at its first task, removed again afterwards."""
    @register_method("perf-broken", "fails in before_task")
    class Broken(CLStrategy):
        def before_task(self, task):
            raise RuntimeError("under construction")

    yield "perf-broken"
    METHODS._entries.pop("perf-broken")


def test_perf_quick_writes_every_section(tmp_path, monkeypatch, cli, broken_method):
    from clbench import perf

    measured = ["linear-probe", "sdlora", broken_method]
    monkeypatch.setattr(METHODS, "names", lambda: measured)  # a few methods keep this under 30 s
    monkeypatch.setattr(perf, "sdlora_script", lambda: None)  # exercise the strategy-driven path
    out_json = tmp_path / "perf.json"
    code, out, err = cli("perf", "--quick", "--json", out_json)
    assert code == 0, err

    figures = json.loads(out_json.read_text())
    harness = figures["harness"]
    assert harness["steps"] == math.ceil(harness["images"] / harness["batch_size"])
    assert harness["ratio"] > 0 and harness["clbench_s"] > 0 and harness["bare_s"] > 0
    assert set(figures["methods"]) == set(measured)
    assert figures["methods"][broken_method]["skipped"].startswith("RuntimeError: under construction")
    for name in ("linear-probe", "sdlora"):
        record = figures["methods"][name]
        for key in ("train_step_s", "eval_s_per_image", "train_step_vs_plain", "eval_vs_plain"):
            assert math.isfinite(record[key]) and record[key] > 0, (name, key)
        assert record["forward_passes_per_image"] == 1 and record["peak_mib"] is not None
    assert figures["methods"]["linear-probe"]["trainable_params"] < \
        figures["methods"]["sdlora"]["trainable_params"]  # head only vs head + LoRA pairs
    scaling = figures["sdlora_scaling"]
    assert scaling["source"].startswith("SDLoRA strategy") and scaling["tasks"] == 20
    assert scaling["step_ratio"] > 0 and scaling["eval_ratio"] > 0
    assert figures["loaders"]["digits"]["loader_images_per_s"] > 0
    fixture = figures["loaders"]["imagenet-r-fixture"]
    assert "skipped" in fixture or all(v > 0 for v in fixture["loader_images_per_s_by_workers"].values())

    for text in ("harness overhead", "linear-probe", "sdlora", "perf-broken: skipped",
                 "SD-LoRA step time after 20 tasks", "data loaders"):
        assert text in out, text
