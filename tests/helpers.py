"""Small builders shared by the tests: a tiny timm ViT, tensor datasets and streams, a strategy,
and the pieces of a kill-and-resume test."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset

from clbench.benchmark import SplitData
from clbench.context import RunContext
from clbench.model import CLModel
from clbench.streams import build_stream

DIM = 24


def tiny_vit(img=16, dim=DIM, depth=2, heads=3):
    torch.manual_seed(0)
    return VisionTransformer(img_size=img, patch_size=4, embed_dim=dim, depth=depth,
                             num_heads=heads, num_classes=0).eval()


class Images(Dataset):
    def __init__(self, x, y):
        self.x, self.targets = x, y.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def tensor_stream(n_classes, n_tasks, train_per_class, img=16, seed=0, test_per_class=2):
    """Random images whose class shifts the mean, so a few steps learn something."""
    g = torch.Generator().manual_seed(seed)

    def make(per_class):
        y = torch.arange(n_classes).repeat_interleave(per_class)
        x = torch.rand(len(y), 3, img, img, generator=g) * 0.5 + (y.float() / n_classes).view(-1, 1, 1, 1)
        return Images(x, y)

    split = SplitData(make(train_per_class), make(test_per_class), {})
    return build_stream(split, list(range(n_classes)), n_tasks)


def build(cls, vit, plugins=(), n_tasks=5, classes_per_task=(), **config):
    """A strategy of class ``cls`` on ``vit`` with a run context for ``n_tasks`` tasks."""
    model = CLModel(vit, vit.num_features)
    context = RunContext.for_backbone(vit, n_tasks=n_tasks, classes_per_task=tuple(classes_per_task))
    return cls(model=model, config=cls.Config(**config), context=context, plugins=list(plugins), seed=0)


def images_of(dataset):
    """All of a dataset's images and labels as two tensors."""
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    return x, y


class Killed(Exception):
    """Stands for a crash in a kill-and-resume test."""


def kill_after_task(monkeypatch, task: int = 1) -> list[str]:
    """Every job dies once, right after the checkpoint of ``task`` (0-based) is on disk, as a
    crash there would; returns the job folders killed so far."""
    from clbench import runner

    real, killed = runner.save_checkpoint, []

    def save_then_die(path, checkpoint):
        real(path, checkpoint)
        job = str(Path(path).parent)
        if checkpoint["state"]["task"] == task and job not in killed:
            killed.append(job)
            raise Killed

    monkeypatch.setattr(runner, "save_checkpoint", save_then_die)
    return killed


def digits_results(run_dir, method: str, seed: int = 1993, tasks: int = 5) -> dict:
    path = Path(run_dir) / f"digits-{tasks}tasks" / method / f"seed-{seed}" / "results.json"
    return json.loads(path.read_text())
