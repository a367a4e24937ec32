"""``clbench report``: comparison tables and figures from run folders.

Every ``results.json`` found (recursively) below the given paths is read; the headline metrics are
recomputed from the per-task ``correct``/``total`` counts with :mod:`clbench.metrics` (the numbers
stored in the file are only cross-checked). Runs are grouped by (benchmark, n_tasks, split
protocol); one table row per method, mean ± sample std over seeds.

Safety rules:

* a run with ``complete = false`` (killed mid-way) is never averaged with complete runs: it is
  listed in its own section of ``summary.md`` and in ``incomplete_runs.csv``;
* runs of one group that use different data splits (``split.hash``) or, for the same seed,
  different class orders are not compared: a :class:`ReportWarning` is issued, the same line is
  written to ``summary.md``, and they become separate groups;
* runs of one method with different hyper-parameters or backbones become separate rows, labelled
  with the settings that differ;
* two results for the same method and seed: the first (by path) is used, with a warning.

Files written into the report folder (see :func:`write_report`): ``summary.md``, ``summary.csv``,
``summary.tex``, ``incomplete_runs.csv`` (only when there are incomplete runs),
``acc_curve.png``/``.svg``, ``acc_matrix_<method>.png`` (``acc_matrix_<group>_<method>.png`` when
the report has several groups), ``forgetting.png``.

Heavy modules (pandas, matplotlib, scipy, wandb) are imported inside the functions that use them.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from clbench import metrics as M
from clbench.errors import UsageError


class ReportWarning(UserWarning):
    """Runs that cannot be compared as given (different splits, class orders, duplicates...)."""


# metric key -> (Markdown header, LaTeX header, higher is better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "final_acc": ("Final acc (%) ↑", r"Final acc (\%) $\uparrow$", True),
    "avg_inc_acc": ("Avg. inc. acc (%) ↑", r"Avg.\ inc.\ acc (\%) $\uparrow$", True),
    "forgetting": ("Forgetting (%) ↓", r"Forgetting (\%) $\downarrow$", False),
    "bwt": ("BWT (%) ↑", r"BWT (\%) $\uparrow$", True),
    "final_task_mean_acc": ("Final task-mean acc (%) ↑",
                            r"Final task-mean acc (\%) $\uparrow$", True),
}
DEFAULT_METRICS = ["final_acc", "avg_inc_acc", "forgetting", "bwt"]
_METRIC_ALIASES = {
    "acc": "final_acc", "final": "final_acc", "final_accuracy": "final_acc",
    "aaa": "avg_inc_acc", "avg_acc": "avg_inc_acc", "average_incremental_accuracy": "avg_inc_acc",
    "fgt": "forgetting", "backward_transfer": "bwt",
}
# Columns about cost, lower is better: CSV column -> (Markdown header, LaTeX header).
COSTS: dict[str, tuple[str, str]] = {
    "trainable_params_mean": ("Trainable params, mean over tasks (M)",
                              r"Params, mean/task (M)"),
    "trainable_params_last": ("Trainable params, last task (M)", r"Params, last task (M)"),
    "forward_passes_per_image": ("Forward passes / test image", r"Fwd passes / img"),
    "train_seconds": ("Train time, total (s)", r"Train time (s)"),
}
# Paper comparison: only these metrics have published numbers.
PAPER_METRICS = {"final_acc": "Acc", "avg_inc_acc": "AAA"}
SIGNIFICANCE_P = 0.05
SIGNIFICANCE_TEST = "paired t-test over the seeds both methods share (scipy.stats.ttest_rel)"
_REQUIRED_KEYS = ("method", "benchmark", "seed", "n_tasks", "correct", "total")
_BENCHMARK_ALIASES = {"cub": "cub200", "inr": "imagenet-r", "ina": "imagenet-a",
                      "imr": "imagenet-r", "ima": "imagenet-a"}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One ``results.json`` with its metrics recomputed from the counts."""

    path: Path
    method: str
    benchmark: str
    n_tasks: int
    seed: int
    protocol: str
    split_hash: str
    class_order: tuple[int, ...]
    complete: bool
    correct: list[list[int]]
    total: list[list[int]]
    metrics: dict[str, float]
    curve: list[float]
    acc: list[list[float]]
    task_forgetting: list[float]
    trainable_params: list[float]
    forward_passes: float
    train_seconds: float
    settings: dict[str, Any]  # hparams + backbone, to tell variants of one method apart
    config: dict[str, Any]
    label: str = ""  # table row: the method name, plus the differing settings if any

    @property
    def tasks_done(self) -> int:
        return len(self.correct)


def find_results(paths: Iterable[Path]) -> list[Path]:
    """Every ``results.json`` below the given directories (a file path is taken as is)."""
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise UsageError(f"run directory not found: {p}")
        files = [p] if p.is_file() else sorted(p.rglob("results.json"))
        for f in files:
            found.setdefault(f.resolve(), None)
    if not found:
        raise UsageError("no results.json found under " + ", ".join(str(p) for p in paths))
    return list(found)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def load_run(path: Path) -> Run:
    """Parse one results file and recompute its metrics from the counts."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a clbench results file")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise UsageError(f"{path}: not a clbench results file (missing {', '.join(missing)})")
    config_path = path.with_name("config.json")
    config = _read_json(config_path) if config_path.exists() else {}
    if not isinstance(config, dict):
        config = {}

    correct, total = data["correct"], data["total"]
    n_tasks = int(data["n_tasks"])
    if len(correct) != len(total) or len(correct) > n_tasks:
        raise UsageError(f"{path}: 'correct' and 'total' need the same number of rows "
                         "(at most n_tasks)")
    for i, (rc, rt) in enumerate(zip(correct, total)):
        if len(rc) < i + 1 or len(rt) < i + 1:
            raise UsageError(f"{path}: row {i} of the counts needs {i + 1} entries")
        if any(t <= 0 for t in rt[: i + 1]) or any(c < 0 for c in rc[: i + 1]):
            raise UsageError(f"{path}: row {i} of the counts has a non-positive total")

    complete = bool(data.get("complete", len(correct) == n_tasks))
    if complete and len(correct) != n_tasks:
        warnings.warn(f"{path}: marked complete but has {len(correct)} of {n_tasks} task rows; "
                      "treated as incomplete", ReportWarning, stacklevel=2)
        complete = False

    if correct:
        recomputed = M.summarize(correct, total)
        curve = M.accuracy_curve(correct, total)
        acc = M.accuracy_matrix(correct, total)
    else:
        recomputed = {k: math.nan for k in METRICS}
        curve, acc = [], []
    stored = data.get("metrics") or {}
    off = [k for k, v in recomputed.items()
           if isinstance(stored.get(k), (int, float)) and abs(stored[k] - v) > 0.01]
    if off:
        warnings.warn(f"{path}: stored metrics {', '.join(off)} differ from the ones recomputed "
                      "from the counts; the recomputed values are used", ReportWarning,
                      stacklevel=2)

    split = data.get("split") or {}
    seconds = data.get("seconds_per_task") or []
    train_seconds = (sum(float(s.get("train", 0.0)) for s in seconds) if seconds else math.nan)
    params = [float(p) for p in (data.get("trainable_params") or [])]
    backbone = config.get("backbone") or {}
    if isinstance(backbone, dict):
        backbone = ":".join(str(backbone[k]) for k in ("name", "tag") if backbone.get(k))
    settings = {**(config.get("hparams") or {})}
    if backbone:
        settings["backbone"] = backbone
    fwd = data.get("forward_passes_per_image")
    return Run(
        path=path, method=str(data["method"]), benchmark=str(data["benchmark"]),
        n_tasks=n_tasks, seed=int(data["seed"]),
        protocol=str(split.get("protocol", "unknown")),
        split_hash=str(split.get("hash", "unknown")),
        class_order=tuple(int(c) for c in data.get("class_order") or ()), complete=complete,
        correct=correct, total=total, metrics=recomputed, curve=curve, acc=acc,
        task_forgetting=M.per_task_forgetting(acc) if acc else [],
        trainable_params=params, forward_passes=float(fwd) if fwd is not None else math.nan,
        train_seconds=train_seconds, settings=settings, config=config, label=str(data["method"]),
    )


def load_runs(run_dirs: Iterable[Path]) -> list[Run]:
    return [load_run(p) for p in find_results(run_dirs)]


# --------------------------------------------------------------------------------------------
# Grouping
# --------------------------------------------------------------------------------------------

@dataclass
class Group:
    """Complete runs that may be compared: same benchmark, task count, split and class orders."""

    benchmark: str
    n_tasks: int
    protocol: str
    split_hash: str | None = None  # set only when the base group had several split hashes
    order_variant: int | None = None  # set only when class orders conflicted
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        text = f"{self.benchmark}, {self.n_tasks} tasks, split {self.protocol}"
        if self.split_hash is not None:
            text += f", split hash {self.split_hash[:12]}"
        if self.order_variant is not None:
            text += f", class-order variant {self.order_variant}"
        return text

    @property
    def slug(self) -> str:
        text = f"{self.benchmark}-{self.n_tasks}tasks-{self.protocol}"
        if self.split_hash is not None:
            text += f"-{self.split_hash[:8]}"
        if self.order_variant is not None:
            text += f"-order{self.order_variant}"
        return _slug(text)

    def by_label(self) -> dict[str, dict[int, Run]]:
        out: dict[str, dict[int, Run]] = defaultdict(dict)
        for r in self.runs:
            out[r.label][r.seed] = r
        return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


@dataclass
class Grouping:
    groups: list[Group]
    incomplete: list[tuple[str, Run]]  # (group label, run)
    warnings: list[str]  # also issued with warnings.warn
    notes: list[str]  # informational


def _fmt_setting(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 30 else text[:27] + "..."


def _label_variants(runs: list[Run], desc: str, notes: list[str]) -> None:
    """Row label = method, plus the settings that differ when a method has several variants."""
    by_method: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_method[r.method].append(r)
    for method, rs in sorted(by_method.items()):
        variants = {json.dumps(r.settings, sort_keys=True, default=str) for r in rs}
        if len(variants) == 1:
            for r in rs:
                r.label = method
            continue
        keys = sorted({k for r in rs for k in r.settings})
        differing = [k for k in keys
                     if len({json.dumps(r.settings.get(k), sort_keys=True, default=str)
                             for r in rs}) > 1]
        for r in rs:
            r.label = method + " [" + ", ".join(
                f"{k}={_fmt_setting(r.settings.get(k))}" for k in differing) + "]"
        notes.append(f"{desc}: {method} has runs with different settings "
                     f"({', '.join(differing)}); shown as separate rows")


def _cluster_class_orders(runs: list[Run]) -> list[list[str]]:
    """Row labels split into sets whose runs agree on the class order of every shared seed."""
    orders: dict[str, dict[int, tuple[int, ...]]] = defaultdict(dict)
    for r in runs:
        orders[r.label][r.seed] = r.class_order
    clusters: list[tuple[list[str], dict[int, tuple[int, ...]]]] = []
    for label in sorted(orders):
        for labels, ref in clusters:
            if all(ref[s] == o for s, o in orders[label].items() if s in ref):
                labels.append(label)
                ref.update(orders[label])
                break
        else:
            clusters.append(([label], dict(orders[label])))
    return [labels for labels, _ in clusters]


def group_runs(runs: list[Run]) -> Grouping:
    """Group runs, separating whatever may not be compared (see the module docstring)."""
    warn_lines: list[str] = []
    notes: list[str] = []

    def warn(msg: str) -> None:
        warnings.warn(msg, ReportWarning, stacklevel=3)
        warn_lines.append(msg)

    base: dict[tuple[str, int, str], list[Run]] = defaultdict(list)
    for r in runs:
        base[(r.benchmark, r.n_tasks, r.protocol)].append(r)

    groups: list[Group] = []
    incomplete: list[tuple[str, Run]] = []
    for key in sorted(base):
        rs = sorted(base[key], key=lambda r: (r.method, r.seed, str(r.path)))
        desc = Group(*key).label
        hashes = sorted({r.split_hash for r in rs})
        if len(hashes) > 1:
            warn(f"{desc}: runs use different data splits (split.hash "
                 f"{', '.join(h[:12] for h in hashes)}); they are not compared and are "
                 "reported as separate groups, one per split hash")
            subsets = [(h, [r for r in rs if r.split_hash == h]) for h in hashes]
        else:
            subsets = [(None, rs)]
        for split_hash, srs in subsets:
            sub_desc = Group(*key, split_hash=split_hash).label
            _label_variants(srs, sub_desc, notes)
            kept: dict[tuple[str, int], Run] = {}
            for r in srs:
                if not r.complete:
                    continue
                first = kept.setdefault((r.label, r.seed), r)
                if first is not r:
                    warn(f"{sub_desc}: several results for {r.label} seed {r.seed}; using "
                         f"{first.path}, ignoring {r.path}")
            complete = list(kept.values())
            clusters = _cluster_class_orders(complete) if complete else []
            if len(clusters) > 1:
                warn(f"{sub_desc}: runs with the same seed use different class orders; they are "
                     "not compared and are reported as separate groups: "
                     + "; ".join(f"variant {i + 1}: {', '.join(c)}"
                                 for i, c in enumerate(clusters)))
            for i, labels in enumerate(clusters):
                groups.append(Group(*key, split_hash=split_hash,
                                    order_variant=i + 1 if len(clusters) > 1 else None,
                                    runs=[r for r in complete if r.label in labels]))
            incomplete += [(sub_desc, r) for r in srs if not r.complete]
    if incomplete:
        notes.append(f"{len(incomplete)} incomplete run(s) (complete = false) are excluded from "
                     "the tables and figures; see 'Incomplete runs'")
    return Grouping(groups, incomplete, warn_lines, notes)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def resolve_metrics(metrics: Sequence[str] | None) -> list[str]:
    """Metric keys to tabulate (accepts comma-separated items and a few aliases)."""
    if not metrics:
        return list(DEFAULT_METRICS)
    out: list[str] = []
    for item in metrics:
        for name in str(item).split(","):
            key = name.strip().lower().replace("-", "_")
            if not key:
                continue
            key = _METRIC_ALIASES.get(key, key)
            if key not in METRICS:
                raise UsageError(f"unknown metric {name.strip()!r}: "
                                 f"use one of {', '.join(METRICS)}")
            if key not in out:
                out.append(key)
    if not out:
        raise UsageError(f"no metric given: use one of {', '.join(METRICS)}")
    return out


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.fmean(vals) if vals else math.nan


def _paired_p(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import ttest_rel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_rel(a, b).pvalue)


def load_paper_numbers() -> dict[str, Any]:
    """Published SD-LoRA numbers: ``benchmarks[benchmark][str(n_tasks)][method]``."""
    from importlib import resources

    try:
        text = resources.files("clbench").joinpath("paper_numbers.json").read_text()
    except (OSError, ModuleNotFoundError):
        text = (Path(__file__).with_name("paper_numbers.json")).read_text()
    return json.loads(text)


def _paper_benchmark(name: str, known: Iterable[str]) -> str | None:
    flat = name.lower().replace("_", "-")
    flat = _BENCHMARK_ALIASES.get(flat, flat)
    squash = {k.replace("-", ""): k for k in known}
    return squash.get(flat.replace("-", ""))


def _best_flags(values: Sequence[float], higher: bool) -> list[bool]:
    """True where the value is the best of the column; nothing is best when all are tied."""
    finite = [v for v in values if not math.isnan(v)]
    if len(finite) < 2 or max(finite) - min(finite) <= 1e-9:
        return [False] * len(values)
    best = max(finite) if higher else min(finite)
    return [not math.isnan(v) and abs(v - best) <= 1e-9 for v in values]


def summary_frame(grouping: Grouping, metrics: Sequence[str], paper: dict | None = None):
    """One row per (group, method): plain numeric columns, as written to ``summary.csv``.

    For every metric ``m``: ``m_mean``, ``m_std`` (sample std, NaN with one seed), ``m_best``
    (best in its group), ``m_p_vs_best`` (paired t-test p-value against the best method, NaN
    when not tested) and ``m_sig`` (p < 0.05). With ``paper``: ``paper_m``, ``paper_m_se``,
    ``delta_m`` (ours − paper) for ``final_acc`` and ``avg_inc_acc``, and ``paper_source``.
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for g in grouping.groups:
        by = g.by_label()
        grows: list[dict[str, Any]] = []
        for label, seeds in by.items():
            rs = list(seeds.values())
            row: dict[str, Any] = {
                "group": g.label, "benchmark": g.benchmark, "n_tasks": g.n_tasks,
                "split_protocol": g.protocol, "split_hash": rs[0].split_hash,
                "method": rs[0].method, "row": label, "n_seeds": len(rs),
                "seeds": " ".join(str(s) for s in seeds),
            }
            for m in metrics:
                vals = [r.metrics[m] for r in rs]
                row[f"{m}_mean"] = statistics.fmean(vals)
                row[f"{m}_std"] = statistics.stdev(vals) if len(vals) >= 2 else math.nan
            row["trainable_params_mean"] = _mean(
                [_mean(r.trainable_params) if r.trainable_params else math.nan for r in rs])
            row["trainable_params_last"] = _mean(
                [r.trainable_params[-1] if r.trainable_params else math.nan for r in rs])
            row["forward_passes_per_image"] = _mean([r.forward_passes for r in rs])
            row["train_seconds"] = _mean([r.train_seconds for r in rs])
            grows.append(row)

        labels = list(by)
        for m in metrics:
            higher = METRICS[m][2]
            means = [row[f"{m}_mean"] for row in grows]
            flags = _best_flags(means, higher)
            ref = labels[flags.index(True)] if any(flags) else None
            for row, label, best in zip(grows, labels, flags):
                p = math.nan
                if ref is not None and not best:
                    shared = sorted(set(by[ref]) & set(by[label]))
                    if len(shared) >= 2:
                        p = _paired_p([by[ref][s].metrics[m] for s in shared],
                                      [by[label][s].metrics[m] for s in shared])
                row[f"{m}_best"] = best
                row[f"{m}_p_vs_best"] = p
                row[f"{m}_sig"] = bool(p < SIGNIFICANCE_P)  # NaN compares False

        if paper is not None:
            bench = _paper_benchmark(g.benchmark, paper.get("benchmarks", {}))
            table = paper.get("benchmarks", {}).get(bench or "", {}).get(str(g.n_tasks), {})
            for row in grows:
                entry = table.get(row["method"])
                for m in PAPER_METRICS:
                    if m not in metrics:
                        continue
                    pm = entry[m]["mean"] if entry else math.nan
                    row[f"paper_{m}"] = pm
                    row[f"paper_{m}_se"] = entry[m]["se"] if entry else math.nan
                    row[f"delta_{m}"] = row[f"{m}_mean"] - pm
                row["paper_source"] = entry["source"] if entry else ""
        rows += grows

    columns = ["group", "benchmark", "n_tasks", "split_protocol", "split_hash", "method", "row",
               "n_seeds", "seeds"]
    for m in metrics:
        columns += [f"{m}_mean", f"{m}_std", f"{m}_best", f"{m}_p_vs_best", f"{m}_sig"]
        if paper is not None and m in PAPER_METRICS:
            columns += [f"paper_{m}", f"paper_{m}_se", f"delta_{m}"]
    if paper is not None:
        columns.append("paper_source")
    columns += list(COSTS)
    return pd.DataFrame(rows, columns=columns)


@dataclass(frozen=True)
class _Style:
    pm: str
    bold: str  # format string with {}
    mark: str
    missing: str


_MD = _Style(" ± ", "**{}**", "†", "–")
_TEX = _Style(r" $\pm$ ", r"\textbf{{{}}}", r"$^{\dagger}$", "--")


def _num(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def _fmt_params(x: float) -> str:
    return f"{x / 1e6:.3g}"


def _fmt_count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}"


def _fmt_seconds(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def display_frame(gdf, metrics: Sequence[str], style: _Style, paper: bool):
    """Formatted strings for one group's table (Markdown or LaTeX cell syntax)."""
    import pandas as pd

    tex = style is _TEX
    out = pd.DataFrame(index=range(len(gdf)))
    out["Method"] = list(gdf["row"])
    out["Seeds"] = [str(int(n)) for n in gdf["n_seeds"]]
    for m in metrics:
        cells = []
        for _, row in gdf.iterrows():
            text = _num(row[f"{m}_mean"])
            if row["n_seeds"] >= 2 and not math.isnan(row[f"{m}_std"]):
                text += style.pm + _num(row[f"{m}_std"])
            if row[f"{m}_best"]:
                text = style.bold.format(text)
            if row[f"{m}_sig"]:
                text += style.mark
            cells.append(text)
        out[METRICS[m][1] if tex else METRICS[m][0]] = cells
        if paper and m in PAPER_METRICS and f"paper_{m}" in gdf:
            short = PAPER_METRICS[m]
            out[f"paper {short} (\\%)" if tex else f"paper {short} (%)"] = [
                style.missing if math.isnan(p) else f"{_num(p)} ({_num(se)})"
                for p, se in zip(gdf[f"paper_{m}"], gdf[f"paper_{m}_se"])]
            out[f"$\\Delta$ {short}" if tex else f"Δ {short}"] = [
                style.missing if math.isnan(d) else f"{d:+.2f}" for d in gdf[f"delta_{m}"]]
    formats = {"trainable_params_mean": _fmt_params, "trainable_params_last": _fmt_params,
               "forward_passes_per_image": _fmt_count, "train_seconds": _fmt_seconds}
    for col, (md_head, tex_head) in COSTS.items():
        values = [float(v) for v in gdf[col]]
        flags = _best_flags(values, higher=False)
        out[tex_head if tex else md_head] = [
            style.missing if math.isnan(v) else
            (style.bold.format(formats[col](v)) if best else formats[col](v))
            for v, best in zip(values, flags)]
    return out


def _footnote(metrics: Sequence[str], paper: bool, tex: bool) -> str:
    if tex:
        pm, mark, bold, lt, delta, arrow, minus = (
            r"$\pm$", r"$^{\dagger}$", r"\textbf{bold}", "$<$", r"$\Delta$", r"$\rightarrow$",
            "$-$")
    else:
        pm, mark, bold, lt, delta, arrow, minus = ("±", "†", "**bold**", "<", "Δ", "→", "−")
    text = (f"Mean {pm} sample standard deviation (ddof = 1) over seeds (mean only with one seed). "
            f"{bold}: best value of the column (cost columns: lowest). "
            f"{mark}: significantly different from the best method of the column, "
            f"{SIGNIFICANCE_TEST}, p {lt} {SIGNIFICANCE_P}; not tested with fewer than 2 shared "
            "seeds. Params: trainable parameters in millions, averaged over tasks and while "
            "training the last task; train time: total training seconds over all tasks, mean "
            "over seeds.")
    if paper:
        text += (f" paper: published mean (standard error) over 5 runs with ViT-B/16 "
                 f"IN21k{arrow}IN1k (Wu et al., SD-LoRA, ICLR 2025); {delta} = ours {minus} paper "
                 f"(percentage points).")
    if tex:
        text = text.replace("scipy.stats.ttest_rel", r"\texttt{scipy.stats.ttest\_rel}")
    return text


def _markdown(frame, left: int = 1) -> str:
    """Markdown via tabulate: the first ``left`` columns left-aligned, the rest right-aligned."""
    align = ["left"] * left + ["right"] * (frame.shape[1] - left)
    return frame.to_markdown(index=False, disable_numparse=True, colalign=align)


def _latex(frame, caption: str, label: str, note: str) -> str:
    styler = frame.style.hide(axis="index").format(escape="latex", subset=["Method"])
    text = styler.to_latex(
        caption=caption, label=label, hrules=True, position="htbp",
        position_float="centering", column_format="l" + "r" * (frame.shape[1] - 1))
    return text.replace("\\end{tabular}\n",
                        "\\end{tabular}\n\\par\\smallskip{\\footnotesize " + note + "}\n", 1)


def _tex_escape(text: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", text)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def _incomplete_frame(grouping: Grouping):
    import pandas as pd

    rows = []
    for desc, r in grouping.incomplete:
        rows.append({
            "group": desc, "method": r.method, "row": r.label, "seed": r.seed,
            "tasks_done": r.tasks_done, "n_tasks": r.n_tasks,
            "acc_after_last_done_task": r.curve[-1] if r.curve else math.nan,
            "avg_inc_acc_so_far": r.metrics["avg_inc_acc"], "path": str(r.path),
        })
    return pd.DataFrame(rows, columns=["group", "method", "row", "seed", "tasks_done", "n_tasks",
                                       "acc_after_last_done_task", "avg_inc_acc_so_far", "path"])


def write_report(run_dirs: list[Path], out_dir: Path | None = None, name: str | None = None,
                 metrics: list[str] | None = None, wandb_mode: str = "disabled",
                 compare_paper: bool = False) -> Path:
    """Write the tables and figures for the runs under ``run_dirs``; return the report folder.

    ``out_dir`` defaults to ``reports/<name>``, ``name`` to the base name of the first run dir.
    ``metrics``: metric keys for the tables (default final_acc, avg_inc_acc, forgetting, bwt).
    ``wandb_mode``: ``disabled`` | ``offline`` | ``online``; when enabled, the summary table is
    logged as a ``wandb.Table`` and every figure as a ``wandb.Image`` (run directory:
    ``$WANDB_DIR`` if set, else the report folder). ``compare_paper`` adds the published SD-LoRA
    numbers (``clbench/paper_numbers.json``) and the difference to ours.
    Raises :class:`clbench.errors.UsageError` for bad input.
    """
    from clbench import tracking

    if not run_dirs:
        raise UsageError("no run directory given")
    metric_keys = resolve_metrics(metrics)
    tracking.check_mode(wandb_mode)
    run_dirs = [Path(p) for p in run_dirs]
    name = name or run_dirs[0].resolve().name or "report"
    out = Path(out_dir) if out_dir is not None else Path("reports") / name

    runs = load_runs(run_dirs)
    grouping = group_runs(runs)
    paper = load_paper_numbers() if compare_paper else None
    table = summary_frame(grouping, metric_keys, paper)
    out.mkdir(parents=True, exist_ok=True)

    table.to_csv(out / "summary.csv", index=False)
    incomplete = _incomplete_frame(grouping)
    if len(incomplete):
        incomplete.to_csv(out / "incomplete_runs.csv", index=False)
    else:
        (out / "incomplete_runs.csv").unlink(missing_ok=True)

    figures = _write_figures(grouping.groups, out)
    (out / "summary.md").write_text(
        _summary_markdown(name, run_dirs, runs, grouping, table, incomplete, metric_keys,
                          paper is not None, figures))
    (out / "summary.tex").write_text(_summary_latex(grouping, table, metric_keys,
                                                    paper is not None))

    if wandb_mode != "disabled":
        wandb_dir = Path(os.environ.get("WANDB_DIR") or out)
        handle = tracking.start_run(
            wandb_mode, project=os.environ.get("WANDB_PROJECT") or "clbench", group="report",
            name=name, dir=wandb_dir,
            config={"report": name, "run_dirs": [str(p) for p in run_dirs],
                    "metrics": metric_keys, "n_results": len(runs),
                    "n_incomplete": len(incomplete), "compare_paper": compare_paper})
        try:
            tables = {"summary": table}
            if len(incomplete):
                tables["incomplete_runs"] = incomplete
            tracking.log_report(handle, tables=tables,
                                images={k: v for k, v in figures.items() if v.suffix == ".png"})
        finally:
            tracking.finish(handle)
    return out


def _write_figures(groups: list[Group], out: Path) -> dict[str, Path]:
    """Draw every figure; return {W&B key: file}."""
    from clbench.plots import method_colors, plot_acc_curves, plot_acc_matrix, plot_forgetting

    files: dict[str, Path] = {}
    if not groups:
        return files
    colors = method_colors(r.label for g in groups for r in g.runs)
    curve = [out / "acc_curve.png", out / "acc_curve.svg"]
    plot_acc_curves(groups, colors, curve)
    files["acc_curve"], files["acc_curve_svg"] = curve
    several = len(groups) > 1
    for g in groups:
        for label, seeds in g.by_label().items():
            stem = "acc_matrix_" + (f"{g.slug}_" if several else "") + _slug(label)
            path = out / f"{stem}.png"
            plot_acc_matrix(g, label, list(seeds.values()), colors[label], path)
            files[stem] = path
    plot_forgetting(groups, colors, out / "forgetting.png")
    files["forgetting"] = out / "forgetting.png"
    return files


def _summary_markdown(name, run_dirs, runs, grouping, table, incomplete, metric_keys, paper,
                      figures) -> str:
    lines = [f"# Report: {name}", ""]
    n_inc = len(grouping.incomplete)
    lines += [f"{len(runs)} result file(s) ({len(runs) - n_inc} complete, {n_inc} incomplete) "
              "found under: " + ", ".join(f"`{p}`" for p in run_dirs) + ".",
              "Metrics are recomputed from the per-task correct/total counts "
              "(`clbench.metrics`); accuracies are pooled over the test samples of all seen "
              "classes.", ""]
    if grouping.warnings:
        lines += ["## Warnings", ""] + [f"- **Warning:** {w}" for w in grouping.warnings] + [""]
    if grouping.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in grouping.notes] + [""]
    for g in grouping.groups:
        gdf = table[table["group"] == g.label]
        show_paper = paper and any(
            not math.isnan(v) for m in PAPER_METRICS if f"paper_{m}" in gdf
            for v in gdf[f"paper_{m}"])
        seeds = sorted({r.seed for r in g.runs})
        backbones = sorted({str(r.settings.get("backbone", "?")) for r in g.runs})
        hashes = sorted({r.split_hash for r in g.runs})
        lines += [f"## {g.label}", "",
                  f"Seeds: {', '.join(map(str, seeds))}; backbone: {', '.join(backbones)}; "
                  f"split hash: {', '.join(h[:12] for h in hashes)}.", "",
                  _markdown(display_frame(gdf, metric_keys, _MD, show_paper)), "",
                  f"*{_footnote(metric_keys, show_paper, tex=False)}*"]
        if show_paper:
            sources = sorted({s for s in gdf["paper_source"] if s})
            lines.append(f"*Published numbers from: {'; '.join(sources)}.*")
        elif paper:
            lines.append("*No published numbers for this setting.*")
        lines.append("")
    if not grouping.groups:
        lines += ["No complete run: no table and no figures.", ""]
    if len(incomplete):
        shown = incomplete.drop(columns=["group"]).rename(columns={
            "row": "Method", "seed": "Seed", "tasks_done": "Tasks done", "n_tasks": "Tasks",
            "acc_after_last_done_task": "Acc after last done task (%)",
            "avg_inc_acc_so_far": "Avg. inc. acc so far (%)", "path": "File"})
        shown = shown.drop(columns=["method"])
        shown.insert(0, "Setting", list(incomplete["group"]))
        for col in ("Acc after last done task (%)", "Avg. inc. acc so far (%)"):
            shown[col] = [_MD.missing if math.isnan(v) else _num(v) for v in shown[col]]
        lines += ["## Incomplete runs (not included in the tables and figures)", "",
                  _markdown(shown.astype(str), left=2), ""]
    if figures:
        lines += ["## Figures", ""]
        for key, path in figures.items():
            if path.suffix == ".png":
                lines += [f"![{key}]({path.name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _summary_latex(grouping, table, metric_keys, paper) -> str:
    parts = ["% Generated by clbench report. Needs \\usepackage{booktabs}.", ""]
    for g in grouping.groups:
        gdf = table[table["group"] == g.label]
        show_paper = paper and any(
            not math.isnan(v) for m in PAPER_METRICS if f"paper_{m}" in gdf
            for v in gdf[f"paper_{m}"])
        frame = display_frame(gdf, metric_keys, _TEX, show_paper)
        note = _footnote(metric_keys, show_paper, tex=True)
        parts += [_latex(frame, caption=_tex_escape(g.label), label=f"tab:{g.slug}", note=note),
                  ""]
    return "\n".join(parts)
