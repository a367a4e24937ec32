"""Figures of a report: accuracy curves, task × task accuracy matrices, per-task forgetting.

matplotlib (Agg, no display) is imported inside the functions; one colour per method label is
kept across every figure of a report, from a list of 20 colours chosen to be told apart
(:data:`COLORS`). On the accuracy curves each method also gets its own marker and line style, so
that curves crossing in one colour family stay apart in print; curves that coincide exactly hide
each other whatever their style, so the figure names them in a note. Each plot function returns
its ``Figure`` (tests read the axes from it).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    from clbench.report.groups import Group
    from clbench.report.runs import Run

# matplotlib's tab10, then ten colours picked greedily (largest smallest CIELAB distance to those
# already chosen, from Kelly's and Trubetskoy's contrast lists, none lighter than L* = 80 so that
# lines stay visible on white). tab20 pairs a dark and a light shade of each hue, which makes
# unrelated methods look related; here any two of the 20 differ by ΔE*ab ≥ 27.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#000075", "#f032e6", "#f99379",
          "#c2b280", "#008856", "#a1caf1", "#2b3d26", "#911eb4", "#b3446c")


# Markers and line styles of the accuracy curves, paired by the label's sorted index: 14 markers
# and 3 styles give 42 distinct pairs. "--" is not among them: it marks reference rows (joint).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", "p", ">", "h", "d", "8")
LINESTYLES = ("-", "-.", ":")
REFERENCE_LINESTYLE = "--"


def method_colors(labels: Iterable[str]) -> dict[str, Any]:
    """Fixed colour per row label, in sorted order; beyond 20 labels the list repeats."""
    names = sorted(set(labels))
    return {n: COLORS[i % len(COLORS)] for i, n in enumerate(names)}


def method_marks(labels: Iterable[str]) -> dict[str, tuple[str, str]]:
    """(marker, line style) per row label, in sorted order like :func:`method_colors`."""
    names = sorted(set(labels))
    return {n: (MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)])
            for i, n in enumerate(names)}


def _spread(groups: list[Group]) -> str:
    """What the shading / error bars show: only 'mean ± std' when some row has several seeds."""
    if any(g.max_seeds() >= 2 for g in groups):
        return "mean ± std over seeds"
    return "one seed: no spread shown"


def _legend_names(groups: list[Group], labels: list[str]) -> list[str]:
    """Row labels, with the kind of reference point for rows like the joint upper bound."""
    kind = {r.label: r.reference for g in groups for r in g.runs if r.reference}
    return [f"{k} ({kind[k].replace('-', ' ')})" if k in kind else k for k in labels]


def _figure(**kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _integer_ticks(ax, n: int) -> None:
    """Task numbers on the x axis: every task up to 20, else integer steps."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    ax.xaxis.set_major_locator(FixedLocator(range(1, n + 1)) if n <= 20
                               else MaxNLocator(nbins=10, integer=True))
    ax.set_xlim(0.5, n + 0.5)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def plot_acc_curves(groups: list[Group], colors: dict, paths: Sequence[Path]):
    import numpy as np

    nrows, ncols = _grid(len(groups))
    fig = _figure(figsize=(max(8.5, 5.5 * ncols + 2.0), 4.0 * nrows + 0.6), dpi=150,
                  layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    marks = method_marks(r.label for g in groups for r in g.runs)
    handles: dict[str, Any] = {}
    for ax, g in zip(axes, groups):
        x = np.arange(1, g.n_tasks + 1)
        for label, seeds in g.by_label().items():
            curves = np.array([r.curve for r in seeds.values()])
            mean = curves.mean(axis=0)
            marker, style = marks[label]
            if any(r.reference for r in seeds.values()):  # e.g. the joint upper bound
                style = REFERENCE_LINESTYLE
            (line,) = ax.plot(x, mean, marker=marker, ms=5, color=colors[label], label=label,
                              linestyle=style)
            if len(curves) >= 2:
                std = curves.std(axis=0, ddof=1)
                ax.fill_between(x, mean - std, mean + std, color=colors[label], alpha=0.2,
                                linewidth=0)
            handles.setdefault(label, line)
        ax.set_title(g.label, fontsize=10)
        ax.set_xlabel("number of tasks learned")
        note = _identical_note(g)
        if note:  # under the x label; constrained layout makes room for it
            ax.annotate(note, xy=(0.5, 0), xycoords=ax.xaxis.label, xytext=(0, -6),
                        textcoords="offset points", ha="center", va="top", fontsize=8,
                        color="#444444", gid="identical-curves-note")
        ax.set_ylabel("accuracy on seen classes (%)")
        _integer_ticks(ax, g.n_tasks)
        ax.grid(alpha=0.3)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(f"Accuracy on all seen classes after each task\n({_spread(groups)})")
    fig.legend([handles[k] for k in sorted(handles)], _legend_names(groups, sorted(handles)),
               loc="outside right upper", title="method", handlelength=4)  # long: shows dashes
    for path in paths:
        fig.savefig(path, dpi=150)
    return fig


def _identical_note(group: Group) -> str:
    """Lines under the x label naming the methods whose curves coincide (one hides the other);
    empty when there are none."""
    import textwrap

    from clbench.report.tables import identical_curves

    sets = identical_curves(group)
    if not sets:
        return ""
    text = ("Note: identical curves (same mean after every task) lie on top of each other: "
            + "; ".join("\u00a0= ".join(s) for s in sets))  # no break before "="
    return "\n".join(textwrap.wrap(text, 60, break_on_hyphens=False))  # fits one panel


def plot_acc_matrix(group: Group, label: str, runs: Sequence[Run], color: Any, path: Path):
    import numpy as np

    t = group.n_tasks
    mats = np.full((len(runs), t, t), np.nan)
    for k, r in enumerate(runs):
        for i, row in enumerate(r.acc):
            mats[k, i, : i + 1] = row[: i + 1]
    mean = mats.mean(axis=0)
    size = max(4.5, 0.42 * t + 2.5)
    fig = _figure(figsize=(size + 1.0, size), dpi=150, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(mean), cmap="viridis", vmin=0, vmax=100)
    font = max(5.0, min(10.0, 160.0 / t))
    digits = 1 if t < 15 else 0
    for i in range(t):
        for j in range(i + 1):
            v = mean[i, j]
            ax.text(j, i, f"{v:.{digits}f}", ha="center", va="center", fontsize=font,
                    color="white" if v < 60 else "black")
    ticks = np.arange(t)
    ax.set_xticks(ticks, [str(k + 1) for k in ticks])
    ax.set_yticks(ticks, [str(k + 1) for k in ticks])
    ax.tick_params(labelsize=max(6.0, min(10.0, 200.0 / t)))
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(2)
    n = len(runs)
    ax.set_title(f"{label}: accuracy on task j after task i (%)\n{group.label}; "
                 f"mean over {n} seed{'s' if n != 1 else ''}", fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.8)
    fig.savefig(path, dpi=150)
    return fig


def plot_forgetting(groups: list[Group], colors: dict, path: Path):
    import numpy as np

    nrows, ncols = _grid(len(groups))
    widest = max((g.n_tasks - 1) * len(g.by_label()) for g in groups)
    width = max(6.0, min(16.0, 0.12 * widest + 3.0))
    fig = _figure(figsize=(max(8.5, width * ncols + 2.0), 4.0 * nrows + 0.6), dpi=150,
                  layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    handles: dict[str, Any] = {}
    for ax, g in zip(axes, groups):
        by = g.by_label()
        ax.set_title(g.label, fontsize=10)
        ax.set_xlabel("task j (learned before the last task)")
        ax.set_ylabel("forgetting (percentage points)")
        if g.n_tasks < 2:
            ax.text(0.5, 0.5, "one task: nothing to forget", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        x = np.arange(1, g.n_tasks)
        width = 0.8 / len(by)
        for k, (label, seeds) in enumerate(by.items()):
            vals = np.array([r.task_forgetting for r in seeds.values()])
            std = vals.std(axis=0, ddof=1) if len(vals) >= 2 else None
            bars = ax.bar(x - 0.4 + width * (k + 0.5), vals.mean(axis=0), width, yerr=std,
                          color=colors[label], label=label, capsize=2 if std is not None else 0,
                          error_kw={"linewidth": 0.8})
            handles.setdefault(label, bars)
        _integer_ticks(ax, g.n_tasks - 1)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    fig.suptitle("Per-task forgetting: best accuracy before the last task − final accuracy\n"
                 f"({_spread(groups)})")
    if handles:
        fig.legend([handles[k] for k in sorted(handles)], _legend_names(groups, sorted(handles)),
                   loc="outside right upper", title="method")
    fig.savefig(path, dpi=150)
    return fig

