"""Aggregation: one numeric row per (group, method), as written to ``summary.csv``.

Mean ± sample std over seeds; the best value of each column among the *continual* methods
(reference rows such as the ``joint`` upper bound are shown but never ranked); a paired t-test of
every continual method against that best one; optional published numbers beside ours; which
methods have the same accuracy curve (drawn on top of each other, so the figure must say so).
"""
from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from clbench.errors import UsageError
from clbench.report.cells import ACC_DIGITS, GFLOPS, PARAMS, SECONDS
from clbench.report.groups import Group, Grouping
from clbench.report.paper import Published, published_for, sources_note

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


@dataclass(frozen=True)
class Cost:
    """A cost column (lower is better). ``md``/``tex``: header, with ``{unit}`` where the
    column's unit goes (from ``scale``, a :mod:`clbench.report.cells` scale; None: plain
    counts). ``ranked``: bold its unique lowest value; not for times, which measure the hardware
    that ran the method as much as the method."""

    md: str
    tex: str
    scale: tuple[tuple[float, str], ...] | None
    ranked: bool = True


COSTS: dict[str, Cost] = {
    "trainable_params_mean": Cost("Trainable params, mean over tasks{unit}",
                                  r"Params, mean/task{unit}", PARAMS),
    "trainable_params_last": Cost("Trainable params, last task{unit}",
                                  r"Params, last task{unit}", PARAMS),
    "forward_passes_per_image": Cost("Forward passes / test image", r"Fwd passes / img", None),
    "gflops_per_image": Cost("{unit}FLOPs / test image", r"{unit}FLOPs / img", GFLOPS),
    "train_seconds": Cost("Train time, total{unit}", r"Train time{unit}", SECONDS, ranked=False),
}

# Paper comparison: only these metrics have published numbers.
PAPER_METRICS = {"final_acc": "Acc", "avg_inc_acc": "AAA"}
SIGNIFICANCE_P = 0.05
SIGNIFICANCE_TEST = "paired t-test over the seeds both methods share (scipy.stats.ttest_rel)"


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


def mean_or_nan(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.fmean(vals) if vals else math.nan


def _paired_p(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import ttest_rel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_rel(a, b).pvalue)


def best_rows(values: Sequence[float], higher: bool,
              competing: Sequence[bool] | None = None) -> list[int]:
    """Indices of the competing rows that share the best value (callers pass values rounded as
    shown); none when fewer than two rows compete."""
    competing = competing if competing is not None else [True] * len(values)
    finite = [v for v, c in zip(values, competing) if c and not math.isnan(v)]
    if len(finite) < 2:
        return []
    best = max(finite) if higher else min(finite)
    return [i for i, (v, c) in enumerate(zip(values, competing)) if c and v == best]


def best_flags(values: Sequence[float], higher: bool,
               competing: Sequence[bool] | None = None) -> list[bool]:
    """True only at the *unique* best competing row: a best value shared by several rows (tied
    costs, identical methods, all rows equal) is nobody's win, so nothing is bold."""
    rows = best_rows(values, higher, competing)
    return [rows == [i] for i in range(len(values))]


def summary_frame(grouping: Grouping, metrics: Sequence[str],
                  paper: Sequence[Published] | None = None):
    """One row per (group, method): plain numeric columns, as written to ``summary.csv``.

    For every metric ``m``: ``m_mean``, ``m_std`` (sample std, NaN with one seed), ``m_best``
    (the unique best continual method of its group, compared as shown: to 2 decimals),
    ``m_p_vs_best`` (paired t-test p-value against the best method, the first by name when
    several share the best value; NaN when not tested) and ``m_sig`` (p < 0.05). ``reference``
    is empty for continual methods and names the kind of reference point (e.g. ``upper-bound``)
    otherwise; such rows are never best and never tested. With ``paper``: ``paper_m``, ``paper_m_se``, ``delta_m``
    (ours − paper) for ``final_acc`` and ``avg_inc_acc``, ``paper_source`` and ``paper_about`` (the
    paper's statistic and backbone): only a figure of the same benchmark, task count, task
    protocol and split (:func:`clbench.report.paper.published_for`).
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
                "method": rs[0].method, "row": label, "reference": rs[0].reference,
                "n_seeds": len(rs), "seeds": " ".join(str(s) for s in seeds),
                "precision": "/".join(sorted({r.precision for r in rs})),
            }
            for m in metrics:
                vals = [r.metrics[m] for r in rs]
                row[f"{m}_mean"] = statistics.fmean(vals)
                row[f"{m}_std"] = statistics.stdev(vals) if len(vals) >= 2 else math.nan
            row["trainable_params_mean"] = mean_or_nan(
                [mean_or_nan(r.trainable_params) if r.trainable_params else math.nan for r in rs])
            row["trainable_params_last"] = mean_or_nan(
                [r.trainable_params[-1] if r.trainable_params else math.nan for r in rs])
            row["forward_passes_per_image"] = mean_or_nan([r.forward_passes for r in rs])
            row["gflops_per_image"] = mean_or_nan([r.gflops for r in rs])
            row["train_seconds"] = mean_or_nan([r.train_seconds for r in rs])
            grows.append(row)

        labels = list(by)
        competing = [not row["reference"] for row in grows]
        for m in metrics:
            shown = [round(row[f"{m}_mean"], ACC_DIGITS) for row in grows]
            tied = best_rows(shown, METRICS[m][2], competing)
            ref = labels[tied[0]] if tied else None  # the yardstick of the t-test
            for i, (row, label, comp) in enumerate(zip(grows, labels, competing)):
                p = math.nan
                if ref is not None and comp and i not in tied:
                    shared = sorted(set(by[ref]) & set(by[label]))
                    if len(shared) >= 2:
                        p = _paired_p([by[ref][s].metrics[m] for s in shared],
                                      [by[label][s].metrics[m] for s in shared])
                row[f"{m}_best"] = tied == [i]
                row[f"{m}_p_vs_best"] = p
                row[f"{m}_sig"] = bool(p < SIGNIFICANCE_P)  # NaN compares False

        if paper is not None:
            for row in grows:
                entry = published_for(paper, row["method"], g.benchmark, g.n_tasks,
                                      g.runs[0].classes_per_task, g.protocol)
                for m in PAPER_METRICS:
                    if m not in metrics:
                        continue
                    value, se = (entry.metric(m) if entry else None) or (math.nan, math.nan)
                    row[f"paper_{m}"], row[f"paper_{m}_se"] = value, se
                    row[f"delta_{m}"] = row[f"{m}_mean"] - value
                row["paper_source"] = entry.source if entry else ""
                row["paper_about"] = sources_note([entry])
        rows += grows

    columns = ["group", "benchmark", "n_tasks", "split_protocol", "split_hash", "method", "row",
               "reference", "n_seeds", "seeds", "precision"]
    for m in metrics:
        columns += [f"{m}_mean", f"{m}_std", f"{m}_best", f"{m}_p_vs_best", f"{m}_sig"]
        if paper is not None and m in PAPER_METRICS:
            columns += [f"paper_{m}", f"paper_{m}_se", f"delta_{m}"]
    if paper is not None:
        columns += ["paper_source", "paper_about"]
    columns += list(COSTS)
    return pd.DataFrame(rows, columns=columns)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def method_info_frame(grouping: Grouping):
    """The methods' own per-task records (``results.json`` ``method_info``), numeric scalars
    only, mean over seeds: columns group, row, key, task (1-based), value, n_seeds. This is where
    e.g. SD-LoRA-KD's absorptions per task (``kd_absorbed`` of ``kd_fitted``) become visible."""
    import pandas as pd

    rows = []
    for g in grouping.groups:
        for label, seeds in g.by_label().items():
            keys: dict[str, None] = {}
            for r in seeds.values():
                for info in r.method_info:
                    keys.update({k: None for k, v in info.items() if _is_number(v)})
            for key in keys:
                for t in range(g.n_tasks):
                    vals = [float(r.method_info[t][key]) for r in seeds.values()
                            if t < len(r.method_info) and _is_number(r.method_info[t].get(key))]
                    rows.append({"group": g.label, "row": label, "key": key, "task": t + 1,
                                 "value": statistics.fmean(vals) if vals else math.nan,
                                 "n_seeds": len(vals)})
    return pd.DataFrame(rows, columns=["group", "row", "key", "task", "value", "n_seeds"])


def identical_curves(group: Group) -> list[list[str]]:
    """Row labels whose mean accuracy after every task is the same (to 1e-9 %): their curves
    coincide, so only the one drawn last is visible. Sets of two or more, sorted."""
    sets: list[tuple[list[float], list[str]]] = []
    for label, seeds in group.by_label().items():
        curve = [statistics.fmean(c) for c in zip(*(r.curve for r in seeds.values()))]
        same = next((labels for ref, labels in sets
                     if all(math.isclose(a, b, rel_tol=0, abs_tol=1e-9)
                            for a, b in zip(ref, curve))), None)
        if same is None:
            sets.append((curve, [label]))
        else:
            same.append(label)
    return [labels for _, labels in sets if len(labels) > 1]
