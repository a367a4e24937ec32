"""Which runs may be compared: groups by benchmark, task count, split and class orders.

* a run that is not complete (killed mid-way, or ``status = diverged``) is never averaged or
  ranked: it is listed apart (:attr:`Grouping.excluded`);
* runs of one group that use different data splits (``split.hash``) or, for the same seed,
  different class orders are not compared: a :class:`ReportWarning` and separate groups;
* runs of one method with different settings (hyper-parameters, backbone, precision) become
  separate rows, labelled with the settings that differ;
* two results for the same row and seed: the first (by path) is used, with a warning.
"""
from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from clbench.report.runs import ReportWarning, Run


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
        return slug(text)

    def by_label(self) -> dict[str, dict[int, Run]]:
        out: dict[str, dict[int, Run]] = defaultdict(dict)
        for r in self.runs:
            out[r.label][r.seed] = r
        return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}

    def max_seeds(self) -> int:
        return max((len(s) for s in self.by_label().values()), default=0)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


@dataclass
class Grouping:
    groups: list[Group]
    excluded: list[tuple[str, Run]]  # (setting label, run): incomplete or diverged
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
    excluded: list[tuple[str, Run]] = []
    for key in sorted(base):
        rs = sorted(base[key], key=lambda r: (r.method, r.seed, r.display))
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
                         f"{first.display}, ignoring {r.display}")
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
            excluded += [(sub_desc, r) for r in srs if not r.complete]
    diverged = sum(r.status == "diverged" for _, r in excluded)
    if len(excluded) > diverged:
        notes.append(f"{len(excluded) - diverged} incomplete run(s) are excluded from the tables "
                     "and figures; see 'Runs left out'")
    if diverged:
        notes.append(f"{diverged} diverged run(s) (non-finite loss or weights) are excluded from "
                     "the tables and figures and never ranked; see 'Runs left out'")
    return Grouping(groups, excluded, warn_lines, notes)
