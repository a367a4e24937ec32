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
    """In-memory images, resized per item when the backbone wants another input size (a ViT-B/16
    would otherwise need 1 GB of 224-pixel copies up front)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int | None = None):
        self.images = images
        self.targets = labels.tolist()
        self.size = size

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = self.images[index]
        if self.size is not None:
            image = torch.nn.functional.interpolate(
                image[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        return image, self.targets[index]


@register_benchmark("digits", "embedded default: scikit-learn handwritten digits, 16×16, "
                              "5 tasks × 2 classes, no download")
class Digits(Benchmark):
    n_classes = 10
    task_choices = (2, 5)  # 10 tasks would be one class each: nothing trains (check_tasks)
    default_tasks = 5
    default_backbone = "vit-tiny-letters"
    default_seeds = (1993,)

    def load(self, image_size: int) -> SplitData:
        from clbench.digits_data import IMAGE_SIZE, load_digits_tensors

        x_train, y_train, x_test, y_test = load_digits_tensors()
        digest = hashlib.sha256()
        for tensor in (x_train, y_train, x_test, y_test):
            digest.update(tensor.numpy().tobytes())
        identity = {"protocol": "sklearn-digits-stratified-30pct-seed0", "n_train": len(y_train),
                    "n_test": len(y_test), "hash": digest.hexdigest()}
        size = None if image_size == IMAGE_SIZE else image_size
        return SplitData(TensorImages(x_train, y_train, size), TensorImages(x_test, y_test, size),
                         identity)
