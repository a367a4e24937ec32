"""The results schema: one dataclass written by the runner and read by the reporter and tests.

``results.json`` holds, for every "after task i, on task j", exact ``correct``/``total`` counts,
so every metric is recomputed exactly. ``status`` is ``running`` while tasks remain, ``complete``
after the last task and ``diverged`` when training produced a non-finite loss or weights (the
rows before the divergence stay; such a run is never ranked).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

STATUSES = ("running", "complete", "diverged")


@dataclass
class RunResult:
    method: str
    benchmark: str
    seed: int
    n_tasks: int
    class_order: list[int] = field(default_factory=list)
    classes_per_task: list[int] = field(default_factory=list)
    split: dict = field(default_factory=dict)
    backbone: str = ""
    precision: str = "fp32"
    correct: list[list[int]] = field(default_factory=list)   # row i: after task i, per seen task
    total: list[list[int]] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    trainable_params: list[int] = field(default_factory=list)  # while training each task
    forward_passes_per_image: int = 0
    gflops_per_image: float | None = None                     # counted on the inference path
    # {"train": s, "eval": s, "to_first_step": s (setup + the loader's first batch; tasks with steps)}
    seconds_per_task: list[dict] = field(default_factory=list)
    method_info: list[dict] = field(default_factory=list)     # the method's task_info() per task
    status: str = "running"
    message: str = ""                                         # why it diverged, if it did

    PER_TASK = ("correct", "total", "trainable_params", "seconds_per_task", "method_info")

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def tasks_done(self) -> int:
        return len(self.correct)

    def truncate(self, n_tasks: int) -> None:
        """Keep the rows of the first ``n_tasks`` tasks (resume after the last checkpoint)."""
        for key in self.PER_TASK:
            setattr(self, key, getattr(self, key)[:n_tasks])

    def check_consistent(self) -> str | None:
        """A description of what is wrong with the rows, or ``None``."""
        lengths = {key: len(getattr(self, key)) for key in self.PER_TASK}
        if len(set(lengths.values())) != 1:
            return f"per-task lists have different lengths {lengths}"
        for i, (c, t) in enumerate(zip(self.correct, self.total)):
            if len(c) != i + 1 or len(t) != i + 1:
                return f"row {i} has {len(c)} counts, expected {i + 1}"
            if any(a < 0 or a > b for a, b in zip(c, t)):
                return f"row {i} has correct counts outside 0..total"
        if self.tasks_done > self.n_tasks:
            return f"{self.tasks_done} rows for {self.n_tasks} tasks"
        if self.status == "complete" and self.tasks_done != self.n_tasks:
            return f"marked complete with {self.tasks_done} of {self.n_tasks} rows"
        if self.status not in STATUSES:
            return f"unknown status {self.status!r}"
        return None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["complete"] = self.complete  # kept for readers of older clbench versions
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunResult":
        """Also reads files written before ``status`` existed (``complete`` true/false)."""
        data = dict(data)
        complete = data.pop("complete", None)
        if "status" not in data:
            data["status"] = "complete" if complete else "running"
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def read(cls, path: Path) -> "RunResult":
        from clbench.results import read_json

        return cls.from_dict(read_json(path))

    def write(self, path: Path) -> None:
        from clbench.results import write_json

        write_json(path, self.to_dict())
