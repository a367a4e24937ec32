"""The one configuration path: the plan builder shared by ``run``, ``sweep`` and ``--resume``,
``prepare()``'s resolved plan and ``--dry-run``, ``--lr`` reaching every optimiser group, and
structural requirements refused before any job trains."""
from __future__ import annotations

import dataclasses
import json
import re
import textwrap

import pytest
import torch

from clbench.cli import build_parser
from clbench.errors import UsageError
from clbench.plan import check_run_dir, plan_from_args, prepare
from clbench.results import write_json


def _plan(tmp_path, *argv):
    """``clbench run ARGV`` as a plan (output under ``tmp_path`` unless resuming)."""
    out = [] if "--resume" in argv else ["--out", str(tmp_path)]
    args = build_parser().parse_args(["run", *out, *map(str, argv)])
    return plan_from_args(args, defaults=build_parser().parse_args(["run"]))


# ----------------------------------------------------------------------------- --dry-run
def test_dry_run_prints_every_job_with_sources_and_touches_nothing(cli, tmp_path, monkeypatch):
    """cub200 is not on disk: a dry run neither loads nor downloads it, nor any weights."""
    from clbench import backbones

    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: pytest.fail("weights loaded"))
    data = tmp_path / "data"
    code, out, err = cli("run", "--dry-run", "--bench", "cub200", "--methods", "sdlora,finetune",
                         "--seeds", "1,2", "--lr", "0.01", "--epochs", "3",
                         "--set", "sdlora.ranks=[8]", "--set", "sdlora.kd_threshold=1",
                         "--data-dir", data, "--out", tmp_path / "runs", "--name", "dry")
    assert code == 0, err
    assert not (tmp_path / "runs").exists() and not data.exists()
    run = tmp_path / "runs" / "dry" / "cub200-10tasks"
    for method in ("sdlora", "finetune"):
        assert f"{method}: 2 job(s)" in out
        for seed in (1, 2):
            assert f"seed {seed} → {run / method / f'seed-{seed}'}" in out
    rows = {tuple(re.split(r"\s{2,}", line.strip())) for line in out.splitlines()
            if line.startswith("    ")}
    assert ("epochs", "3", "--epochs") in rows and ("lr", "0.01", "--lr") in rows
    assert ("first_task_lr", "0.02", "--lr (scaled ×2 from 0.01)") in rows  # recipe 0.01 → ×2
    assert ("lr_milestones", "[10, 15]", "benchmark recipe (cub200)") in rows
    assert ("ranks", "[8]", "--set") in rows and ("kd_threshold", "1.0", "--set") in rows
    assert ("mode", "'official'", "paper default") in rows
    assert "device      cpu; precision fp32" in out


def test_dry_run_of_a_resumed_run_shows_the_stored_plan(cli, tmp_path):
    plan = _plan(tmp_path, "--methods", "finetune", "--tasks", "2", "--lr", "0.05", "--name", "r")
    write_json(tmp_path / "r" / "run.json", dataclasses.asdict(prepare(plan).plan))
    code, out, err = cli("run", "--resume", tmp_path / "r", "--dry-run")
    assert code == 0, err
    assert "(resumed)" in out and "digits-2tasks/finetune/seed-1993" in out
    assert any(re.split(r"\s{2,}", line.strip()) == ["lr", "0.05", "--lr"] for line in out.splitlines())


# ----------------------------------------------------------------------------- one builder
def test_resumed_plan_equals_the_original(tmp_path):
    """``--resume`` goes through the same builder: what run.json stores comes back unchanged,
    with the same jobs; only flags that change no number may be given."""
    original = prepare(_plan(tmp_path, "--methods", "finetune,sdlora", "--tasks", "2", "--seeds",
                             "3,4", "--lr", "0.02", "--set", "sdlora.ranks=[4]", "--name", "r"))
    write_json(tmp_path / "r" / "run.json", dataclasses.asdict(original.plan))
    resumed = _plan(tmp_path, "--resume", tmp_path / "r")
    assert resumed == original.plan
    again = prepare(resumed, resuming=True)
    assert [(j.method, j.seed, j.config, j.out_dir) for j in again.jobs] == \
        [(j.method, j.seed, j.config, j.out_dir) for j in original.jobs]
    assert _plan(tmp_path, "--resume", tmp_path / "r", "--workers", "3") == \
        dataclasses.replace(original.plan, workers=3)
    with pytest.raises(UsageError, match="drop --epochs, --set"):
        _plan(tmp_path, "--resume", tmp_path / "r", "--epochs", "2", "--set", "lr=1")


def test_sweep_cells_are_the_jobs_run_would_run(tmp_path):
    from clbench.sweep import expand_grid

    flags = ["--methods", "finetune,sdlora", "--seeds", "1,2", "--lr", "0.02", "--epochs", "2",
             "--set", "sdlora.ranks=[4]"]
    args = build_parser().parse_args(["sweep", *flags, "--tasks", "2,5", "--out", str(tmp_path)])
    cells = expand_grid(args, tmp_path / "grid")
    assert len(cells) == 8
    for tasks in (2, 5):
        run = prepare(_plan(tmp_path, *flags, "--tasks", tasks, "--name", "grid"))
        for job in run.jobs:
            [cell] = [c for c in cells if (c.method, c.n_tasks, c.seed) == (job.method, tasks, job.seed)]
            [same] = prepare(cell.plan, record_plan=False).jobs
            assert (same.config, same.context, same.out_dir) == (job.config, job.context, job.out_dir)
            assert cell.plan.precision is None  # resolved on the node that runs the job


def test_what_changes_numbers_is_declared_once(tmp_path):
    """A stored run is refused only for fields declared to change numbers."""
    plan = prepare(_plan(tmp_path, "--methods", "finetune", "--tasks", "2", "--name", "n")).plan
    write_json(tmp_path / "n" / "run.json", dataclasses.asdict(plan))
    for harmless in (dict(workers=4), dict(device="cpu"), dict(wandb="offline"),
                     dict(decoded_cache=True)):
        check_run_dir(dataclasses.replace(plan, **harmless))
    for changed in (dict(lr=0.5), dict(seeds=[7]), dict(precision="bf16"), dict(overrides=["lr=1"])):
        with pytest.raises(UsageError, match="other settings"):
            check_run_dir(dataclasses.replace(plan, **changed))
    assert set(plan.settings()) - set(plan.settings(grid=False)) == \
        {"benchmark", "n_tasks", "methods", "seeds"}


def test_prepared_plan_is_immutable_and_resolved(tmp_path):
    prepared = prepare(_plan(tmp_path, "--methods", "finetune", "--tasks", "2", "--name", "i"))
    assert (prepared.device, prepared.precision, prepared.workers) == ("cpu", "fp32", 0)
    assert prepared.plan.precision == "fp32" and prepared.plan.device == "auto"  # as stored
    with pytest.raises(dataclasses.FrozenInstanceError):
        prepared.precision = "bf16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        prepared.plan.lr = 1.0


# ----------------------------------------------------------------------------- --lr
def _optimiser_lrs(job, tasks=(0, 1)) -> list[list[float]]:
    """The learning rate of every parameter group of the optimiser each task trains with."""
    from helpers import tiny_vit

    from clbench.context import RunContext
    from clbench.strategy import CLModel

    vit = tiny_vit(depth=5)
    context = RunContext.for_backbone(vit, n_tasks=job.context.n_tasks,
                                      classes_per_task=job.context.classes_per_task)
    strategy = job.strategy_cls(model=CLModel(vit, vit.num_features), config=job.config,
                                context=context, seed=0)
    lrs = []
    for task in tasks:
        strategy.task = task
        strategy.model.head.grow(2)
        optimizer = strategy.make_optimizer_for_task(strategy.trainable_parameters()
                                                     or [torch.nn.Parameter(torch.zeros(1))])
        lrs.append([group["lr"] for group in optimizer.param_groups])
    return lrs


@pytest.mark.parametrize("method, benchmark", [
    ("sdlora", "cub200"),          # first task at first_task_lr 0.01, later tasks at lr 0.005
    ("inflora", "domainnet"),      # head at head_lr 1e-2, up-projections at lr 5e-3
    ("hide-prompt", "imagenet-r"),  # prompts at lr, head at lr × 0.1, TII at tii_lr
    ("slca", "imagenet-r"),        # backbone at lr, head at head_lr
])
def test_lr_flag_scales_every_optimiser_group(method, benchmark, tmp_path):
    """``--lr`` at twice the recipe's rate doubles every group of the optimisers the method
    really builds, on the first task and later ones (no group keeps its default rate)."""
    base = prepare(_plan(tmp_path, "--methods", method, "--bench", benchmark, "--name", "a"))
    [job] = [j for j in base.jobs if j.seed == base.jobs[0].seed]
    doubled = prepare(_plan(tmp_path, "--methods", method, "--bench", benchmark, "--name", "b",
                            "--lr", repr(2 * job.config.lr)))
    before, after = _optimiser_lrs(job), _optimiser_lrs(doubled.jobs[0])
    assert len({lr for task in before for lr in task}) >= 2  # groups at different rates
    for task_before, task_after in zip(before, after):
        assert task_after == pytest.approx([2 * lr for lr in task_before], rel=1e-12)


def test_lr_flag_leaves_no_learning_rate_at_its_default():
    """Every method on every benchmark, resolved as ``prepare`` does: each ``*_lr`` field
    follows ``--lr`` (HiDe's TAP/TII stages, InfLoRA-CA's alignment, cosine floors), so a
    matched budget is matched."""
    from clbench.hparams import resolve_config
    from clbench.registry import BENCHMARKS, METHODS

    for benchmark in BENCHMARKS.names():
        n_tasks = BENCHMARKS.get(benchmark).default_tasks
        for method in METHODS.names():
            cls = METHODS.get(method)
            config, _ = resolve_config(cls, benchmark, n_tasks, {}, [])
            doubled, _ = resolve_config(cls, benchmark, n_tasks, {"lr": (2 * config.lr, "--lr")}, [])
            for name, value in dataclasses.asdict(config).items():
                if (name == "lr" or name.endswith("_lr")) and value is not None:
                    assert getattr(doubled, name) == pytest.approx(2 * value, rel=1e-12), \
                        (method, benchmark, name)


# ----------------------------------------------------------------------------- requirements
def test_structural_requirement_is_refused_before_any_job_trains(cli, tmp_path, tiny_checkpoint):
    plugin = tmp_path / "deep_method.py"
    plugin.write_text(textwrap.dedent('''
        from clbench.registry import register_method
        from clbench.methods.reference.finetune import LinearProbe

        def twelve_blocks(backbone, config, context):
            return None if len(backbone.blocks) >= 12 else f"needs 12 blocks, has {len(backbone.blocks)}"

        @register_method("needs-depth", "a method that declares a structural requirement")
        class NeedsDepth(LinearProbe):
            requires = (twelve_blocks,)
    '''))
    code, out, err = cli("run", "--plugin", plugin, "--methods", "linear-probe,needs-depth",
                         "--tasks", "2", "--epochs", "1", "--checkpoint", tiny_checkpoint,
                         "--out", tmp_path, "--name", "deep", "--no-report")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert ("needs-depth cannot run on backbone vit-tiny-letters (vit_tiny_patch16_224): needs "
            "12 blocks, has 4") in err
    assert "task 1/" not in out and not list(tmp_path.rglob("results.json"))


def test_fused_qkv_requirement_on_meta_backbones():
    from clbench.backbones import BACKBONES, BackboneSpec
    from clbench.requirements import fused_qkv, meta_backbone

    letters = meta_backbone(BACKBONES["vit-tiny-letters"])
    assert next(letters.parameters()).is_meta and fused_qkv(letters, None, None) is None
    convnet = meta_backbone(BackboneSpec("resnet18", "resnet18", ""))
    assert fused_qkv(convnet, None, None) == "it has no transformer blocks"


def test_ddp_batch_check_covers_every_job_before_the_first_trains(tmp_path):
    """With 2 processes a last batch of 1 image cannot be shared: the second job's batch size
    is refused once the data is listed, before the first job trains."""
    from helpers import tensor_stream

    from clbench import runner
    from clbench.requirements import task_sizes

    stream = tensor_stream(6, 3, train_per_class=4)
    order = [3, 0, 5, 1, 4, 2]
    targets = [order[t] for exp in stream.train for t in exp.dataset.targets]
    assert task_sizes(targets, order, 3) == [len(exp.dataset) for exp in stream.train]

    probe = prepare(_plan(tmp_path, "--methods", "linear-probe", "--tasks", "2", "--name", "p"))
    split = probe.benchmark.load(16)
    first = task_sizes(split.train.targets, probe.benchmark.class_order(1993), 2)[0]
    plan = _plan(tmp_path, "--methods", "finetune,linear-probe", "--tasks", "2", "--epochs", "1",
                 "--set", f"linear-probe.batch_size={first - 1}", "--name", "ddp")
    prepared = dataclasses.replace(prepare(plan), processes=2)
    with pytest.raises(UsageError, match=f"leave a last batch of 1 .< 2. with --batch-size {first - 1}"):
        runner.execute(prepared, log=lambda *_: None)
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("config.json"))
    json.dumps(dataclasses.asdict(prepared.plan))  # the plan stays plain data


@pytest.mark.parametrize("method, backbone, problem", [
    ("l2p", "vit_base_patch16_rpn_224", "prefix tuning supports timm Block/Attention, block 0 is ResPostBlock"),
    ("hide-prompt", "vit_base_patch16_rpn_224", "prefix tuning supports timm Block/Attention, block 0 is ResPostBlock"),
    ("sdlora", "vit_small_patch16_18x2_224", "block 0 has no fused attn.qkv Linear"),
    ("inflora", "vit_small_patch16_18x2_224", "block 0 has no fused attn.qkv Linear"),
    ("cl-lora", "vit_small_patch16_18x2_224", "block 0 has no fused attn.qkv Linear"),
    ("lora-sub-drs", "vit_small_patch16_18x2_224", "block 0 has no fused attn.qkv Linear"),
    ("vq-prompt", "vit_base_patch16_rpn_224", "prefix tuning supports timm Block/Attention, block 0 is ResPostBlock")])
def test_methods_refuse_a_backbone_they_cannot_change(method, backbone, problem, tmp_path):
    with pytest.raises(UsageError, match=f"{method} cannot run on backbone {backbone}: {problem}"):
        prepare(_plan(tmp_path, "--methods", f"linear-probe,{method}", "--backbone", backbone))
