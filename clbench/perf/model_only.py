"""Model-only images/s: the plain timm ViT with a linear head, all parameters trainable, SGD, on
random tensors already on the device, at a given precision — the ceiling the loop, the loader
and a method are compared with (the issue's "floor" figures)."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from clbench.perf.timing import median, precision, timed


def model_rates(backbone, precision_name: str, batch: int, device, steps: int = 10,
                eval_batch: int | None = None, n_classes: int = 20) -> dict:
    """Training and evaluation images/s (medians of ``steps`` timed steps after two warm-ups)."""
    eval_batch = eval_batch or batch
    size = backbone.patch_embed.img_size[0]
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=generator).to(device)
    y = torch.randint(0, n_classes, (batch,), generator=generator).to(device)
    xe = torch.rand(eval_batch, 3, size, size, generator=generator).to(device)
    torch.manual_seed(0)
    model = nn.Sequential(copy.deepcopy(backbone), nn.Linear(backbone.num_features, n_classes))
    model.to(device).train().requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        with precision(precision_name, device):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer():
        with precision(precision_name, device):
            model(xe).argmax(1)

    train = [timed(step, device) for _ in range(steps + 2)][2:]
    model.eval()
    evals = [timed(infer, device) for _ in range(steps + 2)][2:]
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"precision": precision_name, "batch": batch, "steps": steps,
            "train_images_per_s": batch / median(train),
            "eval_images_per_s": eval_batch / median(evals)}
