"""Train each method × seed over the benchmark's tasks; evaluate, record and checkpoint after each.

Layout: ``<out>/<run>/<benchmark>-<n>tasks/<method>/seed-<k>/`` with ``config.json``,
``results.json`` (``clbench.schema.RunResult``) and ``checkpoint.pt`` (the last finished task),
all written atomically, plus ``<out>/<run>/run.json`` holding the plan (with an absolute path) so
``clbench run --resume <out>/<run>`` continues it from any working directory.

Guarantees: every name and value (budget flags, ``--set`` options, each method's own checks
against the run context and its structural ``requires``) is validated for every job by
``plan.prepare`` before any data loads, and the data-parallel batch check for every job once the
data is listed, before any job trains; the runner re-derives nothing from the plan; a run name that
already holds other settings is refused; a job whose loss or weights become non-finite stops
and is recorded as ``diverged``; a resume over inconsistent files is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import platform
import random
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from clbench import hparams
from clbench.errors import Diverged, UsageError
from clbench.plan import Job, Prepared, RunPlan, check_writable, prepare
from clbench.requirements import check_shards, task_sizes
from clbench.results import clean_temporary_files, load_checkpoint, save_checkpoint, write_json
from clbench.schema import RunResult


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def run(plan: RunPlan, log=print, record_plan: bool = True, resuming: bool = False) -> list[Path]:
    """Prepare the plan and execute it. ``record_plan=False`` leaves ``run.json`` alone: sweep
    jobs share one folder and the sweep records its grid in ``sweep.json`` instead."""
    return execute(prepare(plan, resuming=resuming, record_plan=record_plan), log)


def execute(prepared: Prepared, log=print) -> list[Path]:
    """Run every job of a prepared plan (skipping finished ones); returns the results files."""
    import torch

    from clbench import distributed, precision

    check_writable(prepared)
    requested = torch.device(prepared.device)
    distributed.init_from_env(requested)
    device = distributed.local_device(requested)
    precision.configure(prepared.precision)
    main = distributed.is_main()
    log = log if main else (lambda *a, **k: None)

    from clbench.backbones import input_size, load_backbone, spec_for

    benchmark, plan = prepared.benchmark, prepared.plan
    split = benchmark.load(input_size(spec_for(prepared.backbone)))  # data fails before weights
    if plan.decoded_cache:  # built by the main process; the others wait, then read it
        from clbench import decoded_cache

        if not main:
            distributed.barrier()
        split = decoded_cache.attach(split, benchmark.root / ".decoded", distributed.all_cores(), log)
        if main:
            distributed.barrier()
    for job in prepared.jobs:  # the task sizes are known now: every job, before any trains
        sizes = task_sizes(split.train.targets, benchmark.class_order(job.seed), prepared.n_tasks)
        check_shards(sizes, job.config.batch_size, prepared.processes)
    loaded = load_backbone(prepared.backbone, plan.checkpoint)
    if main and prepared.record_plan:  # only a plan that validated and loaded replaces the stored one
        write_json(prepared.run_dir / "run.json", dataclasses.asdict(plan))
    workers = loader_workers(prepared.workers, device, split)
    log(f"{benchmark.name}: {split.identity.get('n_train')} train / {split.identity.get('n_test')} "
        f"test images, {prepared.n_tasks} tasks; backbone {loaded.spec.name} ({loaded.spec.tag}); "
        f"{device}, {prepared.precision}"
        + (f" × {distributed.world_size()} processes" if distributed.world_size() > 1 else ""))
    return [run_job(job, prepared, split, loaded, device, workers, log) for job in prepared.jobs]


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


def loader_workers(requested: int | None, device, split) -> int:
    """``--workers``, or by default: for image pipelines (datasets with a ``transform``) on a GPU,
    every core this process may use (shared among the node's DDP processes), since a JPEG
    pipeline needs them all to keep up; none on a CPU, where workers would only take cores from
    the model, nor for tensors already in memory. Either way no number changes."""
    if requested is not None:
        return requested
    pipeline = any(getattr(part, "transform", None) is not None for part in (split.train, split.test))
    if device.type != "cuda" or not pipeline:
        return 0
    from clbench.distributed import all_cores

    return max(all_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def run_job(job: Job, prepared: Prepared, split, loaded, device, workers: int, log) -> Path:
    from clbench import distributed
    from clbench.progress import ProgressPlugin
    from clbench.streams import build_stream
    from clbench.model import CLModel

    results_path = job.out_dir / "results.json"
    if distributed.is_main():  # only the writer's half-written files; never another rank's
        clean_temporary_files(job.out_dir)
    if results_path.exists():
        previous = _read_results(results_path)
        if previous.status in ("complete", "diverged"):
            log(f"{job.method} seed {job.seed}: already {previous.status}, skipped ({results_path})")
            return results_path

    benchmark, n_tasks = prepared.benchmark, prepared.n_tasks
    class_order = benchmark.class_order(job.seed)
    stream = build_stream(split, class_order, n_tasks)
    seed_everything(job.seed)
    model = CLModel(copy.deepcopy(loaded.model), loaded.feature_dim, loaded.spec.mean, loaded.spec.std)
    strategy = job.strategy_cls(model=model, config=job.config, context=job.context, device=device,
                                plugins=[ProgressPlugin()], num_workers=workers, seed=job.seed)
    config = {
        "method": job.method, "benchmark": benchmark.name, "n_tasks": n_tasks, "seed": job.seed,
        "hparams": hparams.as_dict(job.config), "benchmark_config": hparams.as_dict(benchmark.config),
        "backbone": loaded.describe(), "class_order": class_order, "split": split.identity,
        "device": str(device), "precision": job.context.precision, "workers": workers,
        "reference": job.strategy_cls.reference, **environment(),
    }
    checkpoint_path = job.out_dir / "checkpoint.pt"
    start, results = _resume_point(strategy, job, results_path, checkpoint_path)
    if results is None:
        results = RunResult(
            method=job.method, benchmark=benchmark.name, seed=job.seed, n_tasks=n_tasks,
            class_order=class_order, classes_per_task=stream.classes_per_task, split=split.identity,
            backbone=loaded.spec.tag, precision=job.context.precision)
    else:
        log(f"{job.method} seed {job.seed}: resuming after task {start}/{n_tasks}")
    main = distributed.is_main()
    if main:
        write_json(job.out_dir / "config.json", config)

    from clbench.metrics import pooled_accuracy, summarize
    from clbench.tracking import NoTracking, start_tracking

    tracker = start_tracking(prepared.plan, job, config) if main else NoTracking()

    for task in range(start, n_tasks):
        seed_everything(job.seed * 1000 + task)
        began = time.perf_counter()
        try:
            strategy.train(stream.train[task], statistics=stream.statistics[task])
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
        results.trainable_params.append(strategy.trained_parameter_count)
        results.forward_passes_per_image = strategy.forward_passes_per_image  # may grow (EASE)
        seconds = {"train": trained - began, "eval": evaluated - trained}
        if strategy.first_step_at is not None:  # the task took gradient steps
            seconds["to_first_step"] = strategy.first_step_at - began
        results.seconds_per_task.append(seconds)
        results.method_info.append(strategy.task_info())
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
