"""`digits`: the embedded default benchmark (no download), 5 tasks × 2 classes.

scikit-learn ships 1,797 real handwritten 8×8 digits (UCI, CC BY 4.0); see
``clbench/digits_data.py`` for the fixed stratified split and the 16×16 RGB upsampling. Inputs
other than 16 pixels are resized bilinearly, so any backbone runs on it. No augmentation: the
training transform is deterministic.
"""
from __future__ import annotations

import hashlib

import torch
from torch.utils.data import Dataset

from clbench.benchmark import Benchmark, SplitData
from clbench.registry import register_benchmark


class TensorImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


@register_benchmark("digits", "embedded default: scikit-learn handwritten digits, 16×16, "
                              "5 tasks × 2 classes, no download")
class Digits(Benchmark):
    n_classes = 10
    task_choices = (2, 5, 10)
    default_tasks = 5
    default_backbone = "vit-tiny-letters"
    default_seeds = (1993,)

    def load(self, image_size: int) -> SplitData:
        from clbench.digits_data import IMAGE_SIZE, load_digits_tensors

        x_train, y_train, x_test, y_test = load_digits_tensors()
        if image_size != IMAGE_SIZE:
            resize = lambda x: torch.nn.functional.interpolate(  # noqa: E731
                x, size=(image_size, image_size), mode="bilinear", align_corners=False)
            x_train, x_test = resize(x_train), resize(x_test)
        digest = hashlib.sha256()
        for tensor in (x_train, y_train, x_test, y_test):
            digest.update(tensor.numpy().tobytes())
        identity = {"protocol": "sklearn-digits-stratified-30pct-seed0", "n_train": len(y_train),
                    "n_test": len(y_test), "hash": digest.hexdigest()}
        return SplitData(TensorImages(x_train, y_train), TensorImages(x_test, y_test), identity)
