"""``clbench perf``: every section runs through its real path and its figures are consistent with
what was run (image counts, ratios of the printed rates, the extrapolation's arithmetic). No
timing assertions beyond "positive and finite" (speed is what the command measures, not what a
test can assert on a shared machine)."""
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


def perf_main(capsys, *argv):
    from clbench.perf.__main__ import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_perf_quick_writes_every_section(tmp_path, monkeypatch, cli, broken_method):
    measured = ["linear-probe", "sdlora", "ease", broken_method]
    monkeypatch.setattr(METHODS, "names", lambda: measured)  # a few methods keep this under 30 s
    out_json = tmp_path / "perf.json"
    code, out, err = cli("perf", "--quick", "--json", out_json)  # the CLI's own parser
    assert code == 0, err

    figures = json.loads(out_json.read_text())
    harness = figures["harness"]
    assert harness["steps"] == math.ceil(harness["images"] / harness["batch_size"])
    assert harness["ratio"] == pytest.approx(harness["clbench_s"] / harness["bare_s"])
    assert set(figures["methods"]) == set(measured)
    assert figures["methods"][broken_method]["skipped"].startswith("RuntimeError: under construction")
    for name in ("linear-probe", "sdlora"):
        record = figures["methods"][name]
        for key in ("train_step_s", "eval_s_per_image", "train_step_vs_plain", "eval_vs_plain"):
            assert positive(record[key]), (name, key)
        assert record["train_step_vs_plain"] == pytest.approx(
            record["train_step_s"] / record["plain_train_step_s"])
        assert record["forward_passes_per_image"] == 1 and record["peak_mib"] is not None
        assert record["tasks_trained"] == 2  # --quick: the second task's steps, then evaluation
    # A method with a pass per task shows the cost of the tasks it has learnt, not of the first.
    ease = figures["methods"]["ease"]
    assert ease["forward_passes_per_image"] == 2 and ease["tasks_trained"] == 2
    assert figures["methods"]["linear-probe"]["trainable_params"] < \
        figures["methods"]["sdlora"]["trainable_params"]  # head only vs head + LoRA pairs
    scaling = figures["sdlora_scaling"]
    assert scaling["source"].startswith("SD-LoRA adapter states") and scaling["tasks"] == 20
    assert scaling["step_ratio"] == pytest.approx(scaling["step_task20_s"] / scaling["step_task1_s"])
    loaders = figures["loaders"]
    assert positive(loaders["digits"]["loader_images_per_s"])
    tree = loaders["imagenet-r-tree"]
    assert tree["workers"] >= 1  # all cores by default, as a user would run it
    assert tree["train_images"] == 4 * 8 and tree["test_images"] == 4 * 8
    assert positive(tree["train_images_per_s"]) and positive(tree["test_images_per_s"])
    for text in ("harness overhead", "linear-probe", "sdlora", "perf-broken: skipped",
                 "SD-LoRA step time after 20 tasks", "data loaders"):
        assert text in out, text


def test_jpeg_tree_is_read_by_the_imagenet_r_benchmark(tmp_path):
    """200 classes in the tree → the real ``imagenet-r`` benchmark loads it (same layout, marker)."""
    from clbench.perf import jpeg_tree
    from clbench.registry import BENCHMARKS

    spec = jpeg_tree.TreeSpec(classes=200, train_per_class=1, test_per_class=1, side=24)
    info = jpeg_tree.generate(tmp_path, spec, processes=2)
    assert (info["n_train"], info["n_test"], info["reused"]) == (200, 200, False)
    split = BENCHMARKS.get("imagenet-r")(data_dir=tmp_path).load(16)
    assert len(split.train) == len(split.test) == 200
    assert sorted(set(split.train.targets)) == list(range(200))
    x, _ = split.train[0]
    assert tuple(x.shape) == (3, 16, 16)
    assert jpeg_tree.generate(tmp_path, spec)["reused"] is True


@pytest.mark.slow
def test_e2e_runs_the_cli_and_reports_consistent_rates(tmp_path, capsys):
    tasks, per_task, train_pc, test_pc, epochs = 2, 3, 8, 4, 1
    out_json = tmp_path / "perf.json"
    code, out, err = perf_main(
        capsys, "--sections", "e2e", "--device", "cpu", "--shapes", "tiny", "--json", out_json,
        "--e2e-data", tmp_path / "data", "--e2e-tasks", tasks, "--e2e-classes-per-task", per_task,
        "--e2e-train-per-class", train_pc, "--e2e-test-per-class", test_pc, "--e2e-side", 40,
        "--e2e-epochs", epochs, "--workers", 0, "--e2e-model-steps", 2)
    assert code == 0, err
    e = json.loads(out_json.read_text())["e2e"]
    assert e["tree"]["n_train"] == tasks * per_task * train_pc
    assert e["loader"]["train_images"] == tasks * per_task * train_pc
    assert positive(e["loader"]["train_images_per_s"]) and positive(e["loader"]["test_images_per_s"])
    assert list(e["precisions"]) == ["fp32"]  # the CPU default
    r = e["precisions"]["fp32"]
    run, model, q, o = r["run"], r["model"], r["ratios"], r["official_schedule"]
    results = json.loads(open(run["results"]).read())
    assert results["complete"] and results["method"] == "sdlora" and results["n_tasks"] == tasks
    assert [t["train_images"] for t in run["tasks"]] == [per_task * train_pc * epochs] * tasks
    assert [t["eval_images"] for t in run["tasks"]] == [per_task * test_pc * (k + 1)
                                                        for k in range(tasks)]
    assert [t["train_s"] for t in run["tasks"]] == [s["train"] for s in results["seconds_per_task"]]
    steady = run["tasks"][1:]
    starts = [s["to_first_step"] for s in results["seconds_per_task"]]
    assert [t["to_first_step_s"] for t in run["tasks"]] == starts
    assert all(0 < start < t["train_s"] for start, t in zip(starts, run["tasks"]))
    assert run["train_images_per_s"] == pytest.approx(  # counted from each task's first step
        sum(t["train_images"] for t in steady) / sum(t["train_s"] - t["to_first_step_s"] for t in steady))
    assert run["train_images_per_s_with_start"] == pytest.approx(
        sum(t["train_images"] for t in steady) / sum(t["train_s"] for t in steady))
    assert run["eval_images_per_s"] == pytest.approx(
        sum(t["eval_images"] for t in steady) / sum(t["eval_s"] for t in steady))
    for kind, loader_key in (("train", "train_images_per_s"), ("eval", "test_images_per_s")):
        mine, m, ld = run[f"{kind}_images_per_s"], model[f"{kind}_images_per_s"], e["loader"][loader_key]
        assert positive(mine) and positive(m)
        assert q[f"{kind}_vs_model"] == pytest.approx(mine / m)
        assert q[f"{kind}_vs_loader"] == pytest.approx(mine / ld)
        assert q[f"{kind}_vs_floor"] == pytest.approx(mine / min(m, ld))
        assert f"run {kind}: {mine:.0f} img/s" in out
        assert f"{q[f'{kind}_vs_model']:.2f}× model" in out
    assert o["train_images"] == 10 * 20 * 2400 and o["eval_images"] == 600 * 55
    mean_start = sum(starts[1:]) / len(starts[1:])
    assert o["total_s"] == pytest.approx(10 * mean_start + o["train_images"] / run["train_images_per_s"]
                                         + o["eval_images"] / run["eval_images_per_s"])
    assert f"= {o['total_min']:.1f} min" in out
    assert f"model alone: train {model['train_images_per_s']:.0f} img/s" in out


def test_losscurve_measures_and_reports_each_precision_separately(tmp_path, capsys):
    """fp32 and bf16 (CPU autocast) from the same start on the same batches: two curves, each
    precision's own summary, and bf16 close to fp32 but not equal to it (it really ran under
    autocast; a run that ignored the precision would repeat the fp32 curve bit for bit)."""
    out_json = tmp_path / "perf.json"
    steps = 6
    code, out, err = perf_main(capsys, "--sections", "losscurve", "--device", "cpu",
                               "--json", out_json, "--losscurve-steps", steps, "--losscurve-batch", 8,
                               "--losscurve-precisions", "fp32,bf16", "--losscurve-lr", 1e-3)
    assert code == 0, err
    r = json.loads(out_json.read_text())["losscurve"]
    curves = r["curves"]
    assert list(curves) == ["fp32", "bf16"] and r["reference"] == "fp32"
    for name, curve in curves.items():
        assert len(curve) == steps and all(positive(v) for v in curve), name
        w = r["window"]
        assert r["first_window_mean"][name] == pytest.approx(sum(curve[:w]) / w)
        assert r["last_window_mean"][name] == pytest.approx(sum(curve[-w:]) / w)
    fp32, bf16 = curves["fp32"], curves["bf16"]
    step_diff = max(abs(a - b) for a, b in zip(bf16, fp32))
    assert r["max_abs_step_difference_vs_reference"] == {"fp32": 0.0, "bf16": step_diff}
    assert bf16 != fp32  # measured under bf16 autocast, not a copy of the fp32 run
    assert abs(bf16[0] - fp32[0]) < 0.05 * fp32[0]  # same weights and batch: same loss to bf16 rounding
    for name in ("fp32", "bf16"):  # one summary line per precision
        line = [row for row in out.splitlines() if row.strip().startswith(f"{name}:")]
        assert len(line) == 1, out
        assert f"{r['first_window_mean'][name]:.4f} → {r['last_window_mean'][name]:.4f}" in line[0]
        assert f"{r['max_abs_step_difference_vs_reference'][name]:.4f}" in line[0]


@pytest.mark.slow
def test_sdlora_scaling_falls_back_to_the_strategy(monkeypatch):
    """Without the adapter module (e.g. moved), section 3 trains the registered strategy instead."""
    import torch

    from clbench.perf import sdlora_tools
    from clbench.perf.sdlora_scaling import measure_sdlora_scaling
    from clbench.perf.setup import make_backbone, shapes_for

    def missing():
        raise ImportError("moved")

    monkeypatch.setattr(sdlora_tools, "adapter_class", missing)
    shapes = shapes_for("tiny", True, 1)
    backbone, mean, std = make_backbone(shapes)
    s = measure_sdlora_scaling(backbone, mean, std, shapes, torch.device("cpu"), n_tasks=3)
    assert s["source"].startswith("SDLoRA strategy") and s["tasks"] == 3
    assert s["step_ratio"] == pytest.approx(s["step_task3_s"] / s["step_task1_s"])


def test_e2e_writes_a_loadable_random_init_checkpoint_for_vit_b16(tmp_path, monkeypatch):
    """The ViT-B/16 path of ``run_backbone`` (GPU runs only) on a tiny stand-in model."""
    import safetensors.torch

    from clbench.perf import e2e
    from helpers import tiny_vit

    monkeypatch.setattr(e2e, "make_backbone", lambda shapes, num_classes: (tiny_vit(), None, None))
    backbone, checkpoint = e2e.run_backbone("vit-b16", tmp_path)
    assert backbone == "vit-b16-in21k-ft-in1k"
    saved = safetensors.torch.load_file(checkpoint)
    assert set(saved) == set(tiny_vit().state_dict())
