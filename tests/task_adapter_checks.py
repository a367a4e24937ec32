"""What test_mos and test_tuna share: the classifier alignment of MOS and TUNA written from their
official codes (``classifer_align`` in sun-hailong/AAAI25-MOS and LAMDA-CL/ICCV2025-TUNA
``models/*.py``), a spy that records what each alignment call saw, and the checks both methods
must pass (no task label at test time, resume, bf16)."""
import copy

import pytest
import torch
from helpers import build, images_of, tensor_stream, tiny_vit
from torch.distributions import MultivariateNormal
from torch.nn import functional as F

from clbench.context import RunContext
from clbench.model import CLModel


def record_alignments(monkeypatch, module, strategy) -> list[dict]:
    """Every call of ``module.align_classifier``: the model's head before and after it, the
    random state it started from, and the Gaussians (means, covariances, tasks) it saw."""
    calls = []
    real = module.align_classifier

    def spy(head, gaussians, task, *args, **kwargs):
        call = dict(task=task, rng=torch.get_rng_state(), before=copy.deepcopy(strategy.model.head),
                    means=gaussians.means, covs=gaussians.covs,
                    class_task=list(gaussians.class_task))
        real(head, gaussians, task, *args, **kwargs)
        calls.append({**call, "after": copy.deepcopy(strategy.model.head)})

    monkeypatch.setattr(module, "align_classifier", spy)
    return calls


def official_classifier_align(head, params, means, covs, batch_size, ca_lr, epochs, weight_decay,
                              t_max, scale=1.0, mean_factors=None):
    """``classifer_align`` of both codes: SGD (the group's weight decay overrides 5e-4) under
    CosineAnnealingLR(T_max); per epoch batch_size × 5 draws per class (TUNA: from the mean times
    its decay factor, logits times ``scale``), one shuffle, one batch of that size per class."""
    optimizer = torch.optim.SGD([{"params": params, "lr": ca_lr, "weight_decay": weight_decay}],
                                lr=ca_lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer=optimizer, T_max=t_max)
    total, per_class, factors = len(means), batch_size * 5, mean_factors or [1.0] * len(means)
    for _ in range(epochs):
        sampled, labels = [], []
        for c in range(total):
            m = MultivariateNormal((means[c] * factors[c]).float(), covs[c].float())
            sampled.append(m.sample(sample_shape=(per_class,)))
            labels.extend([c] * per_class)
        order = torch.randperm(len(labels))
        inputs, targets = torch.cat(sampled).float()[order], torch.tensor(labels).long()[order]
        for it in range(total):
            batch = slice(it * per_class, (it + 1) * per_class)
            loss = F.cross_entropy(scale * head(inputs[batch])[:, :total], targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()


def train_recording(cls, module, tasks: int = 3, **config):
    """``tasks`` tasks of two classes: the stream, the strategy, each task's adapter parameters
    right after it, and the alignment calls (``module.align_classifier`` spied)."""
    stream = tensor_stream(n_classes=2 * tasks, n_tasks=tasks, train_per_class=5)
    strategy = build(cls, tiny_vit(), n_tasks=tasks, **config)
    snapshots = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        alignments = record_alignments(monkeypatch, module, strategy)
        for task in range(tasks):
            strategy.train(stream.train[task])
            snapshots.append([p.clone() for p in strategy.task_adapter_parameters(task)])
    return stream, strategy, snapshots, alignments


def check_prediction_ignores_task_labels(strategy, stream) -> None:
    """The same logits whatever task label the batch carries, and batch = one image at a time."""
    strategy.model.eval()
    x, y = images_of(stream.test[1].dataset)
    outputs = []
    with torch.no_grad():
        for tasks in (torch.zeros(len(y), dtype=torch.long), torch.full((len(y),), 2)):
            strategy.mbatch = [x, y, tasks]
            strategy.is_training = False
            outputs.append(strategy.forward())
        one_by_one = torch.cat([strategy.predict(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], one_by_one, rtol=1e-5, atol=1e-6)


def check_resume_continues_identically(cls, **config):
    """A strategy restored from a checkpoint after task 1 trains task 2 and predicts exactly as
    the original; returns both."""
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    first = build(cls, tiny_vit(), n_tasks=2, **config)
    first.train(stream.train[0])
    second = build(cls, tiny_vit(), n_tasks=2, **config)
    second.load_checkpoint(first.checkpoint())
    x = images_of(stream.test[0].dataset)[0]
    for strategy in (first, second):
        torch.manual_seed(5)  # the same adapter-dropout draws (the runner seeds every task)
        strategy.train(stream.train[1])
        strategy.model.eval()
    with torch.no_grad():
        assert torch.equal(first.predict(x), second.predict(x))
    return first, second


def check_bf16_run(cls, **config) -> None:
    """Two tasks under bf16 autocast: trains, aligns, predicts, every weight finite."""
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    vit = tiny_vit()
    context = RunContext.for_backbone(vit, n_tasks=2, precision="bf16")
    strategy = cls(model=CLModel(vit, vit.num_features), context=context, seed=0,
                   config=cls.Config(**config))
    for task in range(2):
        strategy.train(stream.train[task])
        correct, total = strategy.evaluate_counts(stream.test[:task + 1])
        assert sum(total) == 4 * (task + 1)
    assert all(torch.isfinite(p).all() for p in strategy.model.parameters())
