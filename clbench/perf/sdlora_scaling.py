"""Section 3, SD-LoRA scaling: training step time while learning task 20 ÷ task 1 (target ≤ 1.10),
and the same for inference per image. Built on the adapter directly (``sdlora_tools``), or, when
the adapter cannot be imported, by training the registered ``sdlora`` strategy through the tasks."""
from __future__ import annotations

import copy

import torch
from torch.nn import functional as F

from clbench.perf.setup import Shapes, build_strategy, synthetic_stream
from clbench.perf.methods import IterationTimer
from clbench.perf.timing import median, timed

SDLORA_TARGET = 1.10


def measure_sdlora_scaling(backbone, mean, std, shapes: Shapes, device, n_tasks: int = 20,
                           via: str = "adapter") -> dict:
    from clbench.registry import METHODS

    if "sdlora" not in METHODS.names():
        return {"skipped": "no method named sdlora is registered"}
    if via == "adapter":
        try:
            from clbench.perf import sdlora_tools

            sdlora_tools.adapter_class()
        except ImportError:
            via = "strategy"
    if via == "adapter":
        return _scaling_with_adapter(sdlora_tools, backbone, shapes, device, n_tasks)
    return _scaling_through_strategy(backbone, mean, std, shapes, device, n_tasks)


def _scaling_with_adapter(tools, backbone, shapes: Shapes, device, n_tasks: int) -> dict:
    """The adapter state after task 1 and after task ``n_tasks`` built by ``advance`` (earlier
    pairs trained to random values), steps timed interleaved."""
    from clbench.registry import METHODS

    rank = METHODS.get("sdlora").Config().ranks[0]
    per_task = 2
    size = backbone.patch_embed.img_size[0]
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(shapes.batch, 3, size, size, generator=generator).to(device)
    y = torch.randint(0, per_task, (shapes.batch,), generator=generator).to(device)
    xe = torch.rand(shapes.eval_batch, 3, size, size, generator=generator).to(device)
    models, optimizers = {}, {}
    for label, tasks in (("first", 0), ("last", n_tasks - 1)):
        model = tools.Net(copy.deepcopy(backbone), per_task * (tasks + 1))
        model.backbone.requires_grad_(False)
        tools.advance(model, tasks, rank, per_task)
        models[label] = model.to(device).train()
        optimizers[label] = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                            lr=1e-4, momentum=0.9)

    def step(label):
        model = models[label]
        optimizers[label].zero_grad(set_to_none=True)
        F.cross_entropy(model(x)[:, model.known:], y).backward()
        optimizers[label].step()

    @torch.no_grad()
    def infer(label):
        models[label](xe)

    steps = {"first": [], "last": []}
    for k in range(shapes.steps + 1):
        for label in (("first", "last") if k % 2 == 0 else ("last", "first")):
            steps[label].append(timed(lambda: step(label), device))
    for model in models.values():
        model.eval()
    evals = {"first": [], "last": []}
    for k in range(shapes.eval_steps + 1):
        for label in (("first", "last") if k % 2 == 0 else ("last", "first")):
            evals[label].append(timed(lambda: infer(label), device) / shapes.eval_batch)
    first, last = median(steps["first"][1:]), median(steps["last"][1:])
    eval_first, eval_last = median(evals["first"][1:]), median(evals["last"][1:])
    return _scaling_record("SD-LoRA adapter states (perf.sdlora_tools.advance), interleaved steps", n_tasks,
                           first, last, eval_first, eval_last)


def _scaling_through_strategy(backbone, mean, std, shapes: Shapes, device, n_tasks: int) -> dict:
    """Train the registered SD-LoRA through ``n_tasks`` tasks (one step on the middle ones) and
    compare the first and last task's iterations."""
    size = backbone.patch_embed.img_size[0]
    timed = shapes.batch * (shapes.steps + 1)
    sizes = [timed] + [shapes.batch] * (n_tasks - 2) + [timed]
    stream = synthetic_stream(size, sizes, shapes.eval_batch * (shapes.eval_steps + 1))
    timer = IterationTimer(device)
    strategy = build_strategy("sdlora", backbone, mean, std, shapes, device, [timer])
    for task in range(n_tasks):
        strategy.train(stream.train[task])
        if task in (0, n_tasks - 1):
            strategy.evaluate_counts(stream.test[:1])  # the same images both times
    last = n_tasks - 1
    return _scaling_record(
        "SDLoRA strategy trained through the tasks", n_tasks,
        median([t for t, _ in timer.train[0][1:]]), median([t for t, _ in timer.train[last][1:]]),
        median([t / n for t, n in timer.eval[0][1:]]), median([t / n for t, n in timer.eval[last][1:]]))


def _scaling_record(source, n_tasks, first, last, eval_first, eval_last) -> dict:
    ratio = last / first
    return {"source": source, "tasks": n_tasks, "step_task1_s": first,
            f"step_task{n_tasks}_s": last, "step_ratio": ratio, "target": SDLORA_TARGET,
            "ok": ratio <= SDLORA_TARGET, "eval_task1_s_per_image": eval_first,
            f"eval_task{n_tasks}_s_per_image": eval_last, "eval_ratio": eval_last / eval_first}


