"""The embedded default data: scikit-learn's handwritten digits, as 16×16 RGB tensors.

``sklearn.datasets.load_digits`` ships 1,797 real 8×8 grayscale digits (UCI optical digits,
CC BY 4.0) inside the package, so the default benchmark needs no download. Images are scaled to
[0, 1], upsampled bilinearly to 16×16 and repeated over 3 channels; the train/test split is a
fixed stratified split (30 % test, ``random_state=0``) that does not depend on the run's seed,
so every seed sees the same data and only the class order changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
TEST_FRACTION = 0.3
SPLIT_SEED = 0


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)``; images are float32 (N, 3, 16, 16) in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                           align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=TEST_FRACTION,
        stratify=labels.numpy(), random_state=SPLIT_SEED)
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]
