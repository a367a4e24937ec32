"""SD-LoRA cost figures, measured side by side in one process (medians of interleaved repeats).

* training step (forward + masked CE + backward + SGD step) after 20 tasks ÷ after 1 task
  (target ≤ 1.10): old components must cost one stacked product, not one per task;
* merged evaluation forward ÷ plain timm backbone forward (target ≤ 1.02);
* trainable parameters per task: LoRA pairs + magnitudes (rank 10: 368,640 + t; rank 6: 221,184 + t).

Usage: python scripts/perf_sdlora.py [--json out.json] [--device cpu|cuda] [--batch 8]
Default shapes: ViT-B/16 (random init), batch 8. The SD-LoRA states come from
``clbench.perf.sdlora_tools`` (shared with ``clbench perf``'s section 3).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from torch.nn import functional as F

from clbench.perf.sdlora_tools import Net, State, advance, lora_parameter_count
from clbench.perf.timing import timed


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
