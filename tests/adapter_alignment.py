"""The classifier alignment of MOS and TUNA, written from their official codes
(``classifer_align`` in sun-hailong/AAAI25-MOS and LAMDA-CL/ICCV2025-TUNA ``models/*.py``), and
a spy that records what each alignment call saw, shared by test_mos and test_tuna."""
import copy

import torch
from torch.distributions import MultivariateNormal
from torch.nn import functional as F


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
