"""What a run is asked to do (``RunPlan``, stored as ``run.json``), the one builder of it from the
command line (``run``, every ``sweep`` cell and ``--resume``), and ``prepare()``: every job's
config resolved and checked — budget flags, ``--set``, the method's own checks and its
structural ``requires`` on a weightless backbone, reuse of a run name or job folder with other
settings — before any job trains. It returns one immutable ``Prepared`` that the runner executes
and ``clbench run --dry-run`` prints. Every failure is a ``UsageError``: one line, exit 2.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from clbench import hparams
from clbench.context import RunContext
from clbench.errors import UsageError
from clbench.registry import BENCHMARKS, METHODS, load_plugins
from clbench.results import read_json


def _declared(default=None, *, flag: str, numbers: bool, resume: str = "kept",
              grid: bool = False, budget: bool = False, factory=None):
    """A plan field and, once, what it means: ``numbers`` (a different value may change the
    results: compared on reuse of a run name and in ``sweep.json``), ``resume`` ("kept": the
    stored plan decides, the flag is refused with ``--resume``; "may change"), ``grid`` (a
    ``sweep`` axis), ``budget`` (an ``--epochs/--lr/--batch-size`` override of every method)."""
    meta = dict(flag=flag, numbers=numbers, resume=resume, grid=grid, budget=budget)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunPlan:
    """Everything ``clbench run`` was asked to do; stored as ``run.json`` for ``--resume``."""

    run_dir: str = _declared(flag="--out/--name", numbers=False)
    benchmark: str = _declared("digits", flag="--bench", numbers=True, grid=True)
    n_tasks: int | None = _declared(flag="--tasks", numbers=True, grid=True)
    methods: list[str] = _declared(flag="--methods", numbers=True, grid=True, factory=list)
    seeds: list[int] = _declared(flag="--seeds", numbers=True, grid=True, factory=list)
    backbone: str | None = _declared(flag="--backbone", numbers=True)
    checkpoint: str | None = _declared(flag="--checkpoint", numbers=True)
    epochs: int | None = _declared(flag="--epochs", numbers=True, budget=True)
    lr: float | None = _declared(flag="--lr", numbers=True, budget=True)
    batch_size: int | None = _declared(flag="--batch-size", numbers=True, budget=True)
    overrides: list[str] = _declared(flag="--set", numbers=True, factory=list)
    plugins: list[str] = _declared(flag="--plugin", numbers=True, factory=list)
    data_dir: str | None = _declared(flag="--data-dir", numbers=True)
    download: bool = _declared(False, flag="--download", numbers=False)
    device: str = _declared("auto", flag="--device", numbers=False, resume="may change")
    # None: the runner's loader_workers decides (all cores for image data on a GPU); no number
    # changes with it, since every training sample's augmentation has its own seed.
    workers: int | None = _declared(flag="--workers", numbers=False, resume="may change")
    wandb: str = _declared("disabled", flag="--wandb", numbers=False, resume="may change")
    precision: str | None = _declared(flag="--precision", numbers=True)  # stored resolved
    decoded_cache: bool = _declared(False, flag="--decoded-cache", numbers=False,
                                    resume="may change")

    def settings(self, grid: bool = True) -> dict:
        """The values that change numbers (without the sweep axes when ``grid`` is False)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["numbers"] and (grid or not f.metadata["grid"])}

    def budget(self) -> dict[str, tuple[object, str]]:
        """The budget flags given: {config field: (value, flag)}."""
        return {f.name: (getattr(self, f.name), f.metadata["flag"]) for f in dataclasses.fields(self)
                if f.metadata["budget"] and getattr(self, f.name) is not None}


def flag_of(name: str) -> str:
    return RunPlan.__dataclass_fields__[name].metadata["flag"]


@dataclass(frozen=True)
class Job:
    method: str
    strategy_cls: type
    config: object
    seed: int
    out_dir: Path
    context: RunContext
    sources: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))  # field -> origin


@dataclass(frozen=True)
class Prepared:
    """A validated plan with nothing left to resolve: what the runner executes."""

    plan: RunPlan             # as stored in run.json (precision resolved)
    benchmark: object         # the Benchmark, not loaded
    benchmark_sources: MappingProxyType
    n_tasks: int
    backbone: str             # the backbone name (--backbone or the benchmark's default)
    device: str               # "cpu" or "cuda" (--device auto resolved)
    precision: str
    workers: int | None       # None: on a GPU, from the data once loaded (runner.loader_workers)
    processes: int            # data-parallel processes (torchrun's WORLD_SIZE)
    jobs: tuple[Job, ...]
    resuming: bool = False
    record_plan: bool = True  # sweep cells share a folder and do not write run.json

    @property
    def run_dir(self) -> Path:
        return Path(self.plan.run_dir)


# ----------------------------------------------------------------------------- the builder
def _absolute(path: str | None) -> str | None:
    """The plan must mean the same files when resumed or run from another folder."""
    return str(Path(path).expanduser().resolve()) if path else path


def _values(args) -> dict:
    """The plan fields the parsed flags set, normalised (``run``'s and ``sweep``'s flags share
    their names with the plan's fields; flags a command lacks keep the plan's default)."""
    given = vars(args)
    values = {f.name: given[f.name] for f in dataclasses.fields(RunPlan) if f.name in given}
    if "methods" in values:
        text = values["methods"]
        methods = [m.strip() for m in (text or "").split(",") if m.strip()]
        if text is not None and text.strip() != "all" and not methods:
            raise UsageError("--methods: give comma-separated method names or 'all'")
        values["methods"] = [] if text is None or text.strip() == "all" else methods
    for name in ("seeds", "overrides", "plugins"):
        if name in values:
            values[name] = list(values[name] or [])
    values["plugins"] = [_absolute(p) if p.endswith(".py") else p for p in values.get("plugins", [])]
    for name in ("checkpoint", "data_dir"):
        if name in values:
            values[name] = _absolute(values[name])
    return values


def run_folder(out: str, name: str | None, default_name: str) -> str:
    name = name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not name or "/" in name or name in (".", ".."):
        raise UsageError(f"--name {name!r}: give a plain folder name")
    return str(Path(out).expanduser().resolve() / name)


def plan_from_args(args, *, run_dir: str | None = None, defaults=None, **fixed) -> RunPlan:
    """The one builder of a plan from parsed flags: ``run`` (``run_dir`` from ``--out/--name``),
    a ``sweep`` cell (its ``benchmark``/``n_tasks`` in ``fixed``), or ``--resume``: the stored
    plan, where only flags that change no number may be given (``defaults``: the parser's
    defaults, to tell which were)."""
    values = {**_values(args), **fixed}
    resume = vars(args).get("resume")
    if not resume:
        run_dir = run_dir or run_folder(args.out, args.name, values.get("benchmark", "digits"))
        return RunPlan(run_dir=run_dir, **values)
    before = _values(defaults)
    given = [name for name in values if values[name] != before[name]]
    if (args.out, args.name) != (defaults.out, defaults.name):
        given.insert(0, "run_dir")
    refused = [flag_of(n) for n in given if RunPlan.__dataclass_fields__[n].metadata["resume"] == "kept"]
    if refused:
        raise UsageError(f"--resume continues {resume} exactly as planned; drop "
                         f"{', '.join(refused)} (or start a new run with --name)")
    return dataclasses.replace(load_plan(resume), **{n: values[n] for n in given})


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
    return dataclasses.replace(plan, run_dir=str(Path(run_dir).resolve()))


# ----------------------------------------------------------------------------- checks
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
    if plan.checkpoint and not Path(plan.checkpoint).is_file():
        raise UsageError(f"checkpoint {plan.checkpoint} not found: pass an existing .safetensors "
                         "or .pth file")


def method_config(strategy_cls, benchmark: str, n_tasks: int, plan: RunPlan, overrides):
    """A method's resolved config (``hparams.resolve_config``) under the plan's budget flags."""
    return hparams.resolve_config(strategy_cls, benchmark, n_tasks, plan.budget(), overrides)[0]


def prepare(plan: RunPlan, *, resuming: bool = False, record_plan: bool = True,
            processes: int | None = None) -> Prepared:
    """Resolve and validate every name and value of every job before any work starts; reads
    files (run.json, config.json) but loads no data or weights and writes nothing."""
    from clbench import tracking
    from clbench.backbones import spec_for
    from clbench.precision import default_for
    from clbench.requirements import check_requirements, meta_backbone

    check_budget(plan)
    tracking.check_mode(plan.wandb)
    load_plugins(plan.plugins)
    overrides = [hparams.parse_override(o) for o in plan.overrides]
    bench_cls = BENCHMARKS.get(plan.benchmark)
    methods = plan.methods or METHODS.builtin_names()
    classes = {name: METHODS.get(name) for name in methods}
    chosen = hparams.resolve_overrides(bench_cls.Config(), overrides, bench_cls.registered_name)
    bench_config = dataclasses.replace(bench_cls.Config(), **chosen)
    bench_sources = {f.name: "--set" if f.name in chosen else "default"
                     for f in dataclasses.fields(bench_config)}
    benchmark = bench_cls(bench_config, data_dir=plan.data_dir, download=plan.download)
    n_tasks = bench_cls.default_tasks if plan.n_tasks is None else plan.n_tasks
    benchmark.check_tasks(n_tasks)
    resolved = {name: hparams.resolve_config(cls, benchmark.name, n_tasks, plan.budget(), overrides)
                for name, cls in classes.items()}
    hparams.check_all_used(overrides, [(benchmark.name, bench_config),
                                       *((n, c) for n, (c, _) in resolved.items())])
    device = resolve_device(plan.device)
    plan = dataclasses.replace(plan, precision=plan.precision or default_for(device))
    backbone = plan.backbone or benchmark.default_backbone
    spec = spec_for(backbone)
    vit = meta_backbone(spec)
    context = RunContext.for_backbone(
        vit, benchmark=benchmark.name, n_tasks=n_tasks,
        classes_per_task=tuple([benchmark.n_classes // n_tasks] * n_tasks),
        precision=plan.precision, device=str(device))
    for name, cls in classes.items():
        cls.validate(resolved[name][0], context)
        check_requirements(name, cls, resolved[name][0], context, vit, spec)
    seeds = plan.seeds or list(bench_cls.default_seeds)
    group_dir = Path(plan.run_dir) / f"{benchmark.name}-{n_tasks}tasks"
    jobs = tuple(Job(name, classes[name], resolved[name][0], seed, group_dir / name / f"seed-{seed}",
                     context, MappingProxyType(resolved[name][1]))
                 for name in methods for seed in seeds)
    if record_plan and not resuming:
        check_run_dir(plan)
    for job in jobs:
        check_same_settings(job)
    workers = plan.workers if plan.workers is not None else (0 if device.type == "cpu" else None)
    return Prepared(plan=plan, benchmark=benchmark, benchmark_sources=MappingProxyType(bench_sources),
                    n_tasks=n_tasks, backbone=backbone, device=str(device), precision=plan.precision,
                    workers=workers, jobs=jobs, resuming=resuming, record_plan=record_plan,
                    processes=processes or int(os.environ.get("WORLD_SIZE", "1")))


def _changes(before: dict, now: dict) -> str:
    return ", ".join(f"{k}: {before.get(k)!r} → {now.get(k)!r}"
                     for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k))


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
        raise UsageError(f"{job.out_dir} already holds {job.method} with other settings "
                         f"({_changes(before, now)}); choose another --name, or --resume the run "
                         "as it was")


def check_run_dir(plan: RunPlan) -> None:
    """Refuse a run name that holds a run planned with other settings (one-line diff)."""
    path = Path(plan.run_dir) / "run.json"
    if not path.exists():
        return
    try:
        before = RunPlan(**read_json(path)).settings()
    except (ValueError, TypeError):
        raise UsageError(f"{path} is unreadable or from another tool: choose another --name") from None
    now = json_roundtrip(plan.settings())
    if before != now:
        raise UsageError(f"run {Path(plan.run_dir).name!r} exists with other settings "
                         f"({_changes(before, now)}); choose another --name, or "
                         f"`clbench run --resume {plan.run_dir}`")


def json_roundtrip(data):
    import json

    return json.loads(json.dumps(data))


def check_writable(prepared: Prepared) -> None:
    """The folders a run writes, before any data loads (not part of ``prepare``, which writes
    nothing so that ``--dry-run`` leaves no trace)."""
    if prepared.plan.decoded_cache:  # first: a refused run leaves no run folder behind
        check_decoded_cache(prepared.benchmark.root / ".decoded")
    ensure_writable(prepared.run_dir)


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
