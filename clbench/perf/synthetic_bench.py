"""``imagenet-r-synthetic``: a benchmark over the tree ``clbench.perf.jpeg_tree`` writes, so the
end-to-end speed section can run a few ImageNet-R-sized tasks through the real ``clbench run``
path (load it with ``--plugin clbench.perf.synthetic_bench --data-dir <root>``).

It reads the tree with ImageNet-R's own loading code (``load_presplit``: ``ImageFiles``, the
official train/test transforms) and has as many classes as the tree, so ``--tasks k`` over
``k × 20`` classes gives k tasks of ImageNet-R's 10-task shape (2,400 train / 600 test images).
Its ``name`` is ``imagenet-r`` so every method takes its ImageNet-R hyperparameters (per-benchmark
defaults are keyed by name); the split identity's protocol says the data is synthetic.
"""
from __future__ import annotations

from clbench.benchmark import Benchmark
from clbench.errors import UsageError
from clbench.perf import jpeg_tree
from clbench.registry import register_benchmark


@register_benchmark("imagenet-r-synthetic", "clbench perf's synthetic ImageNet-R-shaped JPEG tree "
                                            "(any number of classes; ImageNet-R hyperparameters)")
class SyntheticImageNetR(Benchmark):
    default_tasks = 3
    default_seeds = (1995,)

    def __init__(self, config=None, data_dir=None, download: bool = False):
        super().__init__(config, data_dir, download)
        spec = jpeg_tree.existing(self.root)
        if spec is None:
            raise UsageError(f"imagenet-r-synthetic: no tree in {jpeg_tree.folder_of(self.root)}; "
                             "write one with `clbench perf --sections e2e --e2e-data DIR`")
        self.spec = spec
        self.n_classes = spec.classes
        self.task_choices = tuple(t for t in range(1, spec.classes + 1) if spec.classes % t == 0)

    @property
    def name(self) -> str:
        return "imagenet-r"

    def load(self, image_size: int):
        from clbench.presplit import load_presplit

        return load_presplit(jpeg_tree.split_root(self.root),
                             f"synthetic-imagenet-r-shaped-{self.n_classes}-classes", image_size)
