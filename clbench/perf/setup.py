"""What the timing sections measure on: model shapes, random-init backbones, in-memory streams,
methods built with their per-benchmark hyperparameters, and a bare PyTorch training step."""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F


@dataclass
class Shapes:
    name: str
    batch: int
    eval_batch: int
    steps: int       # timed training steps per method (plus one warm-up)
    eval_steps: int  # timed evaluation batches per method (plus one warm-up)
    config_bench: str  # whose per-benchmark hyperparameters the methods use (prompt sizes, ranks)
    config_tasks: int
    # Tasks each method trains before its last task's steps and its evaluation are timed: a
    # method with a pass per task (EASE, MOS, TUNA, CL-LoRA) or extra later-task work (KD,
    # projections) shows that cost only after several.
    method_tasks: int = 3


def shapes_for(name: str, quick: bool, repeats: int, cuda: bool = False) -> Shapes:
    if name == "tiny":  # a step is tens of ms on one CPU core: afford many
        return Shapes("tiny", batch=16 if quick else 32, eval_batch=32 if quick else 64,
                      steps=3 if quick else 4 * repeats, eval_steps=2 if quick else 4 * repeats,
                      config_bench="digits", config_tasks=5, method_tasks=2 if quick else 3)
    if cuda:  # the official batch size: a GPU step is milliseconds, so afford repeats
        return Shapes("vit-b16", batch=128, eval_batch=128, steps=repeats * 2, eval_steps=repeats * 2,
                      config_bench="imagenet-r", config_tasks=10)
    return Shapes("vit-b16", batch=8, eval_batch=8, steps=1 if quick else max(2, repeats // 2),
                  eval_steps=1 if quick else max(2, repeats // 2),
                  config_bench="imagenet-r", config_tasks=10, method_tasks=2)


VIT_B16 = "vit_base_patch16_224"


def make_backbone(shapes: Shapes, num_classes: int = 0):
    """Random-init ViT of the requested shapes; timing does not depend on the weights."""
    import timm

    from clbench.backbones import BACKBONES

    if shapes.name == "tiny":
        spec = BACKBONES["vit-tiny-letters"]
        model = timm.create_model(spec.tag, pretrained=False, num_classes=num_classes,
                                  **spec.model_kwargs)
        return model, spec.mean, spec.std
    return timm.create_model(VIT_B16, pretrained=False, num_classes=num_classes), None, None


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


def build_strategy(name: str, backbone, mean, std, shapes: Shapes, device, plugins,
                   classes_per_task: int = 2, **config_changes):
    """The method with its per-benchmark hyperparameters (for ``shapes.config_bench``), one epoch,
    the perf batch sizes, a run context like the runner's; a fresh copy of the backbone."""
    from clbench.context import RunContext
    from clbench.registry import METHODS
    from clbench.plan import RunPlan, method_config
    from clbench.model import CLModel

    cls = METHODS.get(name)
    plan = RunPlan(run_dir="", epochs=1, batch_size=shapes.batch)
    config = method_config(cls, shapes.config_bench, shapes.config_tasks, plan, [])
    config = replace(config, eval_batch_size=shapes.eval_batch, **config_changes)
    torch.manual_seed(0)
    model = CLModel(copy.deepcopy(backbone), backbone.num_features, mean, std)
    context = RunContext.for_backbone(backbone, benchmark=shapes.config_bench,
                                      n_tasks=shapes.config_tasks, device=str(device),
                                      classes_per_task=(classes_per_task,) * shapes.config_tasks)
    cls.validate(config, context)
    return cls(model=model, config=config, context=context, device=device, plugins=plugins, seed=0)


def bare_step_fn(model, optimizer, device):
    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step
