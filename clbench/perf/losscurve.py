"""Section ``losscurve``: the same short training at each precision — same initial weights, same
batches — so bf16 autocast can be compared with fp32 (TF32 off) on the loss curve itself.

Data: 10 classes, each a fixed random low-frequency pattern plus per-image noise, so the loss
falls within a few dozen steps; the plain ViT with a linear head, all parameters trainable, AdamW.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from clbench.perf.setup import make_backbone, shapes_for
from clbench.perf.timing import precision


def learnable_batches(size: int, batch: int, steps: int, classes: int = 10, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.rand(classes, 3, 4, 4, generator=generator), size=size,
                             mode="bilinear", align_corners=False)
    for _ in range(steps):
        y = torch.randint(0, classes, (batch,), generator=generator)
        x = (patterns[y] + 0.3 * torch.randn(batch, 3, size, size, generator=generator)).clamp(0, 1)
        yield x, y


def loss_curve(backbone, precision_name: str, batch: int, steps: int, device, lr: float) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(copy.deepcopy(backbone), nn.Linear(backbone.num_features, 10)).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for x, y in learnable_batches(backbone.patch_embed.img_size[0], batch, steps):
        x, y = x.to(device), y.to(device)
        with precision(precision_name, device):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return [float(v) for v in torch.stack(losses).cpu()]


def measure_losscurve(args, device, log) -> dict:
    shapes = shapes_for(args.shapes, True, 1)
    backbone, _, _ = make_backbone(shapes)
    batch, steps = args.losscurve_batch, args.losscurve_steps
    curves = {}
    for p in args.precisions_losscurve:
        log(f"perf losscurve [{p}] …")
        curves[p] = loss_curve(backbone, p, batch, steps, device, args.losscurve_lr)
    window = max(1, steps // 10)
    tail = {p: sum(c[-window:]) / window for p, c in curves.items()}
    head = {p: sum(c[:window]) / window for p, c in curves.items()}
    reference = "fp32" if "fp32" in curves else next(iter(curves))
    diff = {p: max(abs(a - b) for a, b in zip(c, curves[reference])) for p, c in curves.items()}
    return {"shapes": shapes.name, "batch": batch, "steps": steps, "lr": args.losscurve_lr,
            "optimizer": "AdamW", "window": window, "reference": reference, "curves": curves,
            "first_window_mean": head, "last_window_mean": tail,
            "max_abs_step_difference_vs_reference": diff}


def print_losscurve(r: dict, p=print) -> None:
    p(f"\nlosscurve. {r['steps']} AdamW steps of batch {r['batch']} ({r['shapes']} ViT, all "
      f"parameters), same init and batches; mean loss of the first / last {r['window']} steps")
    for name in r["curves"]:
        p(f"   {name}: {r['first_window_mean'][name]:.4f} → {r['last_window_mean'][name]:.4f}"
          f"   max |Δ| per step vs {r['reference']}: "
          f"{r['max_abs_step_difference_vs_reference'][name]:.4f}")
