"""Section 2, methods: for every registered method, the training step (forward + loss + backward +
optimiser step, timed per iteration by an Avalanche plugin, data loading excluded) and evaluation
time per image, both relative to the plain backbone in a bare loop (train: full forward + backward
+ SGD of the unmodified ViT; eval: one no-grad forward), and peak memory. Each method is measured
next to a fresh measurement of the plain backbone so load drift hits both sides of a ratio."""
from __future__ import annotations

import copy
import time

import torch

from clbench.perf.setup import Shapes, bare_step_fn, build_strategy, synthetic_stream
from avalanche.core import SupervisedPlugin

from clbench.perf.timing import PeakMemory, median, sync


class IterationTimer(SupervisedPlugin):
    """Wall time of every training / evaluation iteration (after the batch reached the device),
    by task, with the batch size."""

    def __init__(self, device):
        super().__init__()
        self.device = device
        self.train, self.eval = {}, {}
        self._start = 0.0

    def _begin(self, strategy, **kwargs):
        sync(self.device)
        self._start = time.perf_counter()

    def _end(self, record, strategy):
        sync(self.device)
        record.setdefault(strategy.task, []).append(
            (time.perf_counter() - self._start, len(strategy.mb_y)))

    before_training_iteration = before_eval_iteration = _begin

    def after_training_iteration(self, strategy, **kwargs):
        self._end(self.train, strategy)

    def after_eval_iteration(self, strategy, **kwargs):
        self._end(self.eval, strategy)


def measure_plain(backbone, mean, std, shapes: Shapes, device) -> dict:
    """The unmodified backbone + head in a bare loop: the reference for every method."""
    from clbench.model import CLModel

    size = backbone.patch_embed.img_size[0]
    generator = torch.Generator().manual_seed(0)
    # On the device already: the strategy's iteration timer also starts after the transfer.
    x = torch.rand(shapes.batch, 3, size, size, generator=generator).to(device)
    y = torch.randint(0, 2, (shapes.batch,), generator=generator).to(device)
    xe = torch.rand(shapes.eval_batch, 3, size, size, generator=generator).to(device)
    with PeakMemory(device) as memory:
        model = CLModel(copy.deepcopy(backbone), backbone.num_features, mean, std)
        model.head.grow(2)
        model.to(device).train()
        model.requires_grad_(True)
        step = bare_step_fn(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), device)
        train = []
        for k in range(shapes.steps + 1):
            sync(device)
            began = time.perf_counter()
            step(x, y)
            sync(device)
            train.append(time.perf_counter() - began)
        model.eval()
        evals = []
        with torch.no_grad():
            for k in range(shapes.eval_steps + 1):
                sync(device)
                began = time.perf_counter()
                model(xe).argmax(1)
                sync(device)
                evals.append((time.perf_counter() - began) / shapes.eval_batch)
    del model
    return {"train_step_s": median(train[1:]), "eval_s_per_image": median(evals[1:]),
            "peak_mib": memory.peak_mib}


def measure_method(name: str, backbone, mean, std, shapes: Shapes, device) -> dict:
    """``shapes.method_tasks`` tasks; the last task's training steps and the evaluation after it
    (over every seen task's test images) are timed."""
    timer = IterationTimer(device)
    size = backbone.patch_embed.img_size[0]
    last = shapes.method_tasks - 1
    stream = synthetic_stream(size, [shapes.batch * (shapes.steps + 1)] * shapes.method_tasks,
                              shapes.eval_batch * (shapes.eval_steps + 1))
    with PeakMemory(device) as memory:
        strategy = build_strategy(name, backbone, mean, std, shapes, device, [timer])
        for task in range(shapes.method_tasks):
            began = time.perf_counter()
            strategy.train(stream.train[task], statistics=stream.statistics[task])
            train_wall = time.perf_counter() - began
        strategy.evaluate_counts(stream.test[:shapes.method_tasks])
    train = [t for t, _ in timer.train.get(last, [])[1:]]  # none without gradient steps
    evals = [t / n for t, n in timer.eval[last][1:]]
    step, per_image = median(train), median(evals)
    record = {
        "tasks_trained": shapes.method_tasks,
        "train_step_s": step, "eval_s_per_image": per_image,
        "peak_mib": memory.peak_mib, "forward_passes_per_image": strategy.forward_passes_per_image,
        "trainable_params": strategy.trained_parameter_count,
        "task_wall_s": train_wall,  # the last task, with before_task/after_task work (subspaces)
    }
    del strategy
    return record


def measure_methods(backbone, mean, std, shapes: Shapes, device, log) -> tuple[dict, dict]:
    """Every registered method, each next to a fresh measurement of the plain backbone (order
    alternating) so load drifts on a shared machine hit both sides of a ratio alike."""
    from clbench.registry import METHODS

    results, plains = {}, []
    for k, name in enumerate(METHODS.names()):
        if k % 2 == 0:
            plains.append(measure_plain(backbone, mean, std, shapes, device))
        try:
            record = measure_method(name, backbone, mean, std, shapes, device)
        except Exception as exc:  # a method under construction must not stop the others
            text = str(exc).strip()
            reason = f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"
            results[name] = {"skipped": reason}
            log(f"  {name}: skipped ({reason})")
            continue
        finally:
            if k % 2 == 1:
                plains.append(measure_plain(backbone, mean, std, shapes, device))
        plain = plains[-1]
        record["plain_train_step_s"] = plain["train_step_s"]
        record["plain_eval_s_per_image"] = plain["eval_s_per_image"]
        record["train_step_vs_plain"] = record["train_step_s"] / plain["train_step_s"]
        record["eval_vs_plain"] = record["eval_s_per_image"] / plain["eval_s_per_image"]
        results[name] = record
    plain = {key: median([p[key] for p in plains]) for key in plains[0]} if plains else \
        measure_plain(backbone, mean, std, shapes, device)
    return plain, results


