"""What a run is asked to do (``RunPlan``, stored as ``run.json``) and everything checked before
any job trains: the budget flags (each seed and method given once), every job's resolved config
and the method's own checks against the run context, reuse of a run name or job folder with
other settings, a writable output folder, and with ``--decoded-cache`` a writable
``<data root>/.decoded``. Every failure is a ``UsageError``: one line, exit 2.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from clbench import hparams
from clbench.context import RunContext
from clbench.errors import UsageError
from clbench.registry import BENCHMARKS, METHODS, load_plugins
from clbench.results import read_json

# Plan fields that do not change any number: a run may be continued with other values of these.
# (The worker count is one: every training sample's augmentation has its own seed.)
NOT_SETTINGS = ("run_dir", "device", "wandb", "download", "decoded_cache", "workers")


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
    workers: int | None = None  # None: ``runner.loader_workers`` decides (all cores for images on a GPU)
    wandb: str = "disabled"
    precision: str | None = None  # None: bf16 on CUDA, fp32 on CPU
    decoded_cache: bool = False   # serve image files from a decoded-pixel cache (same samples)

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


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def check_budget(plan: RunPlan) -> None:
    """The shared flags as one-line errors, before anything else happens."""
    checks = [
        (plan.epochs is not None and plan.epochs < 1, f"--epochs {plan.epochs}: give at least 1"),
        (plan.batch_size is not None and plan.batch_size < 1,
         f"--batch-size {plan.batch_size}: give at least 1"),
        (plan.lr is not None and not (math.isfinite(plan.lr) and plan.lr > 0),
         f"--lr {plan.lr}: give a positive finite learning rate"),
        (plan.workers is not None and plan.workers < 0,
         f"--workers {plan.workers}: give 0 (load in the main process) or more"),
        (any(s < 0 for s in plan.seeds), f"--seeds {plan.seeds}: seeds are non-negative integers"),
    ]
    for flag, values in (("--seeds", plan.seeds), ("--methods", plan.methods)):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        checks.append((bool(twice), f"{flag} {','.join(map(str, values))}: {', '.join(twice)} "
                                     "given more than once; give each once"))
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
    if plan.decoded_cache:
        check_decoded_cache(benchmark.root / ".decoded")
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
    problem = _write_problem(folder)
    if problem is not None:
        raise UsageError(f"cannot write to {folder} ({problem}); choose a writable --out")


def _write_problem(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder`` (made if missing), or ``None``: found by
    creating one, which also catches a read-only file system when running as root."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)  # unique per process
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def check_decoded_cache(folder: Path) -> None:
    """``--decoded-cache`` writes under ``<data root>/.decoded``: refuse an unwritable one before
    anything runs, unless it already holds finished caches (a read-only shared copy is read)."""
    problem = _write_problem(folder)
    if problem is None:
        return
    try:
        built = any((entry / "index.json").is_file() for entry in folder.iterdir())
    except OSError:
        built = False
    if not built:
        raise UsageError(f"--decoded-cache: cannot write to {folder} ({problem}); make the data "
                         "folder writable, choose another --data-dir, or run without "
                         "--decoded-cache")


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


def load_plan(run_dir: str) -> RunPlan:
    """The stored plan of a run folder, wherever the command is run from (the folder given wins
    over the stored path, so a moved run folder resumes too)."""
    path = Path(run_dir) / "run.json"
    if not path.exists() and Path(run_dir).is_dir() and not any(Path(run_dir).iterdir()):
        # clbench run makes the folder first and writes run.json once data and backbone loaded
        raise UsageError(f"--resume {run_dir}: the folder is empty: that run stopped before it "
                         "started training (while loading data, building the decoded cache or "
                         "loading the backbone), so nothing was computed; rerun the original "
                         "command (an interrupted --decoded-cache build is simply redone)")
    if not path.exists():
        raise UsageError(f"--resume {run_dir}: no run.json there; pass a folder made by clbench run "
                         "(e.g. runs/<name>)")
    try:
        plan = RunPlan(**read_json(path))
    except (ValueError, TypeError):
        raise UsageError(f"{path} is unreadable or from another tool; start a new run") from None
    plan.run_dir = str(Path(run_dir).resolve())
    return plan
