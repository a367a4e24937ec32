"""``clbench perf``: what the harness and each method cost, measured side by side in one process.

Sections (all on the current device, medians of repeated timings, each pair interleaved so a
shared machine's load drifts over both sides alike):

1. harness overhead — one epoch of ``finetune`` on one digits experience through ``CLStrategy
   .train`` (with the runner's progress plugin) vs a bare PyTorch loop over the same model, images,
   batch size, optimiser and number of steps (target ≤ 1.05×);
2. methods — for every registered method: training step (forward + loss + backward + optimiser
   step, timed per iteration by an Avalanche plugin, data loading excluded) and evaluation time
   per image, both relative to the plain backbone in a bare loop (train: full forward+backward+SGD
   of the unmodified ViT; eval: one no-grad forward), and peak memory;
3. SD-LoRA scaling — training step time while learning task 20 ÷ task 1 (target ≤ 1.10), and the
   same for inference per image;
4. data loaders — images/s of the training loaders (digits; an ImageNet-R-shaped JPEG fixture read
   by the ImageNet-R loading code) vs the model's training images/s.

On CPU everything runs on one thread (see ``run_perf``). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` during the method's build + train + eval; on CPU the increase
of the process's resident set size over its value before the method, sampled every 5 ms with
psutil (allocator caches included; not comparable with the CUDA figure).
Every figure is also written to ``--json`` so commits can be compared.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from avalanche.core import SupervisedPlugin
from torch.nn import functional as F

from clbench.adapters import mergeable
from clbench.errors import UsageError

HARNESS_TARGET = 1.05
SDLORA_TARGET = 1.10


@dataclass
class Shapes:
    name: str
    batch: int
    eval_batch: int
    steps: int       # timed training steps per method (plus one warm-up)
    eval_steps: int  # timed evaluation batches per method (plus one warm-up)
    config_bench: str  # whose per-benchmark hyperparameters the methods use (prompt sizes, ranks)
    config_tasks: int


def shapes_for(name: str, quick: bool, repeats: int, cuda: bool = False) -> Shapes:
    if name == "tiny":  # a step is tens of ms on one CPU core: afford many
        return Shapes("tiny", batch=16 if quick else 32, eval_batch=32 if quick else 64,
                      steps=3 if quick else 4 * repeats, eval_steps=2 if quick else 4 * repeats,
                      config_bench="digits", config_tasks=5)
    if cuda:  # the official batch size: a GPU step is milliseconds, so afford repeats
        return Shapes("vit-b16", batch=128, eval_batch=128, steps=repeats * 2, eval_steps=repeats * 2,
                      config_bench="imagenet-r", config_tasks=10)
    return Shapes("vit-b16", batch=8, eval_batch=8, steps=1 if quick else max(2, repeats // 2),
                  eval_steps=1 if quick else max(2, repeats // 2),
                  config_bench="imagenet-r", config_tasks=10)


def make_backbone(shapes: Shapes):
    """Random-init ViT of the requested shapes; timing does not depend on the weights."""
    import timm

    from clbench.backbones import BACKBONES

    if shapes.name == "tiny":
        spec = BACKBONES["vit-tiny-letters"]
        model = timm.create_model(spec.tag, pretrained=False, num_classes=0, **spec.model_kwargs)
        return model, spec.mean, spec.std
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0), None, None


# ------------------------------------------------------------------------------ measuring tools
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values) -> float:
    return float(statistics.median(values)) if values else float("nan")


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


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled RSS increase on CPU."""

    def __init__(self, device):
        self.device = device
        self.peak_mib = None
        self.kind = ("cuda max_memory_allocated" if device.type == "cuda"
                     else "CPU peak RSS increase (psutil, 5 ms sampling)")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _trim_heap()
        try:
            import psutil
        except ImportError:
            import resource

            self.kind = "CPU ru_maxrss increase (only growth above the process's earlier peak)"
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self._thread = None
            return self
        process = psutil.Process()
        self._start = process.memory_info().rss
        self._max = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self._max = max(self._max, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is None:
            import resource

            self.peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._start) / 1024
        else:
            self._stop.set()
            self._thread.join()
            import psutil

            self._max = max(self._max, psutil.Process().memory_info().rss)
            self.peak_mib = (self._max - self._start) / 2**20
        return False


def _trim_heap() -> None:
    """Return freed heap pages to the OS so a CPU RSS baseline is not inflated by earlier runs."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------ data
class TensorImages(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.targets = images, [int(v) for v in labels]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


def synthetic_stream(input_size: int, train_per_task: list[int], test_per_task: int,
                     classes_per_task: int = 2, seed: int = 0):
    """Random images in [0, 1]; task t has ``train_per_task[t]`` training images."""
    from clbench.benchmark import SplitData
    from clbench.streams import build_stream

    generator = torch.Generator().manual_seed(seed)

    def images(counts):
        labels = torch.cat([torch.full((n // classes_per_task,), t * classes_per_task + c)
                            for t, n in enumerate(counts) for c in range(classes_per_task)])
        x = torch.rand(len(labels), 3, input_size, input_size, generator=generator)
        return TensorImages(x, labels)

    n_tasks = len(train_per_task)
    split = SplitData(images(train_per_task), images([test_per_task] * n_tasks), {})
    return build_stream(split, list(range(n_tasks * classes_per_task)), n_tasks)


def digits_stream(input_size: int, n_tasks: int = 5):
    from clbench.registry import BENCHMARKS
    from clbench.streams import build_stream

    bench = BENCHMARKS.get("digits")()
    split = bench.load(input_size)
    return split, build_stream(split, bench.class_order(1993), n_tasks)


def materialize(dataset):
    """The (x, y) tensors of an Avalanche experience's dataset, for a bare loop."""
    xs, ys = zip(*[(item[0], item[1]) for item in dataset])
    return torch.stack(xs), torch.tensor(ys)


# ------------------------------------------------------------------------------ strategies
def build_strategy(name: str, backbone, mean, std, shapes: Shapes, device, plugins, **config_changes):
    """The method with its per-benchmark hyperparameters (for ``shapes.config_bench``), one epoch,
    the perf batch sizes; a fresh copy of the backbone."""
    from clbench.registry import METHODS
    from clbench.runner import RunPlan, method_config
    from clbench.strategy import CLModel

    cls = METHODS.get(name)
    plan = RunPlan(run_dir="", epochs=1, batch_size=shapes.batch)
    config = method_config(cls, shapes.config_bench, shapes.config_tasks, plan, [])
    config = replace(config, eval_batch_size=shapes.eval_batch, **config_changes)
    torch.manual_seed(0)
    model = CLModel(copy.deepcopy(backbone), backbone.num_features, mean, std)
    return cls(model=model, config=config, device=device, plugins=plugins, seed=0)


def bare_step_fn(model, optimizer, device):
    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


# ------------------------------------------------------------------------------ 1. harness
def measure_harness(backbone, mean, std, device, repeats: int, quick: bool) -> dict:
    """finetune's ``train()`` on digits task 1 vs the same epoch in a bare loop."""
    from clbench.progress import ProgressPlugin
    from clbench.strategy import CLModel

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


# ------------------------------------------------------------------------------ 2. methods
def measure_plain(backbone, mean, std, shapes: Shapes, device) -> dict:
    """The unmodified backbone + head in a bare loop: the reference for every method."""
    from clbench.strategy import CLModel

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
    timer = IterationTimer(device)
    size = backbone.patch_embed.img_size[0]
    stream = synthetic_stream(size, [shapes.batch * (shapes.steps + 1)],
                              shapes.eval_batch * (shapes.eval_steps + 1))
    with PeakMemory(device) as memory:
        strategy = build_strategy(name, backbone, mean, std, shapes, device, [timer])
        began = time.perf_counter()
        strategy.train(stream.train[0])
        train_wall = time.perf_counter() - began
        strategy.evaluate_counts(stream.test[:1])
    train = [t for t, _ in timer.train[0][1:]]
    evals = [t / n for t, n in timer.eval[0][1:]]
    step, per_image = median(train), median(evals)
    record = {
        "train_step_s": step, "eval_s_per_image": per_image,
        "peak_mib": memory.peak_mib, "forward_passes_per_image": strategy.forward_passes_per_image,
        "trainable_params": strategy.trainable_parameter_count(),
        "task_wall_s": train_wall,  # includes before_task/after_task work (e.g. subspaces)
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


# ------------------------------------------------------------------------------ 3. SD-LoRA scaling
def sdlora_script():
    """``scripts/perf_sdlora.py`` of a source checkout (the SD-LoRA engineer's measurement
    helpers), or None when clbench runs from an installed copy without it."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "perf_sdlora.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("clbench_scripts_perf_sdlora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module if all(hasattr(module, n) for n in ("advance", "Net", "timed")) else None


def measure_sdlora_scaling(backbone, mean, std, shapes: Shapes, device, n_tasks: int = 20) -> dict:
    from clbench.registry import METHODS

    if "sdlora" not in METHODS.names():
        return {"skipped": "no method named sdlora is registered"}
    script = sdlora_script()
    if script is not None:
        return _scaling_with_script(script, backbone, shapes, device, n_tasks)
    return _scaling_through_strategy(backbone, mean, std, shapes, device, n_tasks)


def _scaling_with_script(script, backbone, shapes: Shapes, device, n_tasks: int) -> dict:
    """The adapter state after task 1 and after task ``n_tasks`` built by the script's
    ``advance`` (earlier pairs trained to random values), steps timed interleaved."""
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
        model = script.Net(copy.deepcopy(backbone), per_task * (tasks + 1))
        model.backbone.requires_grad_(False)
        script.advance(model, tasks, rank, per_task)
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
            steps[label].append(script.timed(lambda: step(label), device))
    for model in models.values():
        model.eval()
        for module in mergeable(model):  # inference runs merged, as in evaluation
            module.merge()
    evals = {"first": [], "last": []}
    for k in range(shapes.eval_steps + 1):
        for label in (("first", "last") if k % 2 == 0 else ("last", "first")):
            evals[label].append(script.timed(lambda: infer(label), device) / shapes.eval_batch)
    first, last = median(steps["first"][1:]), median(steps["last"][1:])
    eval_first, eval_last = median(evals["first"][1:]), median(evals["last"][1:])
    return _scaling_record("scripts/perf_sdlora.py advance() + Net, interleaved steps", n_tasks,
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


# ------------------------------------------------------------------------------ 4. loaders
def loader_rate(dataset, batch: int, workers: int, device, epochs: int = 1) -> float:
    """Images/s of a training DataLoader built as ``CLStrategy`` builds it (shuffled)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0))
    next(iter(loader))  # start-up (workers) is not throughput
    began, n = time.perf_counter(), 0
    for _ in range(epochs):
        for batch_data in loader:
            n += len(batch_data[0])
    return n / (time.perf_counter() - began)


def imagenet_r_fixture(folder: Path, classes: int = 4, per_class: int = 32, side: int = 400):
    """An ImageNet-R-shaped pre-split folder (``train/<wnid>/*.jpg``, ``test/...``) of JPEGs of
    about the originals' size, read by the ImageNet-R loading code (``load_presplit``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            target = folder / split / f"n0{c:07d}"
            target.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                coarse.resize((side, side), Image.BICUBIC).save(target / f"img_{i}.jpg", quality=85)
    return folder


def measure_loaders(shapes: Shapes, device, model_train_ips: float, workers: int, quick: bool,
                    log) -> dict:
    from clbench.streams import Relabeled

    results = {}
    split, stream = digits_stream(16)
    digits_ips = loader_rate(stream.train[0].dataset, shapes.batch, workers, device, epochs=3)
    results["digits"] = {"input_size": 16, "workers": workers, "loader_images_per_s": digits_ips,
                         "model_train_images_per_s": model_train_ips if shapes.name == "tiny" else None}
    try:
        from clbench.datasets import load_presplit
        from clbench.registry import BENCHMARKS

        BENCHMARKS.get("imagenet-r")
    except Exception as exc:  # the benchmark modules are optional here
        results["imagenet-r-fixture"] = {"skipped": f"ImageNet-R loading code unavailable ({exc})"}
        log(f"  imagenet-r fixture: skipped ({exc})")
        return results
    with tempfile.TemporaryDirectory(prefix="clbench-perf-") as tmp:
        root = imagenet_r_fixture(Path(tmp), per_class=8 if quick else 32)
        split = load_presplit(root, "perf-fixture", 224)
        dataset = Relabeled(split.train, list(range(4)))
        rates = {w: loader_rate(dataset, shapes.batch, w, device, epochs=1 if quick else 2)
                 for w in sorted({workers} if quick else {workers, 2})}
    results["imagenet-r-fixture"] = {
        "input_size": 224, "jpeg_side": 400, "images": len(dataset),
        "loader_images_per_s_by_workers": rates,
        "model_train_images_per_s": model_train_ips if shapes.name == "vit-b16" else None,
        "note": None if shapes.name == "vit-b16" else
        "compare with the ViT-B/16 training rate of `clbench perf --shapes vit-b16`"}
    return results


# ------------------------------------------------------------------------------ report
def environment(device) -> dict:
    from clbench.runner import environment as run_environment

    info = run_environment()
    info.update(device=str(device), threads=torch.get_num_threads(), platform=platform.platform(),
                load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _ms(seconds) -> str:
    return "—" if seconds is None or seconds != seconds else f"{seconds * 1e3:.2f}"


def print_report(figures: dict, out=sys.stdout) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    env = figures["environment"]
    p(f"clbench perf — device {env['device']}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, "
      f"{env['threads']} threads, shapes {figures['shapes']}, load avg {env.get('load_average')}")
    h = figures["harness"]
    p(f"\n1. harness overhead: finetune, one epoch of digits task 1 ({h['images']} images, "
      f"{h['steps']} steps of {h['batch_size']})")
    p(f"   clbench train() {h['clbench_s']:.3f} s   bare loop {h['bare_s']:.3f} s   "
      f"ratio {h['ratio']:.3f}× (target ≤ {h['target']}) {'OK' if h['ok'] else 'ABOVE TARGET'}")

    plain, methods = figures["plain_backbone"], figures["methods"]
    p(f"\n2. methods ({figures['shapes']}: batch {figures['batch']}, eval batch "
      f"{figures['eval_batch']}); × plain = ÷ the plain backbone in a bare loop, measured "
      "next to each method (the plain row is the median of those)")
    p(f"   memory: {figures['memory_kind']}")
    header = ("method", "train step ms", "× plain", "eval ms/img", "× plain", "fwd/img", "peak MiB")
    rows = [("plain backbone", _ms(plain["train_step_s"]), "1.00", f"{plain['eval_s_per_image'] * 1e3:.3f}",
             "1.00", "1", f"{plain['peak_mib']:.0f}")]
    skipped = []
    for name, m in methods.items():
        if "skipped" in m:
            skipped.append((name, m["skipped"]))
            continue
        rows.append((name, _ms(m["train_step_s"]), f"{m['train_step_vs_plain']:.2f}",
                     f"{m['eval_s_per_image'] * 1e3:.3f}", f"{m['eval_vs_plain']:.2f}",
                     str(m["forward_passes_per_image"]), f"{m['peak_mib']:.0f}"))
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    for row in [header, *rows]:
        p("   " + "  ".join(v.ljust(w) if k == 0 else v.rjust(w)
                            for k, (v, w) in enumerate(zip(row, widths))))
    for name, reason in skipped:
        p(f"   {name}: skipped — {reason}")

    s = figures["sdlora_scaling"]
    p(f"\n3. SD-LoRA step time after 20 tasks ÷ after 1 task ({s.get('source', '')})")
    if "skipped" in s:
        p(f"   skipped — {s['skipped']}")
    else:
        n = s["tasks"]
        p(f"   train step: task 1 {_ms(s['step_task1_s'])} ms, task {n} {_ms(s[f'step_task{n}_s'])} ms"
          f" → {s['step_ratio']:.3f}× (target ≤ {s['target']}) {'OK' if s['ok'] else 'ABOVE TARGET'}")
        p(f"   inference: task 1 {s['eval_task1_s_per_image'] * 1e3:.3f} ms/img, task {n} "
          f"{s[f'eval_task{n}_s_per_image'] * 1e3:.3f} ms/img → {s['eval_ratio']:.3f}×")

    p("\n4. data loaders vs model (training images/s)")
    for name, d in figures["loaders"].items():
        if "skipped" in d:
            p(f"   {name}: skipped — {d['skipped']}")
            continue
        model = d.get("model_train_images_per_s")
        if "loader_images_per_s" in d:
            rate = f"{d['loader_images_per_s']:.0f} img/s ({d['workers']} workers)"
            best = d["loader_images_per_s"]
        else:
            rate = ", ".join(f"{v:.0f} img/s ({w} workers)"
                             for w, v in d["loader_images_per_s_by_workers"].items())
            best = max(d["loader_images_per_s_by_workers"].values())
        verdict = ("" if model is None else
                   f"; model {model:.0f} img/s → loader {'is NOT' if best >= model else 'IS'} "
                   "the bottleneck")
        p(f"   {name} (input {d['input_size']}px): loader {rate}{verdict}")
        if d.get("note"):
            p(f"      ({d['note']})")


def run_perf(args) -> int:
    from clbench.runner import resolve_device

    if args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    device = resolve_device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # One thread: on a shared CPU, multi-threaded timings are dominated by OpenMP threads
        # waiting for each other (measured here: tiny ViT step median 600 ms with 2 threads vs
        # 79 ms with 1 at load 13 on 2 cores). Ratios, the figures that matter, are per core.
        torch.set_num_threads(1)
    try:
        return _measure_and_report(args, device)
    finally:
        torch.set_num_threads(threads)


def _measure_and_report(args, device) -> int:
    shapes = shapes_for(args.shapes, args.quick, args.repeats, cuda=device.type == "cuda")
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    backbone, mean, std = make_backbone(shapes)
    figures = {"shapes": shapes.name, "batch": shapes.batch, "eval_batch": shapes.eval_batch,
               "quick": args.quick, "environment": environment(device),
               "memory_kind": PeakMemory(device).kind}
    started = time.perf_counter()
    log("perf: harness overhead …")
    # The harness is measured on digits, hence on the tiny backbone whatever --shapes says.
    tiny = (backbone, mean, std) if shapes.name == "tiny" else make_backbone(shapes_for("tiny", True, 1))
    figures["harness"] = measure_harness(*tiny, device, args.repeats, args.quick)
    log("perf: plain backbone and methods …")
    figures["plain_backbone"], figures["methods"] = measure_methods(backbone, mean, std, shapes,
                                                                    device, log)
    log("perf: SD-LoRA over 20 tasks …")
    try:
        figures["sdlora_scaling"] = measure_sdlora_scaling(backbone, mean, std, shapes, device)
    except Exception as exc:
        figures["sdlora_scaling"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    log("perf: data loaders …")
    model_ips = shapes.batch / figures["plain_backbone"]["train_step_s"]
    figures["loaders"] = measure_loaders(shapes, device, model_ips, 0, args.quick, log)
    figures["seconds"] = time.perf_counter() - started
    print_report(figures)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    print(f"\nfigures: {args.json} ({figures['seconds']:.0f} s)")
    return 0
