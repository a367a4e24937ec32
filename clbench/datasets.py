"""Images on disk as datasets: listing (torchvision ``ImageFolder`` order), the split identity,
``ImageFiles`` and the transforms.

Images are listed like torchvision's ``ImageFolder`` (sorted class folders → class ids, the
official codes' convention), decoded with PIL, and transformed as in SD-LoRA's
``utils/data.py::build_transform`` (see ``train_transform`` / ``test_transform``). Fetching and
verifying the data is ``clbench.downloads``.
"""
from __future__ import annotations

import os
from pathlib import Path

from clbench.benchmark import files_hash


def list_image_folder(folder: Path, class_to_idx: dict[str, int] | None = None):
    """``(relative files, class ids, class_to_idx)`` exactly as torchvision's ImageFolder orders
    them (sorted class folders, sorted files, its image extensions)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if class_to_idx is None:
        _, class_to_idx = find_classes(str(folder))
    samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    files = [os.path.relpath(path, folder).replace(os.sep, "/") for path, _ in samples]
    return files, [int(label) for _, label in samples], class_to_idx


def split_identity(protocol: str, train: tuple[list[str], list[int]],
                   test: tuple[list[str], list[int]]) -> dict:
    """Protocol name, sizes and a hash of every (split, relative file, label): two runs with the
    same hash read the same images with the same labels."""
    names = [f"{split}/{name}\t{label}" for split, (files, labels) in (("train", train), ("test", test))
             for name, label in zip(files, labels)]
    return {"protocol": protocol, "n_train": len(train[0]), "n_test": len(test[0]),
            "hash": files_hash(names)}


class ImageFiles:
    """A torch-style dataset of image files: ``(transform(RGB image), original class id)``."""

    def __init__(self, root: Path, files: list[str], targets: list[int], transform):
        self.root = Path(root)
        self.files = files
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.root / self.files[index]) as image:
            rgb = image.convert("RGB")
        return self.transform(rgb), self.targets[index]


# ---------------------------------------------------------------------------------- transforms

# Both end in PILToTensor: images travel from the loader workers to the model as uint8 (a
# quarter of ToTensor's float32 bytes through shared memory, pinning and the host-to-device
# copy); ``CLModel.normalize`` then gives exactly ToTensor's values (x/255, float32).

def train_transform(size: int):
    """SD-LoRA official: RandomResizedCrop(S, scale=(0.05, 1), ratio 3/4–4/3, bilinear), flip,
    ToTensor (its scaling to [0, 1] done by the model); no mean/std normalisation."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(size, scale=(0.05, 1.0)), T.RandomHorizontalFlip(),
                      T.PILToTensor()])


def test_transform(size: int):
    """SD-LoRA official: Resize(256, bicubic) + CenterCrop(224) at S=224, i.e. Resize(int(S·8/7))."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(int(size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.PILToTensor()])
