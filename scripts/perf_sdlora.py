"""SD-LoRA cost figures, measured side by side in one process (medians of interleaved repeats).

* training step (forward + masked CE + backward + SGD step) after 20 tasks ÷ after 1 task
  (target ≤ 1.10): old components must cost one stacked product, not one per task;
* merged evaluation forward ÷ plain timm backbone forward (target ≤ 1.02);
* trainable parameters per task: LoRA pairs + magnitudes (rank 10: 368,640 + t; rank 6: 221,184 + t).

Usage: python scripts/perf_sdlora.py [--json out.json] [--device cpu|cuda] [--batch 8]
Needs only torch and timm (not Avalanche). Default shapes: ViT-B/16 (random init), batch 8.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from clbench.methods.sdlora.adapter import DecoupledLoRA


class Net(nn.Module):
    """Backbone + linear head, the shape of clbench's CLModel without its Avalanche imports."""

    def __init__(self, backbone, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, n_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def advance(model: Net, tasks: int, rank: int, classes_per_task: int) -> DecoupledLoRA:
    """SD-LoRA state at the start of task ``tasks`` (0-based): earlier pairs trained (random B)."""
    lora = DecoupledLoRA(model)
    generator = torch.Generator().manual_seed(0)
    for task in range(tasks + 1):
        lora.begin_task(task, rank, "factor_product", reset_magnitudes=True, init=0.8)
        if task < tasks:
            for s in lora.slices():
                s.B_cur.data.copy_(0.01 * torch.randn(s.B_cur.shape, generator=generator))
            lora.end_task(None, "factor_product")
    model.known = tasks * classes_per_task
    return lora


def lora_parameter_count(lora: DecoupledLoRA) -> int:
    pairs = sum(s.A_cur.numel() + s.B_cur.numel() for s in lora.slices())
    return pairs + lora.magnitudes.alpha.numel()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    began = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - began


class State:
    """An SD-LoRA state (per-block slices, magnitudes, head) that can be swapped into one backbone,
    so both measurements run on the same weights in the same memory (separate model copies
    differed by several percent on CPU for identical work)."""

    def __init__(self, model: Net, lora: DecoupledLoRA):
        self.slices = [adapter.slices for adapter in lora.adapters]
        self.magnitudes = lora.magnitudes
        self.head = model.head
        self.known = model.known
        self.lora = lora
        params = [p for s in lora.slices() for p in (s.A_cur, s.B_cur)]
        self.optimizer = torch.optim.SGD([*params, lora.magnitudes.alpha, *model.head.parameters()],
                                         lr=1e-4, momentum=0.9)

    def use(self, model: Net, adapters) -> None:
        for adapter, slices in zip(adapters, self.slices):
            adapter.slices = slices
            object.__setattr__(adapter, "magnitudes", self.magnitudes)
            adapter.unmerge()  # another state: a merged weight would be stale
        model.head = self.head
        model.known = self.known


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0).eval()
    size = backbone.patch_embed.img_size
    classes_per_task = 10
    x = torch.rand(args.batch, 3, *size, device=device)
    y = torch.randint(0, classes_per_task, (args.batch,), device=device)

    states = {}
    for label, tasks in (("first", 0), ("last", args.tasks - 1)):
        model = Net(copy.deepcopy(backbone), classes_per_task * (tasks + 1))
        model.backbone.requires_grad_(False)
        lora = advance(model, tasks, 10, classes_per_task)
        model.to(device)
        states[label] = State(model, lora)
        if label == "first":
            net, adapters = model, lora.adapters  # the one backbone every measurement runs on
    del backbone
    net.train()

    def step(label):
        states[label].use(net, adapters)
        opt = states[label].optimizer
        opt.zero_grad(set_to_none=True)
        logits = net(x)[:, net.known:]
        F.cross_entropy(logits, y).backward()
        opt.step()

    blocks = net.backbone.blocks

    @torch.no_grad()
    def eval_forward(kind):
        for block, adapter in zip(blocks, adapters):  # plain: the original timm qkv Linear
            block.attn.qkv = adapter if kind == "merged" else adapter.qkv
        net.backbone(x)

    def interleaved(fn, labels, repeats):
        times = {label: [] for label in labels}
        for label in labels * 2:  # warm-up
            fn(label)
        for r in range(repeats):  # ABBA order cancels drift
            for label in (labels if r % 2 == 0 else labels[::-1]):
                times[label].append(timed(lambda: fn(label), device))
        return times

    step_times = interleaved(step, ["first", "last"], args.repeats)
    net.eval()
    states["last"].use(net, adapters)
    for adapter in adapters:  # "merged": evaluation's merged state (one linear per qkv)
        adapter.merge()
    eval_times = interleaved(eval_forward, ["merged", "plain"], args.repeats * 2)
    eval_forward("merged")

    counts = {}
    for rank in (10, 8, 6):
        probe = Net(timm.create_model(args.model, pretrained=False, num_classes=0), classes_per_task)
        probe.backbone.requires_grad_(False)
        counts[rank] = lora_parameter_count(advance(probe, 0, rank, classes_per_task))
    counts_last = lora_parameter_count(states["last"].lora)

    med = {k: statistics.median(v) for k, v in {**step_times, **eval_times}.items()}
    figures = {
        "model": args.model, "batch": args.batch, "tasks": args.tasks, "repeats": args.repeats,
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "train_step_s_task1": med["first"], f"train_step_s_task{args.tasks}": med["last"],
        "train_step_ratio": med["last"] / med["first"],
        "eval_forward_s_merged": med["merged"], "eval_forward_s_plain": med["plain"],
        "eval_forward_ratio": med["merged"] / med["plain"],
        "trainable_lora_params_task1": {str(r): c for r, c in counts.items()},
        f"trainable_lora_params_task{args.tasks}_rank10": counts_last,
        "stored_directions_per_slice_last": len(next(iter(states["last"].lora.slices())).components()),
        "raw_seconds": {**step_times, **eval_times},
    }
    print(f"{args.model} batch {args.batch} on {device} ({torch.get_num_threads()} threads), "
          f"medians of {args.repeats} interleaved repeats")
    print(f"train step: task 1 {med['first'] * 1e3:.1f} ms, task {args.tasks} {med['last'] * 1e3:.1f} ms, "
          f"ratio {figures['train_step_ratio']:.3f} (target <= 1.10)")
    print(f"eval forward: merged {med['merged'] * 1e3:.1f} ms, plain timm {med['plain'] * 1e3:.1f} ms, "
          f"ratio {figures['eval_forward_ratio']:.3f} (target <= 1.02)")
    print("trainable LoRA params at task 1 (pairs + 1 magnitude): "
          + ", ".join(f"rank {r}: {c:,}" for r, c in counts.items())
          + f"; at task {args.tasks} (rank 10, {args.tasks} magnitudes): {counts_last:,}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
