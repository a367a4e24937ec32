"""Finding and reading run folders: one :class:`Run` per ``results.json`` (+ its ``config.json``).

The file is parsed with :class:`clbench.schema.RunResult`; the headline metrics are recomputed
from the per-task ``correct``/``total`` counts (the stored ones are only cross-checked). A file
that cannot be read is reported and skipped by :func:`load_runs`, so one corrupt result does not
hide the others. Paths shown to humans are relative to the folder the user named
(:attr:`Run.display`), so a committed report carries no machine paths.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from clbench import metrics as M
from clbench.errors import UsageError
from clbench.schema import RunResult


class ReportWarning(UserWarning):
    """Runs that cannot be compared as given (different splits, class orders, duplicates...)."""


# Methods that are reference points, not continual learners, when config.json does not say so
# itself (key ``reference``): shown in the tables but never ranked against the others.
REFERENCE_METHODS = {"joint": "upper-bound"}
_REQUIRED_KEYS = ("method", "benchmark", "seed", "n_tasks", "correct", "total")
METRIC_KEYS = ("final_acc", "avg_inc_acc", "forgetting", "bwt", "final_task_mean_acc")


@dataclass
class Run:
    """One ``results.json`` with its metrics recomputed from the counts."""

    path: Path
    display: str  # path for humans: relative to the folder the user named
    method: str
    benchmark: str
    n_tasks: int
    seed: int
    protocol: str
    split_hash: str
    class_order: tuple[int, ...]
    classes_per_task: tuple[int, ...]
    status: str  # running | complete | diverged (clbench.schema)
    message: str  # why it diverged, if it did
    correct: list[list[int]]
    total: list[list[int]]
    metrics: dict[str, float]
    curve: list[float]
    acc: list[list[float]]
    task_forgetting: list[float]
    trainable_params: list[float]
    forward_passes: float
    gflops: float  # per test image; NaN when not measured
    precision: str
    train_seconds: float
    method_info: list[dict]
    reference: str  # "" for a continual method, else e.g. "upper-bound"
    settings: dict[str, Any]  # hparams + backbone + precision, to tell variants apart
    config: dict[str, Any]
    label: str = ""  # table row: the method name, plus the differing settings if any

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def tasks_done(self) -> int:
        return len(self.correct)


def shown_root(path: Path) -> str:
    """How a folder the user named appears in a report: as given when relative, else its name."""
    p = Path(path)
    if not p.is_absolute() and ".." not in p.parts:
        return p.as_posix()
    return p.resolve().name or "."


def find_results(paths: Iterable[Path]) -> list[tuple[Path, str]]:
    """``(file, display path)`` for every ``results.json`` below the given folders (a file path
    is taken as is)."""
    found: dict[Path, str] = {}
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise UsageError(f"run directory not found: {p}")
        root = shown_root(p)
        if p.is_file():
            found.setdefault(p.resolve(), root)
            continue
        for f in sorted(p.rglob("results.json")):
            found.setdefault(f.resolve(), (Path(root) / f.relative_to(p)).as_posix())
    if not found:
        raise UsageError("no results.json found under " + ", ".join(shown_root(p) for p in paths))
    return list(found.items())


def _read_json(path: Path, shown: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {shown}: {exc}") from None


def _config_of(path: Path) -> dict:
    try:
        config = json.loads(path.with_name("config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _result_of(data: Any, shown: str) -> RunResult:
    if not isinstance(data, dict):
        raise UsageError(f"{shown}: not a clbench results file")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise UsageError(f"{shown}: not a clbench results file (missing {', '.join(missing)})")
    data = dict(data)
    if "status" not in data and "complete" not in data:  # oldest files: infer from the rows
        data["complete"] = len(data["correct"]) == int(data["n_tasks"])
    try:
        result = RunResult.from_dict(data)
        result.n_tasks, result.seed = int(result.n_tasks), int(result.seed)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{shown}: not a clbench results file ({exc})") from None
    c, t = result.correct, result.total
    if len(c) != len(t) or len(c) > result.n_tasks:
        raise UsageError(f"{shown}: 'correct' and 'total' need the same number of rows "
                         "(at most n_tasks)")
    for i, (rc, rt) in enumerate(zip(c, t)):
        if len(rc) < i + 1 or len(rt) < i + 1:
            raise UsageError(f"{shown}: row {i} of the counts needs {i + 1} entries")
        if any(x <= 0 for x in rt[: i + 1]) or any(x < 0 for x in rc[: i + 1]):
            raise UsageError(f"{shown}: row {i} of the counts has a non-positive total")
    return result


def load_run(path: Path, display: str | None = None) -> Run:
    """Parse one results file and recompute its metrics; :class:`UsageError` when unreadable."""
    path = Path(path)
    shown = display or path.name
    res = _result_of(_read_json(path, shown), shown)
    config = _config_of(path)

    status = res.status
    if status == "complete" and res.tasks_done != res.n_tasks:
        warnings.warn(f"{shown}: marked complete but has {res.tasks_done} of {res.n_tasks} task "
                      "rows; treated as incomplete", ReportWarning, stacklevel=2)
        status = "running"
    correct, total = res.correct, res.total
    if correct:
        recomputed = M.summarize(correct, total)
        curve, acc = M.accuracy_curve(correct, total), M.accuracy_matrix(correct, total)
    else:
        recomputed, curve, acc = {k: math.nan for k in METRIC_KEYS}, [], []
    stored = res.metrics or {}
    off = [k for k, v in recomputed.items()
           if isinstance(stored.get(k), (int, float)) and abs(stored[k] - v) > 0.01]
    if off:
        warnings.warn(f"{shown}: stored metrics {', '.join(off)} differ from the ones recomputed "
                      "from the counts; the recomputed values are used", ReportWarning,
                      stacklevel=2)

    seconds = res.seconds_per_task or []
    backbone = config.get("backbone") or {}
    if isinstance(backbone, dict):
        backbone = ":".join(str(backbone[k]) for k in ("name", "tag") if backbone.get(k))
    settings = {**(config.get("hparams") or {})}
    if backbone:
        settings["backbone"] = backbone
    settings["precision"] = res.precision
    reference = config["reference"] if "reference" in config else REFERENCE_METHODS.get(res.method)
    return Run(
        path=path, display=shown, method=str(res.method), benchmark=str(res.benchmark),
        n_tasks=res.n_tasks, seed=res.seed,
        protocol=str(res.split.get("protocol", "unknown")),
        split_hash=str(res.split.get("hash", "unknown")),
        class_order=tuple(int(c) for c in res.class_order or ()),
        classes_per_task=tuple(int(c) for c in res.classes_per_task or ()),
        status=status, message=str(res.message or ""),
        correct=correct, total=total, metrics=recomputed, curve=curve, acc=acc,
        task_forgetting=M.per_task_forgetting(acc) if acc else [],
        trainable_params=[float(p) for p in res.trainable_params or []],
        forward_passes=float(res.forward_passes_per_image) if res.forward_passes_per_image
        else math.nan,
        gflops=float(res.gflops_per_image) if res.gflops_per_image is not None else math.nan,
        precision=str(res.precision),
        train_seconds=(sum(float(s.get("train", 0.0)) for s in seconds) if seconds
                       else math.nan),
        method_info=[i if isinstance(i, dict) else {} for i in res.method_info or []],
        reference=str(reference or ""), settings=settings, config=config,
        label=str(res.method),
    )


def load_runs(run_dirs: Iterable[Path], skipped: list[str] | None = None) -> list[Run]:
    """Every readable run below ``run_dirs``. An unreadable file is warned about (one line,
    also appended to ``skipped``) and left out; :class:`UsageError` when none is readable."""
    runs, problems = [], []
    for path, shown in find_results(run_dirs):
        try:
            runs.append(load_run(path, shown))
        except UsageError as exc:
            problems.append(f"skipped {exc}")
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            problems.append(f"skipped {shown}: not a clbench results file "
                            f"({type(exc).__name__}: {exc})")
    for line in problems:
        warnings.warn(line, ReportWarning, stacklevel=2)
    if skipped is not None:
        skipped += problems
    if not runs:
        raise UsageError("no readable results.json: " + problems[0].removeprefix("skipped "))
    return runs
