"""The base class every method subclasses: an Avalanche ``SupervisedTemplate`` over a
``clbench.model.CLModel`` (backbone + class-incremental head) with the current-task loss,
per-task optimisers and exact evaluation counts.

A method overrides only what differs (``methods/reference/finetune.py`` is the smallest example,
``methods/prototype/simplecil.py`` one that learns without gradients):

* ``prepare_model(model)``: model surgery once, before training (adapters, prompts, freezing);
* ``validate(config, context)`` (class method): checks that need the run, run before any job;
* ``before_task(task)`` / ``after_task(task)``: work at task boundaries (new LoRA component,
  subspace or class statistics); ``self.dataloader`` is the current task's training loader there;
* ``epochs_for_task(task)`` (0: no gradient steps), ``trainable_parameters()``,
  ``make_optimizer_for_task()``, ``make_scheduler_for_task()``;
* ``extra_loss()`` for terms beyond the masked cross-entropy; ``forward()`` if inference differs;
* ``clip_gradients()``: before every optimiser step, after the gradients are summed over ranks;
* ``extra_state()`` / ``restore_structure(state)`` so a checkpoint can rebuild grown structures;
* ``task_info()``: per-task facts recorded in results.json.

``self.context`` holds the run's facts (``clbench.context.RunContext``). The head grows each task
(old rows copied) and the training loss uses only the current task's logits, the protocol of
SD-LoRA, InfLoRA and CODA-Prompt; test-time prediction is the argmax over all seen classes, with
no task identity. The base class's own work happens at Avalanche's public plugin callbacks
(``CoreHooks``): bf16 autocast, gradient reduction over ranks, the method's gradient clipping,
the per-epoch schedule, the finiteness check; adapters are merged (``merge()``/``unmerge()``)
only while evaluating.
"""
from __future__ import annotations

import time
import warnings

import torch

warnings.filterwarnings("ignore", message="no QP solver found")  # only GEM-style strategies need one
warnings.filterwarnings("ignore", message="No loggers specified")  # clbench records results itself
warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # the empty head

from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402
from avalanche.training.templates import SupervisedTemplate  # noqa: E402
from avalanche.training.utils import trigger_plugins  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from clbench import distributed, evaluation, loaders, precision  # noqa: E402
from clbench.adapters import merged  # noqa: E402
from clbench.context import RunContext  # noqa: E402
from clbench.errors import Diverged  # noqa: E402
from clbench.hparams import TrainConfig  # noqa: E402
from clbench.model import CLModel  # noqa: E402


def _no_optimizer():
    """What the template holds while there is nothing to optimise (before the first task, or in
    a task learnt without gradient steps)."""
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)


class CLStrategy(SupervisedTemplate):
    """Base of all clbench methods. Subclasses set ``Config`` and override the hooks above."""

    registered_name = "?"
    Config = TrainConfig
    forward_passes_per_image = 1
    optimizer_name = "sgd"  # "sgd" (momentum 0.9) or "adam"; methods pick per their code
    # Structural needs, checked by ``plan.prepare()`` on a meta-device backbone before any job
    # trains: callables ``(backbone, config, context) -> problem | None`` (clbench.requirements).
    requires: tuple = ()
    variant_keys: tuple[str, ...] = ()  # config fields that select another per-benchmark recipe
    reference: str | None = None  # e.g. "upper-bound": reported, never ranked against methods

    # Per-benchmark hyperparameters from the paper/official code, declared as data (timm's
    # default_cfgs): benchmark name -> fields, and the recipe for a benchmark the table omits.
    recipes: dict = {}
    fallback_recipe: dict = {}

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        """The recipe for ``benchmark``; override when it also depends on ``n_tasks`` or on a
        variant key."""
        return dict(cls.recipes.get(benchmark, cls.fallback_recipe))

    @classmethod
    def validate(cls, config, context: RunContext) -> None:
        """Checks that need the run (backbone depth, number of tasks...); raise ``UsageError``.
        Called for every job before any job trains. Field-local checks go in the Config's
        ``__post_init__``."""

    def __init__(self, *, model: CLModel, config, context: RunContext | None = None, device="cpu",
                 plugins=None, evaluator=None, num_workers: int = 0, seed: int = 0):
        self.config = config
        self.context = context if context is not None else RunContext.for_backbone(model.backbone)
        self.seed = seed
        self.num_workers = num_workers
        self.task = -1
        self.known_classes = 0  # classes of tasks before the current one
        self.scheduler = None
        self._eval_loader = None
        self.statistics_experience = None  # this task's images under the test transform
        self._statistics_loader = None
        self.first_step_at = None
        self.trained_parameter_count = 0  # recorded when each task's optimiser is built
        # The pretrained weights as loaded (CPU copy): checkpoints store only what changed.
        # Keyed by the parameter object, which survives methods wrapping modules (renaming keys).
        self._pretrained = {id(p): p.detach().to("cpu", copy=True)
                            for p in model.backbone.parameters()}
        self.prepare_model(model)
        super().__init__(
            model=model, optimizer=_no_optimizer(), criterion=nn.CrossEntropyLoss(),
            train_mb_size=config.batch_size, train_epochs=config.epochs,
            eval_mb_size=config.eval_batch_size, device=device,
            plugins=[CoreHooks(), *(plugins or [])],
            evaluator=evaluator if evaluator is not None else EvaluationPlugin(loggers=[]))
        self.model.to(self.device)

    # ----------------------------------------------------------------- hooks for methods
    def prepare_model(self, model: CLModel) -> None:
        """Model surgery before the first task. Default: freeze the backbone."""
        model.backbone.requires_grad_(False)

    def before_task(self, task: int) -> None:
        """Called after the head has grown and the train loader exists, before the optimiser."""

    def after_task(self, task: int) -> None:
        """Called after the last epoch of a task, before evaluation."""

    def epochs_for_task(self, task: int) -> int:
        """Gradient epochs for this task; 0 means the task is learnt without gradient steps
        (statistics collected in ``after_task``, where ``self.dataloader`` is still this task's)."""
        return self.config.epochs

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def make_optimizer_for_task(self, params):
        lr, fused = self.config.lr, self.device.type == "cuda"  # one kernel per step on GPUs
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=fused)
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0, fused=fused)

    def make_scheduler_for_task(self, optimizer):
        """Per-epoch LR schedule, or ``None`` for a constant rate."""
        return None

    def extra_loss(self) -> torch.Tensor | float:
        return 0.0

    def task_info(self) -> dict:
        """Facts about the task just learnt, recorded in ``results.json`` (``method_info``).
        Called once after each evaluation; must not change state."""
        return {}

    def clip_gradients(self) -> None:
        """Clip the gradients in place before every optimiser step (called after they are summed
        over data-parallel ranks). Default: no clipping."""

    def extra_state(self) -> dict:
        """Everything besides the model's tensors needed to rebuild the model at resume."""
        return {"task": self.task, "known_classes": self.known_classes,
                "n_classes": self.model.head.n_classes}

    def restore_structure(self, state: dict) -> None:
        """Rebuild grown structures so ``load_state_dict`` finds every key."""
        self.model.head.resize(state["n_classes"])
        self.task = state["task"]
        self.known_classes = state["known_classes"]

    # ----------------------------------------------------------------- template overrides
    def train(self, experiences, eval_streams=None, statistics=None, **kwargs):
        """Avalanche's ``train``; an exception inside a forward pass leaves no autocast behind.

        ``statistics``: the task's experience of ``Stream.statistics`` (its training images under
        the test transform), which the runner always passes; without it, statistics passes read
        the training experience's own images, which is the same only for data without
        augmentation (in-memory tensors, as in most unit tests)."""
        self.statistics_experience = statistics
        self._statistics_loader = None
        self.first_step_at = None  # perf_counter() at this task's first training step, if any
        try:
            return super().train(experiences, eval_streams, **kwargs)
        finally:
            open_autocast = getattr(self, "_autocast", None)
            if open_autocast is not None:
                open_autocast.__exit__(None, None, None)
                self._autocast = None

    def model_adaptation(self, model=None):
        return self.model if model is None else model

    def check_model_and_optimizer(self, **kwargs):
        """Start of a task: grow the head, run the method's hook, fresh optimiser and schedule."""
        self.task += 1
        self.known_classes = self.model.head.n_classes
        n_new = len(self.experience.classes_in_this_experience)
        self.model.head.grow(n_new)
        self.model.to(self.device)
        self.before_task(self.task)
        self.train_epochs = self.epochs_for_task(self.task)
        params = self.trainable_parameters() if self.train_epochs > 0 else []
        if params:
            self.optimizer = self.make_optimizer_for_task(params)
            self.scheduler = self.make_scheduler_for_task(self.optimizer)
        else:  # a task learnt without gradient steps: nothing to optimise
            self.optimizer, self.scheduler = _no_optimizer(), None
            self.train_epochs = 0
        # What this task trains, counted now: by the time the runner records it, ``after_task``
        # may have folded or frozen it (a LoRA merged into the backbone would read as 0).
        self.trained_parameter_count = self.trainable_parameter_count()

    def make_train_dataloader(self, drop_last=False, **kwargs):
        """Shuffled by a sampler seeded from (seed, task, epoch), sharded over ranks, with every
        sample's augmentation seeded from the same: resumed and multi-process runs, and runs with
        any number of loader workers, see the same global batches as an uninterrupted single
        process."""
        sampler = distributed.ShardedBatchSampler(
            len(self.adapted_dataset), self.train_mb_size,
            seed=self.seed * 1000 + self.experience.current_experience, drop_last=drop_last,
            draw_seeds=True)
        self.dataloader = loaders.Rebatched(
            loaders.SeededDraws(self.adapted_dataset), sampler, self.num_workers,
            pin_memory=self.device.type == "cuda", continuous=True, chunk=None)

    def statistics_loader(self, transform: str = "test"):
        """This task's training images for class statistics (``clbench.class_stats``).

        ``"test"``: one sequential pass under the test transform through the evaluation loader
        (workers, chunks, the decoded cache's stored tensors; sharded over data-parallel ranks,
        which ``class_stats.collect`` reduces); built once per task, so several passes (EASE's
        subspaces) share its workers. ``"train"``: the training loader itself, with its
        augmentation draws (the ``stats_transform="train"`` ablation)."""
        if transform == "train":
            return self.dataloader
        if self._statistics_loader is None:
            experience = self.statistics_experience or self.experience
            # Its own generator: each pass's DataLoader draws a seed from it, not from the run's
            # random stream, which methods sample from after the statistics (InfLoRA-CA).
            self._statistics_loader = evaluation.UnionLoader(
                [experience], self.eval_mb_size, self.num_workers, self.device,
                generator=torch.Generator().manual_seed(self.seed)).upto(1)
        return self._statistics_loader

    def criterion(self):
        if not self.is_training:
            return F.cross_entropy(self.mb_output, self.mb_y)
        logits = self.mb_output[:, self.known_classes:]
        return F.cross_entropy(logits, self.mb_y - self.known_classes) + self.extra_loss()

    # ----------------------------------------------------------------- evaluation counts
    def precision_context(self):
        """Autocast for the forward passes (``bf16``); a no-op for ``fp32``/``tf32``."""
        return precision.autocast(self.context.precision, self.device)

    @torch.no_grad()
    def evaluate_counts(self, experiences) -> tuple[list[int], list[int]]:
        """Correct predictions and sample counts per experience (argmax over all seen classes).

        One pass over the union of the seen test sets through one long-lived loader; batches
        never mix experiences, so batch-dependent inference (L2P's batch vote) sees exactly the
        batches a per-experience loader would."""
        stream = experiences[0].origin_stream
        if self._eval_loader is None or self._eval_loader.stream is not stream:
            self._eval_loader = evaluation.UnionLoader(
                stream, self.eval_mb_size, self.num_workers, self.device)
        loader = self._eval_loader.upto(len(experiences))
        n_seen = self.model.head.n_classes
        correct = torch.zeros(len(experiences), dtype=torch.long, device=self.device)
        total = torch.zeros_like(correct)
        was_training = self.is_training
        self.is_training = False
        self.model.eval()
        with merged(self.model), self.precision_context():
            for self.mbatch in loader:
                self.mbatch = [t.to(self.device, non_blocking=True) for t in self.mbatch]
                trigger_plugins(self, "before_eval_iteration")  # per-batch plugin callbacks
                self.mb_output = self.forward()
                trigger_plugins(self, "after_eval_iteration")
                hits = (self.mb_output[:, :n_seen].argmax(dim=1) == self.mb_y).long()
                tasks = self.mbatch[2]
                correct.index_add_(0, tasks, hits)
                total.index_add_(0, tasks, torch.ones_like(hits))
        self.is_training = was_training
        counts = distributed.all_reduce_sum(torch.stack([correct, total])).cpu()
        return counts[0].tolist(), counts[1].tolist()

    @torch.no_grad()
    def count_gflops(self, experience) -> float:
        """Floating-point operations of the inference path for one test image (counted with
        ``FlopCounterMode``, adapters merged as in evaluation), in GFLOPs."""
        from torch.utils.flop_counter import FlopCounterMode

        x, y = experience.dataset.eval()[0][:2]
        self.mbatch = [x[None].to(self.device), torch.tensor([y], device=self.device),
                       torch.zeros(1, dtype=torch.long, device=self.device)]
        self.is_training = False
        self.model.eval()
        with merged(self.model), FlopCounterMode(display=False) as counter:
            self.forward()
        return counter.get_total_flops() / 1e9

    # ----------------------------------------------------------------- checkpoints
    def trainable_parameter_count(self) -> int:
        """Parameters trained in the current task (0 for a task without gradient steps). The
        results record it when the task's optimiser is built (``trained_parameter_count``);
        override it only to count part of a parameter (e.g. this task's slots of a prompt pool)."""
        return sum(p.numel() for p in self.trainable_parameters()) if self.train_epochs else 0

    def _pretrained_names(self, unchanged_only: bool) -> set[str]:
        """Names of the pretrained parameters (under their current keys), optionally only those
        still bit-identical to the loaded weights."""
        return {name for name, p in self.model.named_parameters(remove_duplicate=False)
                if id(p) in self._pretrained and not (
                    unchanged_only and not torch.equal(p.detach().cpu(), self._pretrained[id(p)]))}

    def checkpoint(self) -> dict:
        """Model tensors except pretrained weights that are still untouched (whatever the method
        trains, and whatever it changed in place, is saved), and the method's state."""
        skip = self._pretrained_names(unchanged_only=True)
        tensors = {k: v.detach().cpu() for k, v in self.model.state_dict().items() if k not in skip}
        return {"model": tensors, "state": self.extra_state()}

    def load_checkpoint(self, checkpoint: dict) -> None:
        self.restore_structure(checkpoint["state"])
        self.model.to(self.device)
        missing, unexpected = self.model.load_state_dict(checkpoint["model"], strict=False)
        pretrained = self._pretrained_names(unchanged_only=False)
        missing = [m for m in missing if m not in pretrained]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")

    def check_finite(self) -> None:
        """Raise ``Diverged`` if a loss of this task or a trainable weight is not finite."""
        finite = distributed.all_reduce_sum((~self._finite).to(torch.float32).reshape(1)) == 0
        if not bool(finite):  # any rank's non-finite loss stops every rank together
            raise Diverged(f"non-finite loss while training task {self.task + 1}")
        trained = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if trained and not bool(torch.stack([torch.isfinite(p).all() for _, p in trained]).all()):
            name = next(n for n, p in trained if not bool(torch.isfinite(p).all()))
            raise Diverged(f"non-finite weights after task {self.task + 1} (e.g. {name})")


class CoreHooks(SupervisedPlugin):
    """The base class's own work at Avalanche's public callbacks: bf16 autocast around the
    forward and loss, data-parallel gradient reduction, the method's ``clip_gradients`` before
    each optimiser step, the per-epoch schedule, a device-side finiteness flag (one host sync per
    epoch, not per step) and the method's ``after_task``."""

    def before_training_exp(self, strategy, **kwargs):
        strategy._finite = torch.ones((), dtype=torch.bool, device=strategy.device)

    def before_training_iteration(self, strategy, **kwargs):
        if strategy.first_step_at is None:  # the task's setup and its loader's first batch end here
            strategy.first_step_at = time.perf_counter()

    def before_forward(self, strategy, **kwargs):
        strategy._autocast = strategy.precision_context()
        strategy._autocast.__enter__()

    def before_backward(self, strategy, **kwargs):
        strategy._autocast.__exit__(None, None, None)
        strategy._autocast = None
        strategy._finite &= torch.isfinite(strategy.loss.detach()).all()

    def after_backward(self, strategy, **kwargs):
        distributed.reduce_gradients(strategy.trainable_parameters(), len(strategy.mb_y))

    def before_update(self, strategy, **kwargs):
        strategy.clip_gradients()

    def after_training_epoch(self, strategy, **kwargs):
        strategy.check_finite()
        if strategy.scheduler is not None:
            strategy.scheduler.step()

    def after_training_exp(self, strategy, **kwargs):
        strategy.after_task(strategy.task)
        strategy.check_finite()
