"""Train each method × seed over the benchmark's tasks; evaluate, record and checkpoint after each.

Layout: ``<out>/<run>/<benchmark>-<n>tasks/<method>/seed-<k>/`` with ``config.json``,
``results.json`` (``clbench.schema.RunResult``) and ``checkpoint.pt`` (the last finished task),
all written atomically, plus ``<out>/<run>/run.json`` holding the plan (with an absolute path) so
``clbench run --resume <out>/<run>`` continues it from any working directory.

Guarantees: every name and value (budget flags, ``--set`` options, each method's own checks
against the run context) is validated for every job before any job trains; a run name that
already holds other settings is refused; a job whose loss or weights become non-finite stops
and is recorded as ``diverged``; a resume over inconsistent files is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import platform
import random
import subprocess
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from clbench import hparams
from clbench.context import RunContext
from clbench.errors import Diverged, UsageError
from clbench.registry import BENCHMARKS, METHODS, load_plugins
from clbench.results import clean_temporary_files, load_checkpoint, read_json, save_checkpoint, write_json
from clbench.schema import RunResult

# Plan fields that do not change any number: a run may be continued with other values of these.
NOT_SETTINGS = ("run_dir", "device", "workers", "wandb", "download")


@dataclass
class RunPlan:
    """Everything ``clbench run`` was asked to do; stored as ``run.json`` for ``--resume``."""

    run_dir: str
    benchmark: str = "digits"
    n_tasks: int | None = None
    methods: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    backbone: str | None = None
    checkpoint: str | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    overrides: list[str] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    workers: int = 0
    wandb: str = "disabled"
    precision: str | None = None  # None: bf16 on CUDA, fp32 on CPU

    def settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_SETTINGS}


@dataclass
class Job:
    method: str
    strategy_cls: type
    config: object
    seed: int
    out_dir: Path
    context: RunContext


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def environment() -> dict:
    import torch

    packages = {}
    for name in ("clbench", "torch", "torchvision", "timm", "avalanche-lib", "numpy"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"packages": packages, "python": platform.python_version(), "git_commit": commit,
            "torch_threads": torch.get_num_threads()}


def check_budget(plan: RunPlan) -> None:
    """The shared flags as one-line errors, before anything else happens."""
    checks = [
        (plan.epochs is not None and plan.epochs < 1, f"--epochs {plan.epochs}: give at least 1"),
        (plan.batch_size is not None and plan.batch_size < 1,
         f"--batch-size {plan.batch_size}: give at least 1"),
        (plan.lr is not None and not (math.isfinite(plan.lr) and plan.lr > 0),
         f"--lr {plan.lr}: give a positive finite learning rate"),
        (plan.workers < 0, f"--workers {plan.workers}: give 0 (load in the main process) or more"),
        (any(s < 0 for s in plan.seeds), f"--seeds {plan.seeds}: seeds are non-negative integers"),
    ]
    for failed, message in checks:
        if failed:
            raise UsageError(message)
    from clbench.precision import PRECISIONS

    if plan.precision is not None and plan.precision not in PRECISIONS:
        raise UsageError(f"--precision {plan.precision}: choose one of {', '.join(PRECISIONS)}")


def method_config(strategy_cls, benchmark: str, n_tasks: int, plan: RunPlan, overrides):
    """Paper defaults ← per-benchmark defaults ← budget flags (the method's declared contract:
    ``--lr`` scales ``lr`` and every field in ``lr_scaled_fields`` by the same factor) ← --set."""
    config = strategy_cls.Config()
    chosen = hparams.resolve_overrides(config, overrides, strategy_cls.registered_name)
    # A method whose per-benchmark defaults depend on a chosen variant names it in variant_keys.
    variant = {k: chosen[k] for k in getattr(strategy_cls, "variant_keys", ()) if k in chosen}
    config = dataclasses.replace(config, **strategy_cls.defaults_for(benchmark, n_tasks, **variant))
    budget = {k: getattr(plan, k) for k in ("epochs", "lr", "batch_size") if getattr(plan, k) is not None}
    if plan.lr is not None:
        factor = plan.lr / config.lr
        for name in config.lr_scaled_fields:
            value = getattr(config, name)
            if value is not None:
                budget[name] = value * factor
    config = dataclasses.replace(config, **budget)
    return dataclasses.replace(config, **chosen)


def prepare(plan: RunPlan):
    """Validate every name and value of every job before any work starts."""
    from clbench import tracking
    from clbench.backbones import architecture, spec_for

    check_budget(plan)
    tracking.check_mode(plan.wandb)
    load_plugins(plan.plugins)
    overrides = [hparams.parse_override(o) for o in plan.overrides]
    bench_cls = BENCHMARKS.get(plan.benchmark)
    methods = plan.methods or METHODS.builtin_names()
    classes = {name: METHODS.get(name) for name in methods}
    bench_config = bench_cls.Config()
    bench_config = dataclasses.replace(
        bench_config, **hparams.resolve_overrides(bench_config, overrides, bench_cls.registered_name))
    benchmark = bench_cls(bench_config, data_dir=plan.data_dir, download=plan.download)
    n_tasks = bench_cls.default_tasks if plan.n_tasks is None else plan.n_tasks
    benchmark.check_tasks(n_tasks)
    configs = {name: method_config(cls, benchmark.name, n_tasks, plan, overrides)
               for name, cls in classes.items()}
    hparams.check_all_used(overrides, [(benchmark.name, bench_config), *configs.items()])
    from clbench.precision import default_for

    device = resolve_device(plan.device)
    depth, width = architecture(spec_for(plan.backbone or benchmark.default_backbone))
    context = RunContext(benchmark=benchmark.name, n_tasks=n_tasks,
                         classes_per_task=tuple([benchmark.n_classes // n_tasks] * n_tasks),
                         precision=plan.precision or default_for(device), device=str(device),
                         backbone_depth=depth, embed_dim=width)
    for name, cls in classes.items():
        cls.validate(configs[name], context)
    seeds = plan.seeds or list(bench_cls.default_seeds)
    group_dir = Path(plan.run_dir) / f"{benchmark.name}-{n_tasks}tasks"
    jobs = [Job(name, classes[name], configs[name], seed, group_dir / name / f"seed-{seed}", context)
            for name in methods for seed in seeds]
    for job in jobs:
        check_same_settings(job)
    return benchmark, n_tasks, jobs


def check_same_settings(job: Job) -> None:
    """A job folder that already holds results of other hyperparameters is never reused."""
    stored = job.out_dir / "config.json"
    if not stored.exists():
        return
    try:
        before = read_json(stored).get("hparams", {})
    except ValueError:
        raise UsageError(f"{stored} is unreadable: delete {job.out_dir} to restart that job") from None
    now = json_roundtrip(hparams.as_dict(job.config))
    if before != now:
        changed = ", ".join(f"{k}: {before.get(k)!r} → {now.get(k)!r}"
                            for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k))
        raise UsageError(f"{job.out_dir} already holds {job.method} with other settings ({changed}); "
                         "choose another --name, or --resume the run as it was")


def ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to {folder} ({exc.strerror or type(exc).__name__}); "
                         "choose a writable --out") from None


def json_roundtrip(data):
    import json

    return json.loads(json.dumps(data))


def check_run_dir(plan: RunPlan, resuming: bool) -> None:
    """Refuse a run name that holds a run planned with other settings (one-line diff)."""
    path = Path(plan.run_dir) / "run.json"
    if resuming or not path.exists():
        return
    try:
        before = RunPlan(**read_json(path)).settings()
    except (ValueError, TypeError):
        raise UsageError(f"{path} is unreadable or from another tool: choose another --name") from None
    now = json_roundtrip(plan.settings())
    if before != now:
        changed = ", ".join(f"{k}: {before.get(k)!r} → {now.get(k)!r}"
                            for k in sorted(now) if before.get(k) != now.get(k))
        raise UsageError(f"run {Path(plan.run_dir).name!r} exists with other settings ({changed}); "
                         f"choose another --name, or `clbench run --resume {plan.run_dir}`")


def run(plan: RunPlan, log=print, record_plan: bool = True, resuming: bool = False) -> list[Path]:
    """Run every job of the plan (skipping finished ones); returns the results files.
    ``record_plan=False`` leaves ``run.json`` alone: sweep jobs share one folder and the sweep
    records its grid in ``sweep.json`` instead."""
    from clbench import distributed, precision

    if record_plan:
        check_run_dir(plan, resuming)
    benchmark, n_tasks, jobs = prepare(plan)
    ensure_writable(Path(plan.run_dir))
    distributed.init_from_env()
    device = distributed.local_device(resolve_device(plan.device))
    precision.configure(jobs[0].context.precision)
    main = distributed.is_main()
    log = log if main else (lambda *a, **k: None)

    from clbench.backbones import input_size, load_backbone, spec_for

    backbone = plan.backbone or benchmark.default_backbone
    split = benchmark.load(input_size(spec_for(backbone)))  # missing data fails before weights load
    loaded = load_backbone(backbone, plan.checkpoint)
    if main and record_plan:  # only a plan that validated and loaded replaces the stored one
        write_json(Path(plan.run_dir) / "run.json", dataclasses.asdict(plan))
    log(f"{benchmark.name}: {split.identity.get('n_train')} train / {split.identity.get('n_test')} "
        f"test images, {n_tasks} tasks; backbone {loaded.spec.name} ({loaded.spec.tag}); {device}, "
        f"{jobs[0].context.precision}"
        + (f" × {distributed.world_size()} processes" if distributed.world_size() > 1 else ""))
    return [run_job(job, benchmark, n_tasks, split, loaded, device, plan, log) for job in jobs]


def _read_results(path: Path) -> RunResult:
    try:
        return RunResult.read(path)
    except (ValueError, TypeError, KeyError):
        raise UsageError(f"{path} is truncated or not a clbench results file: delete "
                         f"{path.parent} to restart that job") from None


def _resume_point(strategy, job: Job, results_path: Path, checkpoint_path: Path) -> tuple[int, RunResult | None]:
    """(first task to train, results so far) from the job folder; refuses inconsistent files."""
    if not (checkpoint_path.exists() and results_path.exists()):
        return 0, None
    try:
        strategy.load_checkpoint(load_checkpoint(checkpoint_path))
    except Exception as exc:  # truncated, foreign or from another method/version
        raise UsageError(f"{checkpoint_path} cannot be loaded ({type(exc).__name__}): delete "
                         f"{job.out_dir} to restart that job") from None
    start = strategy.task + 1
    results = _read_results(results_path)
    problem = results.check_consistent()
    if problem is None and results.tasks_done < start:
        problem = f"{results.tasks_done} result rows but the checkpoint is after task {start}"
    if problem:
        raise UsageError(f"{results_path}: {problem}; delete {job.out_dir} to restart that job")
    # Results are written before the checkpoint: a row past the checkpoint is recomputed.
    results.truncate(start)
    results.status = "running"
    return start, results


def run_job(job: Job, benchmark, n_tasks, split, loaded, device, plan: RunPlan, log) -> Path:
    from clbench import distributed
    from clbench.progress import ProgressPlugin
    from clbench.streams import build_stream
    from clbench.strategy import CLModel

    results_path = job.out_dir / "results.json"
    clean_temporary_files(job.out_dir)
    if results_path.exists():
        previous = _read_results(results_path)
        if previous.status in ("complete", "diverged"):
            log(f"{job.method} seed {job.seed}: already {previous.status}, skipped ({results_path})")
            return results_path

    class_order = benchmark.class_order(job.seed)
    stream = build_stream(split, class_order, n_tasks)
    seed_everything(job.seed)
    model = CLModel(copy.deepcopy(loaded.model), loaded.feature_dim, loaded.spec.mean, loaded.spec.std)
    strategy = job.strategy_cls(model=model, config=job.config, context=job.context, device=device,
                                plugins=[ProgressPlugin()], num_workers=plan.workers, seed=job.seed)
    config = {
        "method": job.method, "benchmark": benchmark.name, "n_tasks": n_tasks, "seed": job.seed,
        "hparams": hparams.as_dict(job.config), "benchmark_config": hparams.as_dict(benchmark.config),
        "backbone": loaded.describe(), "class_order": class_order, "split": split.identity,
        "device": str(device), "precision": job.context.precision, "workers": plan.workers,
        "reference": getattr(job.strategy_cls, "reference", None), **environment(),
    }
    checkpoint_path = job.out_dir / "checkpoint.pt"
    start, results = _resume_point(strategy, job, results_path, checkpoint_path)
    if results is None:
        results = RunResult(
            method=job.method, benchmark=benchmark.name, seed=job.seed, n_tasks=n_tasks,
            class_order=class_order, classes_per_task=stream.classes_per_task, split=split.identity,
            backbone=loaded.spec.tag, precision=job.context.precision,
            forward_passes_per_image=strategy.forward_passes_per_image)
    else:
        log(f"{job.method} seed {job.seed}: resuming after task {start}/{n_tasks}")
    main = distributed.is_main()
    if main:
        write_json(job.out_dir / "config.json", config)

    tracker = start_tracking(plan, job, config) if main else _NoTracking()
    from clbench.metrics import pooled_accuracy, summarize

    for task in range(start, n_tasks):
        seed_everything(job.seed * 1000 + task)
        began = time.perf_counter()
        try:
            strategy.train(stream.train[task])
        except Diverged as exc:
            results.status, results.message = "diverged", str(exc)
            if main:
                results.write(results_path)
            log(f"{job.method} seed {job.seed}: DIVERGED — {exc}; recorded as diverged in "
                f"{results_path} (try a smaller --lr)")
            tracker.finish()
            return results_path
        trained = time.perf_counter()
        correct, total = strategy.evaluate_counts(stream.test[: task + 1])
        evaluated = time.perf_counter()
        results.correct.append(correct)
        results.total.append(total)
        results.trainable_params.append(strategy.trainable_parameter_count())
        results.seconds_per_task.append({"train": trained - began, "eval": evaluated - trained})
        results.method_info.append(strategy.task_info() if hasattr(strategy, "task_info") else {})
        results.metrics = summarize(results.correct, results.total)
        if task == n_tasks - 1:
            results.gflops_per_image = strategy.count_gflops(stream.test[0])
            results.status = "complete"
        if main:
            results.write(results_path)
            save_checkpoint(checkpoint_path, strategy.checkpoint())
        accuracy = pooled_accuracy(correct, total)
        log(f"{job.method} seed {job.seed} | task {task + 1}/{n_tasks} | acc on seen classes "
            f"{accuracy:.2f}% | train {trained - began:.1f}s eval {evaluated - trained:.1f}s")
        tracker.log(task, {"acc_seen": accuracy, **results.metrics})
    if results.status == "running" and results.tasks_done == n_tasks and main:  # resumed at the end
        results.status = "complete"
        results.write(results_path)
    tracker.finish()
    return results_path


class _NoTracking:
    def log(self, task, metrics):
        pass

    def finish(self):
        pass


class _WandbTracking:
    def __init__(self, handle):
        self.handle = handle

    def log(self, task, metrics):
        from clbench import tracking

        tracking.log_task(self.handle, task, metrics)

    def finish(self):
        from clbench import tracking

        tracking.finish(self.handle)


def start_tracking(plan: RunPlan, job: Job, config: dict):
    """One W&B run per method × seed, grouped by the clbench run, streaming per-task metrics."""
    if plan.wandb == "disabled":
        return _NoTracking()
    from clbench import tracking

    handle = tracking.start_run(plan.wandb, project="clbench", group=Path(plan.run_dir).name,
                                name=f"{job.method}-seed{job.seed}", config=config,
                                dir=job.out_dir)
    return _WandbTracking(handle) if handle is not None else _NoTracking()


def load_plan(run_dir: str) -> RunPlan:
    """The stored plan of a run folder, wherever the command is run from (the folder given wins
    over the stored path, so a moved run folder resumes too)."""
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise UsageError(f"--resume {run_dir}: no run.json there; pass a folder made by clbench run "
                         "(e.g. runs/<name>)")
    try:
        plan = RunPlan(**read_json(path))
    except (ValueError, TypeError):
        raise UsageError(f"{path} is unreadable or from another tool; start a new run") from None
    plan.run_dir = str(Path(run_dir).resolve())
    return plan
