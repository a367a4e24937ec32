"""Rendering the aggregated tables: ``summary.md``, ``summary.tex``, the CSV side files, W&B.

The numbers come from :mod:`clbench.report.tables`, the formatted group tables and their notes
from :mod:`clbench.report.display`. Paths shown are the runs' display paths (relative to the
folders the user named), never machine paths.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from clbench.report import display
from clbench.report.cells import MD, TEX, num, sig
from clbench.report.groups import Group, Grouping
from clbench.report.tables import PAPER_METRICS, identical_curves


def markdown(frame, left: int = 1) -> str:
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


def excluded_frame(grouping: Grouping):
    """Incomplete and diverged runs: never averaged or ranked, listed apart."""
    import pandas as pd

    columns = ["group", "method", "row", "seed", "status", "tasks_done", "n_tasks",
               "acc_after_last_done_task", "avg_inc_acc_so_far", "message", "path"]
    rows = [{"group": desc, "method": r.method, "row": r.label, "seed": r.seed,
             "status": "incomplete" if r.status == "running" else r.status,
             "tasks_done": r.tasks_done, "n_tasks": r.n_tasks,
             "acc_after_last_done_task": r.curve[-1] if r.curve else math.nan,
             "avg_inc_acc_so_far": r.metrics["avg_inc_acc"], "message": r.message,
             "path": r.display} for desc, r in grouping.excluded]
    return pd.DataFrame(rows, columns=columns)


def _method_info_markdown(info, group: Group) -> list[str]:
    """Rows per (method, key) and a column per task; a row whose value is the same at every
    task shows it once, under "all tasks", instead of repeating it."""
    import pandas as pd

    gdf = info[info["group"] == group.label]
    if not len(gdf):
        return []
    tasks = sorted(set(gdf["task"]))
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for row, key, task, value in zip(gdf["row"], gdf["key"], gdf["task"], gdf["value"]):
        cells.setdefault((row, key), {})[task] = "" if math.isnan(value) else sig(value, trim=True)
    rows = []
    for (row, key), c in cells.items():
        values = [c.get(t, "") for t in tasks]
        constant = len(tasks) > 1 and values[0] != "" and len(set(values)) == 1
        rows.append([row, key, values[0] if constant else "",
                     *([""] * len(tasks) if constant else values)])
    frame = pd.DataFrame(rows, columns=["Method", "Info", "all tasks",
                                        *(f"task {t}" for t in tasks)])
    if not any(frame["all tasks"]):
        frame = frame.drop(columns="all tasks")
    return ["### Method info (the methods' own per-task records, mean over seeds)", "",
            markdown(frame, left=2), "",
            "*From `method_info` in results.json: numeric entries only (e.g. SD-LoRA-KD's "
            "`kd_absorbed` of `kd_fitted` directions per task; `stored_directions`); a value "
            "that is the same after every task is shown once, under \"all tasks\". Full "
            "values: `method_info.csv`.*", ""]


def identical_curves_note(group: Group) -> str:
    """Which methods have the same accuracy curve, so one hides the other in ``acc_curve``
    ("" when none)."""
    sets = identical_curves(group)
    if not sets:
        return ""
    return ("identical accuracy curves (the same mean accuracy after every task; they lie on top "
            "of each other in acc_curve.png): " + "; ".join(" = ".join(s) for s in sets))


def _show_paper(gdf, paper: bool) -> bool:
    return paper and any(not math.isnan(v) for m in PAPER_METRICS if f"paper_{m}" in gdf
                         for v in gdf[f"paper_{m}"])


def summary_markdown(name, roots, n_results, grouping, table, excluded, info, metric_keys,
                     paper, figures, skipped) -> str:
    import pandas as pd

    lines = [f"# Report: {name}", ""]
    n_out = len(grouping.excluded)
    lines += [f"{n_results} result file(s) ({n_results - n_out} complete, {n_out} incomplete or "
              "diverged) found under: " + ", ".join(f"`{p}`" for p in roots) + ".",
              "Metrics are recomputed from the per-task correct/total counts "
              "(`clbench.metrics`); accuracies are pooled over the test samples of all seen "
              "classes.", ""]
    warn = list(skipped) + grouping.warnings
    if warn:
        lines += ["## Warnings", ""] + [f"- **Warning:** {w}" for w in warn] + [""]
    if grouping.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in grouping.notes] + [""]
    for g in grouping.groups:
        gdf = table[table["group"] == g.label]
        show_paper = _show_paper(gdf, paper)
        seeds = sorted({r.seed for r in g.runs})
        backbones = sorted({str(r.settings.get("backbone", "?")) for r in g.runs})
        hashes = sorted({r.split_hash for r in g.runs})
        precision = display.uniform_precision(gdf)
        frame = pd.concat([display.accuracy_frame(gdf, metric_keys, MD, show_paper),
                           display.cost_frame(gdf, MD).drop(columns="Method")], axis=1)
        lines += [f"## {g.label}", "",
                  f"Seeds: {', '.join(map(str, seeds))}; backbone: {', '.join(backbones)}; "
                  + (f"precision: {precision}; " if precision else "")
                  + f"split hash: {', '.join(h[:12] for h in hashes)}.", "",
                  markdown(frame), "",
                  f"*{display.accuracy_note(gdf, show_paper, MD)} "
                  f"{display.cost_note(gdf, MD, references=False)}*"]
        same = identical_curves_note(g)
        if same:
            lines.append(f"*Note: {same}.*")
        if show_paper:
            sources = sorted({s for s in gdf["paper_source"] if s})
            lines.append(f"*Published numbers from: {'; '.join(sources)}.*")
        elif paper:
            lines.append("*No published numbers for this setting.*")
        lines.append("")
        lines += _method_info_markdown(info, g)
    if not grouping.groups:
        lines += ["No complete run: no table and no figures.", ""]
    if len(excluded):
        shown = excluded.drop(columns=["group", "method"]).rename(columns={
            "row": "Method", "seed": "Seed", "status": "Status", "tasks_done": "Tasks done",
            "n_tasks": "Tasks", "acc_after_last_done_task": "Acc after last done task (%)",
            "avg_inc_acc_so_far": "Avg. inc. acc so far (%)", "message": "Message",
            "path": "File"})
        shown.insert(0, "Setting", list(excluded["group"]))
        for col in ("Acc after last done task (%)", "Avg. inc. acc so far (%)"):
            shown[col] = [MD.missing if math.isnan(v) else num(v) for v in shown[col]]
        lines += ["## Runs left out (incomplete or diverged: not in the tables and figures)", "",
                  markdown(shown.astype(str), left=2), ""]
    if figures:
        lines += ["## Figures", ""]
        for key, path in figures.items():
            if path.suffix == ".png":
                lines += [f"![{key}]({path.name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def summary_latex(grouping, table, metric_keys, paper) -> str:
    """Per group, an accuracy table and a cost table: two floats that each fit a page, to copy
    one by one (all eleven columns in one table overflow it)."""
    parts = ["% Generated by clbench report. Needs \\usepackage{booktabs}.",
             "% Per group: an accuracy table, then a cost table; copy the ones you need.", ""]
    for g in grouping.groups:
        gdf = table[table["group"] == g.label]
        show_paper = _show_paper(gdf, paper)
        label = _tex_escape(g.label)
        parts += [f"% {g.label}: accuracy",
                  _latex(display.accuracy_frame(gdf, metric_keys, TEX, show_paper),
                         caption=f"{label}: accuracy", label=f"tab:{g.slug}-acc",
                         note=display.accuracy_note(gdf, show_paper, TEX)),
                  f"% {g.label}: cost",
                  _latex(display.cost_frame(gdf, TEX), caption=f"{label}: cost",
                         label=f"tab:{g.slug}-cost", note=display.cost_note(gdf, TEX)), ""]
    return "\n".join(parts)


def log_wandb(mode: str, name: str, roots: list[str], config: dict, tables: dict,
              figures: dict[str, Path], out: Path) -> None:
    """The summary tables as ``wandb.Table`` and every PNG figure as ``wandb.Image``; run
    directory ``$WANDB_DIR`` if set, else the report folder."""
    import os

    from clbench import tracking

    handle = tracking.start_run(
        mode, project=os.environ.get("WANDB_PROJECT") or "clbench", group="report", name=name,
        dir=Path(os.environ.get("WANDB_DIR") or out),
        config={"report": name, "run_dirs": roots, **config})
    try:
        tracking.log_report(handle, tables={k: v for k, v in tables.items() if len(v)},
                            images={k: v for k, v in figures.items() if v.suffix == ".png"})
    finally:
        tracking.finish(handle)
