"""Rendering the aggregated tables: ``summary.md``, ``summary.tex``, the CSV side files, W&B.

Cells are formatted here (mean ± std only with several seeds, bold best, † significant); the
numbers come from :mod:`clbench.report.tables`. Paths shown are the runs' display paths
(relative to the folders the user named), never machine paths.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from clbench.report.groups import Group, Grouping
from clbench.report.tables import (COSTS, METRICS, PAPER_METRICS, SIGNIFICANCE_P,
                                   SIGNIFICANCE_TEST, best_flags)


@dataclass(frozen=True)
class Style:
    pm: str
    bold: str  # format string with {}
    mark: str
    missing: str


MD = Style(" ± ", "**{}**", "†", "–")
TEX = Style(r" $\pm$ ", r"\textbf{{{}}}", r"$^{\dagger}$", "--")


def _num(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def _fmt_params(x: float) -> str:
    return f"{x / 1e6:.3g}"


def _fmt_count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}"


def _fmt_gflops(x: float) -> str:
    return f"{x:.3g}"


def _fmt_seconds(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


_COST_FORMATS = {"trainable_params_mean": _fmt_params, "trainable_params_last": _fmt_params,
                 "forward_passes_per_image": _fmt_count, "gflops_per_image": _fmt_gflops,
                 "train_seconds": _fmt_seconds}


def _row_name(row) -> str:
    ref = str(row.get("reference") or "")
    return f"{row['row']} ({ref.replace('-', ' ')})" if ref and ref != "nan" else row["row"]


def uniform_precision(gdf) -> str | None:
    values = {str(p) for p in gdf["precision"]}
    return values.pop() if len(values) == 1 else None


def display_frame(gdf, metrics: Sequence[str], style: Style, paper: bool):
    """Formatted strings for one group's table (Markdown or LaTeX cell syntax)."""
    import pandas as pd

    tex = style is TEX
    out = pd.DataFrame(index=range(len(gdf)))
    out["Method"] = [_row_name(row) for _, row in gdf.fillna({"reference": ""}).iterrows()]
    out["Seeds"] = [str(int(n)) for n in gdf["n_seeds"]]
    if uniform_precision(gdf) is None:
        out["Precision"] = [str(p) for p in gdf["precision"]]
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
    competing = [not (isinstance(r, str) and r) for r in gdf["reference"]]
    for col, (md_head, tex_head) in COSTS.items():
        values = [float(v) for v in gdf[col]]
        flags = best_flags(values, higher=False, competing=competing)
        blank = "" if col == "gflops_per_image" else style.missing  # not measured: blank
        out[tex_head if tex else md_head] = [
            blank if math.isnan(v) else
            (style.bold.format(_COST_FORMATS[col](v)) if best else _COST_FORMATS[col](v))
            for v, best in zip(values, flags)]
    return out


def footnote(gdf, paper: bool, tex: bool) -> str:
    if tex:
        pm, mark, bold, lt, delta, arrow, minus = (
            r"$\pm$", r"$^{\dagger}$", r"\textbf{bold}", "$<$", r"$\Delta$", r"$\rightarrow$",
            "$-$")
    else:
        pm, mark, bold, lt, delta, arrow, minus = ("±", "†", "**bold**", "<", "Δ", "→", "−")
    several = int(gdf["n_seeds"].max()) >= 2 if len(gdf) else False
    text = (f"Mean {pm} sample standard deviation (ddof = 1) over seeds (mean only with one "
            "seed). " if several else "One seed per method: single values, no spread. ")
    text += f"{bold}: best continual method of the column (cost columns: lowest). "
    if several:
        text += (f"{mark}: significantly different from that method, {SIGNIFICANCE_TEST}, "
                 f"p {lt} {SIGNIFICANCE_P}; not tested with fewer than 2 shared seeds. ")
    refs = sorted({str(r) for r in gdf["reference"] if isinstance(r, str) and r})
    if refs:
        text += (f"Rows marked ({', '.join(r.replace('-', ' ') for r in refs)}) are reference "
                 "points, not continual methods: shown, never bold, never tested. ")
    text += ("Params: trainable parameters in millions, averaged over tasks and while training "
             "the last task; GFLOPs: counted on one test image's inference path (blank: not "
             "measured); train time: total training seconds over all tasks, mean over seeds.")
    if paper:
        text += (f" paper: published mean (standard error) over 5 runs with ViT-B/16 "
                 f"IN21k{arrow}IN1k (Wu et al., SD-LoRA, ICLR 2025); {delta} = ours {minus} paper "
                 f"(percentage points).")
    if tex:
        text = text.replace("scipy.stats.ttest_rel", r"\texttt{scipy.stats.ttest\_rel}")
    return text


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
             "status": "incomplete" if r.status == "running" else r.status, "tasks_done": r.tasks_done, "n_tasks": r.n_tasks,
             "acc_after_last_done_task": r.curve[-1] if r.curve else math.nan,
             "avg_inc_acc_so_far": r.metrics["avg_inc_acc"], "message": r.message,
             "path": r.display} for desc, r in grouping.excluded]
    return pd.DataFrame(rows, columns=columns)


def _method_info_markdown(info, group: Group) -> list[str]:
    import pandas as pd

    gdf = info[info["group"] == group.label]
    if not len(gdf):
        return []
    def cell(v: float) -> str:
        return "" if math.isnan(v) else (str(int(v)) if float(v).is_integer() else f"{v:.3g}")

    tasks = sorted(set(gdf["task"]))
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for row, key, task, value in zip(gdf["row"], gdf["key"], gdf["task"], gdf["value"]):
        cells.setdefault((row, key), {})[task] = cell(float(value))
    frame = pd.DataFrame([[row, key, *(c.get(t, "") for t in tasks)]
                          for (row, key), c in cells.items()],
                         columns=["Method", "Info", *(f"task {t}" for t in tasks)])
    return ["### Method info (the methods' own per-task records, mean over seeds)", "",
            markdown(frame.astype(str), left=2), "",
            "*From `method_info` in results.json: numeric entries only (e.g. SD-LoRA-KD's "
            "`kd_absorbed` of `kd_fitted` directions per task; `stored_directions`). Full "
            "values: `method_info.csv`.*", ""]


def _show_paper(gdf, paper: bool) -> bool:
    return paper and any(not math.isnan(v) for m in PAPER_METRICS if f"paper_{m}" in gdf
                         for v in gdf[f"paper_{m}"])


def summary_markdown(name, roots, n_results, grouping, table, excluded, info, metric_keys,
                     paper, figures, skipped) -> str:
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
        precision = uniform_precision(gdf)
        lines += [f"## {g.label}", "",
                  f"Seeds: {', '.join(map(str, seeds))}; backbone: {', '.join(backbones)}; "
                  + (f"precision: {precision}; " if precision else "")
                  + f"split hash: {', '.join(h[:12] for h in hashes)}.", "",
                  markdown(display_frame(gdf, metric_keys, MD, show_paper)), "",
                  f"*{footnote(gdf, show_paper, tex=False)}*"]
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
            shown[col] = [MD.missing if math.isnan(v) else _num(v) for v in shown[col]]
        lines += ["## Runs left out (incomplete or diverged: not in the tables and figures)", "",
                  markdown(shown.astype(str), left=2), ""]
    if figures:
        lines += ["## Figures", ""]
        for key, path in figures.items():
            if path.suffix == ".png":
                lines += [f"![{key}]({path.name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def summary_latex(grouping, table, metric_keys, paper) -> str:
    parts = ["% Generated by clbench report. Needs \\usepackage{booktabs}.", ""]
    for g in grouping.groups:
        gdf = table[table["group"] == g.label]
        show_paper = _show_paper(gdf, paper)
        frame = display_frame(gdf, metric_keys, TEX, show_paper)
        note = footnote(gdf, show_paper, tex=True)
        parts += [_latex(frame, caption=_tex_escape(g.label), label=f"tab:{g.slug}", note=note),
                  ""]
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
