"""`cifar100`: CIFAR-100, torchvision's standard 50,000 / 10,000 split, 100 classes, 10 tasks × 10.

Data: ``cifar-100-python.tar.gz`` from the CIFAR page with torchvision's pinned MD5 (the same URL
and value as ``torchvision.datasets.CIFAR100``), unpacked by clbench's safe extraction and read by
``torchvision.datasets.CIFAR100(download=False)``, which checks the MD5 of each pickle at every load.
Class ids are torchvision's fine-label ids. Class order: ``np.random.seed(1993); permutation(100)``
→ 68, 56, 78, 8, 23, 84, ...

Transforms: SD-LoRA's "cifar224" path — the 32×32 images go through the same transforms as the
ImageNet-R images, upsampled: train RandomResizedCrop(S, scale=(0.05, 1)) + horizontal flip, test
Resize(int(S·8/7), bicubic) + CenterCrop(S), ToTensor only (pixels in [0, 1], no normalisation);
S is the backbone's input size (224 for ViT-B/16, 16 for vit-tiny-letters). The images sit in
memory, so the loader is far faster than the JPEG benchmarks; ``--workers`` still parallelises the
resize.
"""
from __future__ import annotations

from clbench.benchmark import Benchmark, SplitData, divisors_as_choices
from clbench.datasets import split_identity, test_transform, train_transform
from clbench.downloads import (Remote, check_count, extract_fresh, fetch, missing_data, read_marker,
                               write_marker)
from clbench.errors import UsageError
from clbench.registry import register_benchmark

REMOTES = {
    "torchvision": Remote("cifar-100-python.tar.gz",
                          "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                          md5="eb9058c3a382ffc7106e4002c42a8d85",
                          checksum_source="torchvision.datasets.CIFAR100.tgz_md5"),
}


@register_benchmark("cifar100", "CIFAR-100, torchvision 50k/10k split, 10 tasks × 10, upsampled "
                                "to the backbone size; --download")
class CIFAR100(Benchmark):
    n_classes = 100
    task_choices = divisors_as_choices(100, range(2, 51))
    default_tasks = 10
    default_seeds = (1993,)
    expected_counts = {"train": 50_000, "test": 10_000}

    def load(self, image_size: int) -> SplitData:
        folder = self.root / "cifar100"
        data = folder / "data"
        if read_marker(folder, "torchvision") is None:
            if not self.download:
                raise missing_data(self.name, folder, self.root)
            extract_fresh(fetch(REMOTES["torchvision"], folder), data)
            train, test = self._datasets(data, None, None)
            for name, dataset in (("train", train), ("test", test)):
                check_count(f"cifar100 {name}", len(dataset), self.expected_counts[name], folder)
            if len(set(train.targets)) != self.n_classes:
                raise UsageError(f"cifar100: {len(set(train.targets))} classes in the training "
                                 f"set, expected {self.n_classes}; delete {folder} and rerun with "
                                 "--download")
            write_marker(folder, "torchvision", {"n_train": len(train), "n_test": len(test),
                                                 "archive": REMOTES["torchvision"].filename})
        train, test = self._datasets(data, train_transform(image_size), test_transform(image_size))
        identity = split_identity("cifar100-torchvision",
                                  ([f"{i:05d}" for i in range(len(train))], train.targets),
                                  ([f"{i:05d}" for i in range(len(test))], test.targets))
        identity["archive_md5"] = REMOTES["torchvision"].md5
        return SplitData(train, test, identity)

    @staticmethod
    def _datasets(data, train_tf, test_tf):
        from torchvision.datasets import CIFAR100 as TorchvisionCIFAR100

        try:
            return (TorchvisionCIFAR100(str(data), train=True, transform=train_tf, download=False),
                    TorchvisionCIFAR100(str(data), train=False, transform=test_tf, download=False))
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise UsageError(f"cifar100: {exc} (in {data}); delete {data.parent} and rerun with "
                             "--download") from None
