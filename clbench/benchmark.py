"""What a benchmark module provides, and how its data becomes an Avalanche class-incremental stream.

A benchmark loads (optionally downloads) a fixed train/test split and says how many classes it
has and which task counts divide them. The core turns it into an Avalanche ``CLScenario`` with one
experience per task: classes are permuted with the seed paper's convention
(``np.random.seed(seed); np.random.permutation(n_classes)``) and relabelled so task ``k`` holds
labels ``[k·c, (k+1)·c)``.
"""
from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clbench.errors import UsageError


@dataclass
class BenchmarkConfig:
    """Benchmarks without options use this empty config."""


@dataclass
class SplitData:
    """A benchmark's data. ``statistics`` is the training images under the *test* transform:
    what methods compute class statistics from (prototypes, Grams, Gaussians), as the official
    codes do. Left ``None``, it is derived from ``train`` with ``test``'s ``transform``
    (``evaluation_view``); a benchmark whose datasets have no ``transform`` attribute and augment
    in some other way must pass it."""

    train: object  # torch Dataset with a ``targets`` list of original class ids
    test: object
    identity: dict = field(default_factory=dict)  # protocol, n_train, n_test, hash
    statistics: object = None

    def __post_init__(self):
        if self.statistics is None:
            self.statistics = evaluation_view(self.train, self.test)


def evaluation_view(train, test):
    """``train`` with ``test``'s transform (a shallow copy: the images are shared), or ``train``
    itself when either has no ``transform`` (tensors in memory, no augmentation)."""
    transform = getattr(test, "transform", None)
    if transform is None or getattr(train, "transform", None) is None:
        return train
    view = copy.copy(train)
    view.transform = transform
    return view


def files_hash(names) -> str:
    """SHA-256 of the sorted relative file names: proves two runs read the same split."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(str(name).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def data_root(data_dir: str | os.PathLike | None) -> Path:
    """``--data-dir``, else ``$CLBENCH_DATA``, else the user cache folder."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("CLBENCH_DATA"):
        return Path(os.environ["CLBENCH_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "clbench"


class Benchmark:
    """Base class of every benchmark; subclasses register with ``@register_benchmark``."""

    registered_name = "?"
    Config = BenchmarkConfig
    n_classes: int = 0
    task_choices: tuple[int, ...] = ()
    default_tasks: int = 0
    default_backbone = "vit-b16-in21k-ft-in1k"
    default_seeds: tuple[int, ...] = (1993,)

    def __init__(self, config=None, data_dir=None, download: bool = False):
        self.config = config if config is not None else self.Config()
        self.root = data_root(data_dir)
        self.download = download

    @property
    def name(self) -> str:
        return self.registered_name

    def check_tasks(self, n_tasks: int) -> None:
        """Refuse, in one line, a task count the protocol cannot train: not a positive integer,
        a single task (not class-incremental), one class per task (the current-task cross-entropy
        over a single logit is identically 0, so no method would learn anything), or a split that
        is not one of ``task_choices``."""
        choices = ", ".join(str(t) for t in self.task_choices if self.n_classes // t > 1)
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
            raise UsageError(f"--tasks must be a positive integer, got {n_tasks!r}; valid choices "
                             f"for {self.name}: {choices}")
        if n_tasks == 1:
            raise UsageError(f"--tasks 1 puts all {self.n_classes} classes of {self.name} in one "
                             "task, which is not class-incremental (for the train-on-everything "
                             f"upper bound use --methods joint); valid choices: {choices}")
        if self.n_classes // n_tasks < 2:
            raise UsageError(f"{self.name} has {self.n_classes} classes: --tasks {n_tasks} leaves "
                             "a task with a single class, where the current-task cross-entropy is "
                             f"identically 0 and nothing trains; valid choices: {choices}")
        if n_tasks not in self.task_choices:
            raise UsageError(f"{self.name} has {self.n_classes} classes: --tasks {n_tasks} does not "
                             f"split them evenly; valid choices: {choices}")

    def class_order(self, seed: int) -> list[int]:
        np.random.seed(seed)
        return [int(c) for c in np.random.permutation(self.n_classes)]

    def load(self, image_size: int) -> SplitData:
        """Return the train/test datasets, transforms for inputs of ``image_size`` pixels."""
        raise NotImplementedError


def divisors_as_choices(n_classes: int, candidates) -> tuple[int, ...]:
    return tuple(t for t in candidates if n_classes % t == 0)
