"""``clbench report``: comparison tables and figures from run folders.

One way through the package: :mod:`~clbench.report.runs` finds and reads every ``results.json``
(recomputing the metrics from the counts), :mod:`~clbench.report.groups` decides which runs may be
compared, :mod:`~clbench.report.tables` aggregates (mean ± std, best continual method,
significance, published numbers, identical curves), :mod:`~clbench.report.display` formats one
group's accuracy and cost tables (cells and units from :mod:`~clbench.report.cells`),
:mod:`~clbench.report.writers` renders Markdown/LaTeX/CSV and W&B,
:mod:`~clbench.report.plots` draws the figures.

Files written into the report folder: ``summary.md``, ``summary.csv``, ``summary.tex`` (per
group an accuracy table and a cost table),
``incomplete_runs.csv`` (incomplete or diverged runs, only when there are some),
``method_info.csv`` (the methods' numeric per-task records, when any), ``acc_curve.png``/``.svg``,
``acc_matrix_<method>.png`` (``acc_matrix_<group>_<method>.png`` with several groups),
``forgetting.png``. Files of these names left by an earlier report in the same folder are removed
first; nothing else in the folder is touched.

Heavy modules (pandas, matplotlib, scipy, wandb) are imported inside the functions that use them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from clbench.errors import UsageError
from clbench.report.groups import Group, Grouping, group_runs
from clbench.report.runs import REFERENCE_METHODS, ReportWarning, Run, load_run, load_runs
from clbench.report.paper import load_paper_numbers
from clbench.report.tables import (COSTS, DEFAULT_METRICS, METRICS,
                                   method_info_frame, resolve_metrics, summary_frame)

__all__ = ["write_report", "load_runs", "load_run", "group_runs", "summary_frame",
           "method_info_frame", "resolve_metrics", "load_paper_numbers", "ReportWarning", "Run",
           "Group", "Grouping", "METRICS", "DEFAULT_METRICS", "COSTS", "REFERENCE_METHODS",
           "OWN_FILES"]

# What the reporter writes (and so may remove when re-reporting into the same folder).
OWN_FILES = ("summary.md", "summary.csv", "summary.tex", "incomplete_runs.csv",
             "method_info.csv", "acc_curve.png", "acc_curve.svg", "forgetting.png",
             "acc_matrix_*.png")


def write_report(run_dirs: list[Path], out_dir: Path | None = None, name: str | None = None,
                 metrics: list[str] | None = None, wandb_mode: str = "disabled",
                 compare_paper: bool = False) -> Path:
    """Write the tables and figures for the runs under ``run_dirs``; return the report folder.

    ``out_dir`` defaults to ``reports/<name>`` (callers pass their own, e.g. ``clbench run``
    writes under the run's folder), ``name`` to the base name of the first run dir.
    ``metrics``: metric keys for the tables (default final_acc, avg_inc_acc, forgetting, bwt).
    ``wandb_mode``: ``disabled`` | ``offline`` | ``online``; when enabled, the summary table is
    logged as a ``wandb.Table`` and every figure as a ``wandb.Image`` (run directory:
    ``$WANDB_DIR`` if set, else the report folder). ``compare_paper`` adds the published figure of
    the same protocol and split (``clbench/paper_numbers.json``) and the difference to ours.
    Raises :class:`clbench.errors.UsageError` for bad input or an output folder that cannot be
    written.
    """
    from clbench import tracking
    from clbench.report import writers
    from clbench.report.runs import shown_root

    if not run_dirs:
        raise UsageError("no run directory given")
    metric_keys = resolve_metrics(metrics)
    tracking.check_mode(wandb_mode)
    run_dirs = [Path(p) for p in run_dirs]
    roots = [shown_root(p) for p in run_dirs]
    name = name or run_dirs[0].resolve().name or "report"
    out = Path(out_dir) if out_dir is not None else Path("reports") / name

    skipped: list[str] = []
    runs = load_runs(run_dirs, skipped)
    grouping = group_runs(runs)
    paper = load_paper_numbers() if compare_paper else None
    table = summary_frame(grouping, metric_keys, paper)
    excluded = writers.excluded_frame(grouping)
    info = method_info_frame(grouping)

    _prepare_folder(out)
    try:
        table.to_csv(out / "summary.csv", index=False)
        if len(excluded):
            excluded.to_csv(out / "incomplete_runs.csv", index=False)
        if len(info):
            info.to_csv(out / "method_info.csv", index=False)
        figures = _write_figures(grouping.groups, out)
        (out / "summary.md").write_text(writers.summary_markdown(
            name, roots, len(runs), grouping, table, excluded, info, metric_keys,
            paper is not None, figures, skipped))
        (out / "summary.tex").write_text(writers.summary_latex(grouping, table, metric_keys,
                                                               paper is not None))
    except OSError as exc:
        raise UsageError(f"cannot write the report to {out}: {exc.strerror or exc}; "
                         "pass a writable folder with --out") from None

    if wandb_mode != "disabled":
        writers.log_wandb(wandb_mode, name, roots,
                          {"metrics": metric_keys, "n_results": len(runs),
                           "n_left_out": len(excluded), "compare_paper": compare_paper},
                          {"summary": table, "incomplete_runs": excluded, "method_info": info},
                          figures, out)
    return out


def _prepare_folder(out: Path) -> None:
    """Create ``out`` (a one-line :class:`UsageError` if it cannot be written) and remove the
    files an earlier report wrote there, so no stale figure survives."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
        if not os.access(out, os.W_OK):
            raise PermissionError(13, "Permission denied")
        for pattern in OWN_FILES:
            for old in out.glob(pattern):
                old.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write the report to {out}: {exc.strerror or exc}; "
                         "pass a writable folder with --out") from None


def _write_figures(groups: list[Group], out: Path) -> dict[str, Path]:
    """Draw every figure; return {W&B key: file}."""
    from clbench.report.groups import slug
    from clbench.report.plots import (method_colors, plot_acc_curves, plot_acc_matrix,
                                      plot_forgetting)

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
            stem = "acc_matrix_" + (f"{g.slug}_" if several else "") + slug(label)
            path = out / f"{stem}.png"
            plot_acc_matrix(g, label, list(seeds.values()), colors[label], path)
            files[stem] = path
    plot_forgetting(groups, colors, out / "forgetting.png")
    files["forgetting"] = out / "forgetting.png"
    return files
