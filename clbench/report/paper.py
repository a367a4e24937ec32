"""Published figures (``clbench/paper_numbers.json``) and which one may stand beside a run.

Papers differ in more than the benchmark's name: ImageNet-R has two 80/20 splits in use, and
some papers start with a larger first task (CL-LoRA's B5-Inc5). A figure is set beside a run only
when benchmark, task count, task protocol and split all agree, so the report never compares
unlike with like; the rest stay in the file for the record.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

_BENCHMARK_ALIASES = {"cub": "cub200", "cub-200": "cub200", "cifar-100": "cifar100",
                      "imagenetr": "imagenet-r", "imagenet-1k-r": "imagenet-r"}


@dataclass(frozen=True)
class Published:
    """One published figure pair with where it comes from."""

    method: str
    benchmark: str
    tasks: int
    protocol: str
    split: str | None
    final_acc: dict | None
    avg_inc_acc: dict | None
    citation: str
    table: str
    statistic: str
    backbone: str
    own_paper: bool  # the figure comes from the paper that introduced the method

    @property
    def source(self) -> str:
        return f"{self.citation}, {self.table}" if self.table else self.citation

    def metric(self, name: str) -> tuple[float, float] | None:
        """(value, standard error or NaN) of ``final_acc`` / ``avg_inc_acc``, None if unpublished."""
        value = getattr(self, name, None)
        if not value or value.get("mean") is None:
            return None
        se = value.get("se")
        return float(value["mean"]), float("nan") if se is None else float(se)


def load_paper_numbers() -> list[Published]:
    from importlib import resources

    try:
        text = resources.files("clbench").joinpath("paper_numbers.json").read_text()
    except (OSError, ModuleNotFoundError):
        text = (Path(__file__).parent.parent / "paper_numbers.json").read_text()
    data = json.loads(text)
    papers = data["papers"]
    out = []
    for e in data["entries"]:
        paper = papers[e["paper"]]
        out.append(Published(
            method=e["method"], benchmark=e["benchmark"], tasks=int(e["tasks"]),
            protocol=e["protocol"], split=e.get("split"), final_acc=e.get("final_acc"),
            avg_inc_acc=e.get("avg_inc_acc"), citation=paper["citation"],
            table=e.get("table", ""), statistic=e.get("statistic", paper["statistic"]),
            backbone=e.get("backbone", paper["backbone"]),
            own_paper=e["method"] in paper.get("introduces", ())))
    return out


def task_protocol(classes_per_task: Sequence[int]) -> str:
    """``B0-Inc20`` for equal tasks of 20 classes, ``B5-Inc5`` for a 5-class first task followed
    by tasks of 5 (the first task counted as the base when it differs)."""
    sizes = list(classes_per_task)
    if not sizes:
        return "unknown"
    if len(set(sizes)) == 1:
        return f"B0-Inc{sizes[0]}"
    return f"B{sizes[0]}-Inc{sizes[1]}"


def canonical_benchmark(name: str) -> str:
    flat = name.lower().replace("_", "-")
    return _BENCHMARK_ALIASES.get(flat, flat)


def published_for(entries: Sequence[Published], method: str, benchmark: str, n_tasks: int,
                  classes_per_task: Sequence[int], split_protocol: str) -> Published | None:
    """The figure to set beside ``method``'s runs, or None: same benchmark, task count, task
    protocol and split; the method's own paper first, else the first listed."""
    words = set(split_protocol.lower().split("-"))
    protocol = task_protocol(classes_per_task)
    fitting = [e for e in entries
               if e.method == method and e.benchmark == canonical_benchmark(benchmark)
               and e.tasks == n_tasks and e.protocol == protocol
               and (e.split is None or e.split in words)]
    fitting.sort(key=lambda e: not e.own_paper)  # stable: file order within each kind
    return fitting[0] if fitting else None


def sources_note(entries: Sequence[Any]) -> str:
    """One clause per distinct paper used: citation, statistic, backbone."""
    seen: dict[str, Published] = {}
    for e in entries:
        if e is not None:
            seen.setdefault(e.citation, e)
    return "; ".join(f"{e.citation} ({e.statistic}, {e.backbone})" for e in seen.values())
