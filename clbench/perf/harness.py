"""Section 1, harness overhead: one ``finetune`` epoch on digits task 1 through ``CLStrategy.train``
(with the runner's progress plugin) vs a bare PyTorch loop over the same model, images, batch
size, optimiser and number of steps (target ≤ 1.05×), timed interleaved."""
from __future__ import annotations

import copy
import math
import time

import torch

from clbench.perf.setup import Shapes, bare_step_fn, build_strategy, digits_stream, materialize
from clbench.perf.timing import median, sync

HARNESS_TARGET = 1.05


def measure_harness(backbone, mean, std, device, repeats: int, quick: bool) -> dict:
    """finetune's ``train()`` on digits task 1 vs the same epoch in a bare loop."""
    from clbench.progress import ProgressPlugin
    from clbench.model import CLModel

    input_size = backbone.patch_embed.img_size[0]
    _, stream = digits_stream(input_size)
    experience = stream.train[0]
    x_all, y_all = materialize(experience.dataset)
    batch, lr = 32, 0.01
    steps = math.ceil(len(y_all) / batch)
    fresh = lambda: CLModel(copy.deepcopy(backbone), backbone.num_features, mean, std)  # noqa: E731

    digits = Shapes("digits", batch, 256, 0, 0, config_bench="digits", config_tasks=5)

    def harness_once():
        strategy = build_strategy("finetune", backbone, mean, std, digits, device,
                                  [ProgressPlugin()], lr=lr)
        sync(device)
        began = time.perf_counter()
        strategy.train(experience)
        sync(device)
        return time.perf_counter() - began

    def bare_once():
        torch.manual_seed(0)
        model = fresh()
        model.head.grow(len(experience.classes_in_this_experience))
        model.to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x_all, y_all), batch_size=batch, shuffle=True,
            generator=torch.Generator().manual_seed(0), pin_memory=device.type == "cuda")
        step = bare_step_fn(model, optimizer, device)
        sync(device)
        began = time.perf_counter()
        for x, y in loader:
            step(x, y)
        sync(device)
        return time.perf_counter() - began

    harness_once(), bare_once()  # warm-up (allocator, kernels, lazy imports)
    clbench_times, bare_times = [], []
    for r in range(max(2, repeats if not quick else 2)):
        pair = [(clbench_times, harness_once), (bare_times, bare_once)]
        for times, fn in (pair if r % 2 == 0 else pair[::-1]):
            times.append(fn())
    ratio = median(clbench_times) / median(bare_times)
    return {"images": len(y_all), "steps": steps, "batch_size": batch,
            "clbench_s": median(clbench_times), "bare_s": median(bare_times), "ratio": ratio,
            "target": HARNESS_TARGET, "ok": ratio <= HARNESS_TARGET,
            "clbench_runs_s": clbench_times, "bare_runs_s": bare_times}


