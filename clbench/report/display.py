"""One group's table as shown: an accuracy part and a cost part, formatted, each with its note.

``summary.md`` puts the two parts side by side (one complete table); ``summary.tex`` prints
them as two tables, because eleven columns overflow a paper's page. Bold marks the *unique* best
of a column as shown (a shared best is nobody's win); time columns are never bold, since they
measure the hardware that ran a method as much as the method.
"""
from __future__ import annotations

import math
from typing import Sequence

from clbench.report.cells import TEX, Style, count, num, pick_unit, sig
from clbench.report.tables import (COSTS, METRICS, PAPER_METRICS, SIGNIFICANCE_P,
                                   SIGNIFICANCE_TEST, Cost, best_flags)


def _row_name(row) -> str:
    ref = str(row.get("reference") or "")
    return f"{row['row']} ({ref.replace('-', ' ')})" if ref and ref != "nan" else row["row"]


def _references(gdf) -> list[str]:
    return sorted({str(r) for r in gdf["reference"] if isinstance(r, str) and r})


def uniform_precision(gdf) -> str | None:
    values = {str(p) for p in gdf["precision"]}
    return values.pop() if len(values) == 1 else None


def _method_column(gdf) -> list[str]:
    return [_row_name(row) for _, row in gdf.fillna({"reference": ""}).iterrows()]


def accuracy_frame(gdf, metrics: Sequence[str], style: Style, paper: bool):
    """Method, seeds, (precision when it differs), the metrics, (published numbers)."""
    import pandas as pd

    tex = style is TEX
    out = pd.DataFrame(index=range(len(gdf)))
    out["Method"] = _method_column(gdf)
    out["Seeds"] = [str(int(n)) for n in gdf["n_seeds"]]
    if uniform_precision(gdf) is None:
        out["Precision"] = [str(p) for p in gdf["precision"]]
    for m in metrics:
        cells = []
        for _, row in gdf.iterrows():
            text = num(row[f"{m}_mean"])
            if row["n_seeds"] >= 2 and not math.isnan(row[f"{m}_std"]):
                text += style.pm + num(row[f"{m}_std"])
            if row[f"{m}_best"]:
                text = style.bold.format(text)
            if row[f"{m}_sig"]:
                text += style.mark
            cells.append(text)
        out[METRICS[m][1] if tex else METRICS[m][0]] = cells
        if paper and m in PAPER_METRICS and f"paper_{m}" in gdf:
            short = PAPER_METRICS[m]
            out[f"paper {short} (\\%)" if tex else f"paper {short} (%)"] = [
                style.missing if math.isnan(p) else f"{num(p)} ({num(se)})"
                for p, se in zip(gdf[f"paper_{m}"], gdf[f"paper_{m}_se"])]
            out[f"{style.delta} {short}"] = [
                style.missing if math.isnan(d) else f"{d:+.2f}" for d in gdf[f"delta_{m}"]]
    return out


def _cost_column(values: list[float], cost: Cost, competing: list[bool], style: Style,
                 blank: str) -> tuple[str, list[str]]:
    """(unit for the header, cells): values in the column's unit, the unique lowest bold."""
    factor, unit = pick_unit(values, cost.scale) if cost.scale else (1.0, "")
    texts = [None if math.isnan(v) else (sig(v / factor) if cost.scale else count(v))
             for v in values]
    shown = [math.nan if t is None else float(t) for t in texts]
    flags = (best_flags(shown, higher=False, competing=competing) if cost.ranked
             else [False] * len(values))
    cells = [blank if t is None else style.bold.format(t) if best else t
             for t, best in zip(texts, flags)]
    return unit, cells


def cost_frame(gdf, style: Style):
    """Method and the cost columns, each in the unit that suits its values."""
    import pandas as pd

    tex = style is TEX
    out = pd.DataFrame(index=range(len(gdf)))
    out["Method"] = _method_column(gdf)
    competing = [not (isinstance(r, str) and r) for r in gdf["reference"]]
    for col, cost in COSTS.items():
        blank = "" if col == "gflops_per_image" else style.missing  # not measured: blank
        unit, cells = _cost_column([float(v) for v in gdf[col]], cost, competing, style, blank)
        out[(cost.tex if tex else cost.md).format(unit=unit)] = cells
    return out


def _references_sentence(gdf) -> str:
    refs = _references(gdf)
    if not refs:
        return ""
    return (f"Rows marked ({', '.join(r.replace('-', ' ') for r in refs)}) are reference "
            "points, not continual methods: shown, never bold, never tested. ")


def accuracy_note(gdf, paper: bool, style: Style) -> str:
    pm, bold = style.pm.strip(), style.bold.format("bold")
    several = int(gdf["n_seeds"].max()) >= 2 if len(gdf) else False
    text = (f"Mean {pm} sample standard deviation (ddof = 1) over seeds (mean only with one "
            "seed). " if several else "One seed per method: single values, no spread. ")
    text += (f"{bold}: the best continual method of the column, unless another one shows the "
             "same value (then none is bold). ")
    if several:
        text += (f"{style.mark}: significantly different from the best one (the first by name "
                 f"when several share it), {SIGNIFICANCE_TEST}, p {style.lt} {SIGNIFICANCE_P}; "
                 "not tested with fewer than 2 shared seeds. ")
    text += _references_sentence(gdf)
    if paper:
        about = "; ".join(a for a in dict.fromkeys(gdf.get("paper_about", []))
                          if isinstance(a, str) and a)
        if style is TEX:
            about = about.replace("%", r"\%").replace("&", r"\&").replace("_", r"\_")
        text += ("paper: the published figure (its spread in parentheses) for the same "
                 f"benchmark, task count, task protocol and split, from {about}; "
                 f"{style.delta} = ours {style.minus} paper (percentage points). ")
    if style is TEX:
        text = text.replace("scipy.stats.ttest_rel", r"\texttt{scipy.stats.ttest\_rel}")
    return text.rstrip()


def cost_note(gdf, style: Style, references: bool = True) -> str:
    """``references``: repeat which rows are reference points (not when the accuracy note,
    which says so, is printed beside it)."""
    text = (f"Costs (mean over seeds, lower is better): {style.bold.format('bold')} marks the "
            "lowest value of a continual method when no other one shows it. Params: trainable "
            "parameters (K = thousand, M = million, B = billion), averaged over tasks and while "
            "training the last task; FLOPs: counted on one test image's inference path (blank: "
            "not measured); train time: total training time over all tasks, which depends on "
            "the hardware each run used, so it is never bold. ")
    if references:
        text += _references_sentence(gdf)
    return text.rstrip()
