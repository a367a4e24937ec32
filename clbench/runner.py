"""Train each method × seed over the benchmark's tasks; evaluate, record and checkpoint after each.

Layout: ``<out>/<run>/<benchmark>-<n>tasks/<method>/seed-<k>/`` with ``config.json``,
``results.json`` and ``checkpoint.pt`` (the last finished task), all written atomically, plus
``<out>/<run>/run.json`` holding the plan so ``clbench run --resume <out>/<run>`` continues it.
"""
from __future__ import annotations

import copy
import dataclasses
import platform
import random
import subprocess
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from clbench import hparams
from clbench.errors import UsageError
from clbench.registry import BENCHMARKS, METHODS, load_plugins
from clbench.results import load_checkpoint, read_json, save_checkpoint, write_json


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


@dataclass
class Job:
    method: str
    strategy_cls: type
    config: object
    seed: int
    out_dir: Path


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
    return {"packages": packages, "python": platform.python_version(), "git_commit": commit}


def method_config(strategy_cls, benchmark: str, n_tasks: int, plan: RunPlan, overrides):
    config = strategy_cls.Config()
    chosen = hparams.resolve_overrides(config, overrides, strategy_cls.registered_name)
    # A method whose per-benchmark defaults depend on a chosen variant names it in variant_keys.
    variant = {k: chosen[k] for k in getattr(strategy_cls, "variant_keys", ()) if k in chosen}
    config = dataclasses.replace(config, **strategy_cls.defaults_for(benchmark, n_tasks, **variant))
    budget = {k: getattr(plan, k) for k in ("epochs", "lr", "batch_size") if getattr(plan, k) is not None}
    config = dataclasses.replace(config, **budget)
    return dataclasses.replace(config, **chosen)


def prepare(plan: RunPlan):
    """Validate every name and value before any work starts."""
    from clbench import tracking

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
    n_tasks = plan.n_tasks or bench_cls.default_tasks
    benchmark.check_tasks(n_tasks)
    configs = {name: method_config(cls, benchmark.name, n_tasks, plan, overrides)
               for name, cls in classes.items()}
    hparams.check_all_used(overrides, [(benchmark.name, bench_config), *configs.items()])
    seeds = plan.seeds or list(bench_cls.default_seeds)
    group_dir = Path(plan.run_dir) / f"{benchmark.name}-{n_tasks}tasks"
    jobs = [Job(name, classes[name], configs[name], seed, group_dir / name / f"seed-{seed}")
            for name in methods for seed in seeds]
    return benchmark, n_tasks, jobs


def run(plan: RunPlan, log=print, record_plan: bool = True) -> list[Path]:
    """Run every job of the plan (skipping finished ones); returns the results files.
    ``record_plan=False`` leaves ``run.json`` alone: sweep jobs share one folder and the sweep
    records its grid in ``sweep.json`` instead."""
    from clbench import distributed

    benchmark, n_tasks, jobs = prepare(plan)
    distributed.init_from_env()
    device = distributed.local_device(resolve_device(plan.device))
    main = distributed.is_main()
    log = log if main else (lambda *a, **k: None)
    if main and record_plan:
        write_json(Path(plan.run_dir) / "run.json", dataclasses.asdict(plan))

    from clbench.backbones import input_size, load_backbone, spec_for

    backbone = plan.backbone or benchmark.default_backbone
    split = benchmark.load(input_size(spec_for(backbone)))  # missing data fails before weights load
    loaded = load_backbone(backbone, plan.checkpoint)
    log(f"{benchmark.name}: {split.identity.get('n_train')} train / {split.identity.get('n_test')} "
        f"test images, {n_tasks} tasks; backbone {loaded.spec.name} ({loaded.spec.tag}); {device}"
        + (f" × {distributed.world_size()} processes" if distributed.world_size() > 1 else ""))
    paths = []
    for job in jobs:
        paths.append(run_job(job, benchmark, n_tasks, split, loaded, device, plan, log))
    return paths


def run_job(job: Job, benchmark, n_tasks, split, loaded, device, plan: RunPlan, log) -> Path:
    from clbench import distributed
    from clbench.streams import build_stream
    from clbench.strategy import CLModel
    from clbench.progress import ProgressPlugin

    results_path = job.out_dir / "results.json"
    if results_path.exists() and read_json(results_path).get("complete"):
        log(f"{job.method} seed {job.seed}: already complete, skipped ({results_path})")
        return results_path

    class_order = benchmark.class_order(job.seed)
    stream = build_stream(split, class_order, n_tasks)
    seed_everything(job.seed)
    model = CLModel(copy.deepcopy(loaded.model), loaded.feature_dim, loaded.spec.mean, loaded.spec.std)
    strategy = job.strategy_cls(model=model, config=job.config, device=device, plugins=[ProgressPlugin()],
                                num_workers=plan.workers, seed=job.seed)
    config = {
        "method": job.method, "benchmark": benchmark.name, "n_tasks": n_tasks, "seed": job.seed,
        "hparams": hparams.as_dict(job.config), "benchmark_config": hparams.as_dict(benchmark.config),
        "backbone": loaded.describe(), "class_order": class_order, "split": split.identity,
        "device": str(device), "workers": plan.workers, **environment(),
    }
    main = distributed.is_main()
    if main:
        write_json(job.out_dir / "config.json", config)

    results = {
        "method": job.method, "benchmark": benchmark.name, "seed": job.seed, "n_tasks": n_tasks,
        "class_order": class_order, "classes_per_task": stream.classes_per_task,
        "split": split.identity, "backbone": loaded.spec.tag, "correct": [], "total": [],
        "metrics": {}, "trainable_params": [], "forward_passes_per_image": 0,
        "seconds_per_task": [], "method_info": [], "complete": False,
    }
    checkpoint_path = job.out_dir / "checkpoint.pt"
    start = 0
    if checkpoint_path.exists() and results_path.exists():
        strategy.load_checkpoint(load_checkpoint(checkpoint_path))
        start = strategy.task + 1
        # Results are written before the checkpoint: a row past the checkpoint is recomputed.
        results = read_json(results_path)
        for key in ("correct", "total", "trainable_params", "seconds_per_task", "method_info"):
            results[key] = results[key][:start]
        log(f"{job.method} seed {job.seed}: resuming after task {start}/{n_tasks}")

    tracker = start_tracking(plan, job, config) if main else _NoTracking()
    from clbench.metrics import pooled_accuracy, summarize

    for task in range(start, n_tasks):
        seed_everything(job.seed * 1000 + task)
        began = time.perf_counter()
        strategy.train(stream.train[task])
        trained = time.perf_counter()
        correct, total = strategy.evaluate_counts(stream.test[: task + 1])
        evaluated = time.perf_counter()
        results["correct"].append(correct)
        results["total"].append(total)
        results["trainable_params"].append(strategy.trainable_parameter_count())
        results["forward_passes_per_image"] = strategy.forward_passes_per_image
        results["seconds_per_task"].append({"train": trained - began, "eval": evaluated - trained})
        results["method_info"].append(strategy.task_info() if hasattr(strategy, "task_info") else {})
        results["metrics"] = summarize(results["correct"], results["total"])
        results["complete"] = task == n_tasks - 1
        if main:
            write_json(results_path, results)
            save_checkpoint(checkpoint_path, strategy.checkpoint())
        accuracy = pooled_accuracy(correct, total)
        log(f"{job.method} seed {job.seed} | task {task + 1}/{n_tasks} | acc on seen classes "
            f"{accuracy:.2f}% | train {trained - began:.1f}s eval {evaluated - trained:.1f}s")
        tracker.log(task, {"acc_seen": accuracy, **results["metrics"]})
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
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise UsageError(f"--resume {run_dir}: no run.json there; pass a folder made by clbench run "
                         "(e.g. runs/<name>)")
    return RunPlan(**read_json(path))

