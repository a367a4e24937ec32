"""VQ-Prompt (methods/prompt/vq_prompt.py) against the official jiaolifengmi/VQ-Prompt code,
rewritten here: the quantisation (nearest prompt, straight-through gradient, VQ terms) of
``models/zoo.py`` ``VQPrompt.forward``, the prefix composition, the per-iteration
``CosineSchedulerIter`` of ``utils/schedulers.py``, the head refinement of ``trainer.py``
(``_compute_mean`` + ``train_task_adaptive_prediction``), what trains, bf16, and digits end to
end with a kill/resume."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers import Killed, build, digits_results, kill_after_task, tiny_vit
from torch import nn
from torch.distributions import MultivariateNormal
from torch.nn import functional as F

from clbench import runner
from clbench.methods.prompt import prompted_tokens, query_features
from clbench.methods.prompt.vq_prompt import (ClassMoments, IterationCosine, VQPrompt, quantize,
                                              refine_head, vq_loss)
from clbench.plan import RunPlan

DIM = 24


def official_vq(x_querry, K, p, soft_t):
    """``VQPrompt.forward`` for one layer, in our words: returns (Ek, Ev, loss)."""
    n_K = nn.functional.normalize(K, dim=1)
    alpha = torch.softmax(torch.einsum("bd,kd->bk", x_querry, n_K) / soft_t, dim=1)
    p_a = torch.einsum("bk,kld->bld", alpha, p)
    dist = torch.pow(p_a.unsqueeze(1) - p, 2)
    _, idxmin = dist.sum(-1).sum(-1).min(1)
    quantized = p.index_select(0, idxmin.view(-1))
    loss = 0.4 * F.mse_loss(p_a, quantized.detach()) + 0.1 * F.mse_loss(quantized, p_a.detach())
    P_ = p_a + (quantized - p_a).detach()
    i = int(p.shape[1] / 2)
    return P_[:, :i, :], P_[:, i:, :], loss, idxmin


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_quantisation_and_straight_through_gradient_match_the_official_module(temperature):
    g = torch.Generator().manual_seed(0)
    query = 3 * torch.randn(7, DIM, generator=g)
    keys = torch.randn(6, DIM, generator=g).requires_grad_()
    prompts = torch.randn(6, 8, DIM, generator=g).requires_grad_()
    weight = torch.randn(8, DIM, generator=g)  # a downstream use of the prompt
    prompt, soft, nearest, index = quantize(query, keys, prompts, temperature)
    loss = (prompt * weight).sum() + vq_loss(soft, nearest, 0.4, 0.1)
    grads = torch.autograd.grad(loss, (keys, prompts))
    ek, ev, ref_vq, ref_index = official_vq(query, keys, prompts, temperature)
    ref_prompt = torch.cat([ek, ev], 1)
    ref_grads = torch.autograd.grad((ref_prompt * weight).sum() + ref_vq, (keys, prompts))
    assert torch.equal(index, ref_index) and len(set(index.tolist())) > 1
    brute = torch.stack([((soft[b] - prompts) ** 2).sum((1, 2)).argmin() for b in range(7)])
    assert torch.equal(index, brute)
    torch.testing.assert_close(prompt, prompts[index].detach())  # forward: the nearest prompt
    torch.testing.assert_close(prompt, ref_prompt)
    torch.testing.assert_close(vq_loss(soft, nearest, 0.4, 0.1), ref_vq)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours, ref)
    assert grads[0].abs().sum() > 0  # the keys learn through the straight-through estimator


def make(**config):
    vit = tiny_vit(dim=DIM, depth=5, heads=3)
    s = build(VQPrompt, vit, n_tasks=3, **{"batch_size": 4, **config})
    torch.manual_seed(1)
    with torch.no_grad():
        for param in s.model.prompt.parameters():
            param.normal_()  # random weights, not the [0, 1) init, so matching is informative
    s.model.head.grow(4)
    return s


def test_prompt_composition_is_prefix_tuning_in_blocks_0_to_4():
    s = make()
    x = torch.rand(3, 3, 16, 16)
    s.is_training, s.task = False, 1
    s.mbatch = [x, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)]
    with torch.no_grad():
        out = s.forward()
        vit = s.model.backbone
        q = query_features(vit, x)
        prefixes = {}
        for layer in range(5):
            ek, ev, _, _ = official_vq(q, s.model.prompt.keys[layer], s.model.prompt.prompts[layer], 1.0)
            prefixes[layer] = (ek, ev)
        expected = s.model.head(prompted_tokens(vit, x, prefixes=prefixes)[:, 0])
    assert s.prompt_blocks == [0, 1, 2, 3, 4]
    torch.testing.assert_close(out, expected)


def test_the_whole_pool_trains_every_task_and_old_head_rows_stay():
    """Official: no per-task slots and no freezing (unlike CODA-Prompt): every prompt and key
    gets a gradient at task 2; the old classes' head rows get none and stay."""
    s = make()
    s.task, s.known_classes, s.is_training = 1, 2, True
    s.mbatch = [torch.rand(4, 3, 16, 16), torch.tensor([2, 3, 3, 2]), torch.ones(4, dtype=torch.long)]
    optimizer = s.make_optimizer_for_task(s.trainable_parameters())
    old_rows = s.model.head.fc.weight[:2].detach().clone()
    s.mb_output = s.forward()
    loss = s.criterion()
    optimizer.zero_grad()
    loss.backward()
    pool = s.model.prompt
    assert (pool.keys.grad.abs().sum(-1) > 0).all()
    assert (pool.prompts.grad.abs().sum((-1, -2)) > 0).all()
    optimizer.step()
    assert torch.equal(s.model.head.fc.weight[:2], old_rows)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0025 * 5, 0.0025]
    assert isinstance(optimizer, torch.optim.AdamW)


def test_class_statistics_are_of_the_prompted_features():
    """Official ``_compute_mean``: ``model(x, return_pre_logits=True)``, the CLS of the prompted
    pass (not the query), over the statistics loader's images of the task's new classes."""
    s = make()
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([2, 3, 2, 3, 2, 3])
    s.task, s.known_classes = 1, 2
    s.statistics_loader = lambda transform: [(x, y)]
    s.moments.add(torch.zeros(2, DIM), torch.tensor([0, 1]), range(0, 2))
    with torch.no_grad():
        vit = s.model.backbone
        q = query_features(vit, x)
        prefixes = {}
        for layer in range(5):
            ek, ev, _, _ = official_vq(q, s.model.prompt.keys[layer], s.model.prompt.prompts[layer], 1.0)
            prefixes[layer] = (ek, ev)
        cls = prompted_tokens(vit, x, prefixes=prefixes)[:, 0].double()
    s.config.ca_epochs = 0
    s.after_task(1)
    for c in (2, 3):
        mean, var = s.moments.mean_and_variance(c)
        torch.testing.assert_close(mean, cls[y == c].mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, cls[y == c].var(0, unbiased=False), rtol=1e-4, atol=1e-6)


def official_iter_schedule(base, final, iter_step, n_epochs, warmup_epochs, freeze_iters):
    """``CosineSchedulerIter``'s table for one group, in our words (numpy, as the official)."""
    total = iter_step * n_epochs
    warmup_iters = warmup_epochs * iter_step
    freeze = np.zeros(freeze_iters) + 1e-6
    warmup = np.linspace(0, base, warmup_iters)
    iters = np.arange(total - warmup_iters - freeze_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((freeze, warmup, cosine))


@pytest.mark.parametrize("warmup_epochs,freeze_iters", [(0, 5), (1, 0), (1, 3)])
def test_per_iteration_cosine_matches_the_official_scheduler(warmup_epochs, freeze_iters):
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr": 0.0125},
                                   {"params": [params[1]], "lr": 0.0025}])
    schedule = IterationCosine(optimizer, [0.0125, 0.0025], [1e-6, 1e-6], total=4 * 6,
                               freeze=freeze_iters, warmup=warmup_epochs * 4)
    tables = [official_iter_schedule(b, 1e-6, 4, 6, warmup_epochs, freeze_iters)
              for b in (0.0125, 0.0025)]
    for step in range(4 * 6 + 3):
        schedule.apply()
        for group, table in zip(optimizer.param_groups, tables):
            expected = table[step] if step < len(table) else 1e-6
            assert group["lr"] == pytest.approx(float(expected), rel=1e-9, abs=1e-15)


def test_the_strategy_schedule_is_the_official_coswm_of_its_config():
    """``init_optimizer``'s ``coswm``: base values [lr·5, lr], finals [1e-6, 1e-6], ``iter_step``
    iterations per epoch, ``schedule[0]`` = one epoch of iterations frozen at 1e-6."""
    s = make(epochs=6, iter_step=4, freeze_epochs=1.0)
    optimizer = s.make_optimizer_for_task(s.trainable_parameters())
    schedule = s.make_scheduler_for_task(optimizer)
    tables = [official_iter_schedule(b, 1e-6, 4, 6, 0, 4) for b in (0.0025 * 5, 0.0025)]
    for step in range(4 * 6):
        schedule.apply()
        for group, table in zip(optimizer.param_groups, tables):
            assert group["lr"] == pytest.approx(float(table[step]), rel=1e-9, abs=1e-15)


def test_new_head_rows_start_as_a_default_linear():
    """The official ``last`` is a default ``nn.Linear``: weights and biases uniform in
    ±1/sqrt(D) (the growing head's own init is kaiming-uniform with zero bias)."""
    s = make()
    s.model.head.grow(60)
    s.task, s.known_classes = 1, 4
    s.before_task(1)
    fc, bound = s.model.head.fc, 1 / math.sqrt(DIM)
    assert fc.weight[4:].abs().max() <= bound and fc.bias[4:].abs().max() <= bound
    assert fc.weight[4:].abs().max() > 0.9 * bound and (fc.bias[4:] != 0).all()


def official_refinement(fc, means, variances, classes_per_task, task_id, ratio_samples, epochs,
                        ca_lr, weight_decay):
    """``train_task_adaptive_prediction`` in our words: AdamW at ca_lr/10 under the iteration
    cosine to 1e-6 over crct_num·epochs iterations, crct_num = the old classes; per epoch
    samples of every class (variance not all zero), a CPU permutation, crct_num batches."""
    optimizer = torch.optim.AdamW(fc.parameters(), lr=ca_lr / 10, weight_decay=weight_decay)
    crct_num = sum(classes_per_task[:task_id])
    table = official_iter_schedule(ca_lr / 10, 1e-6, crct_num, epochs, 0, 0)
    step = 0
    valid = sum(classes_per_task[:task_id + 1])
    for _ in range(epochs):
        data, labels = [], []
        for c in range(valid):
            if variances[c].mean() == 0:
                continue
            cov = torch.diag(variances[c]) + 1e-4 * torch.eye(len(variances[c]), dtype=torch.float64)
            data.append(MultivariateNormal(means[c].float(), cov.float()).sample((ratio_samples,)))
            labels += [c] * ratio_samples
        x, y = torch.cat(data).float(), torch.tensor(labels)
        order = torch.randperm(x.size(0))
        x, y = x[order], y[order]
        for i in range(crct_num):
            for group in optimizer.param_groups:
                group["lr"] = float(table[step]) if step < len(table) else 1e-6
            logits = fc(x[i * ratio_samples:(i + 1) * ratio_samples])[:, :valid]
            loss = F.cross_entropy(logits, y[i * ratio_samples:(i + 1) * ratio_samples])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1


def test_class_moments_and_head_refinement_match_the_official_trainer():
    g = torch.Generator().manual_seed(0)
    moments = ClassMoments(DIM)
    features = torch.randn(40, DIM, generator=g) + torch.arange(4).repeat_interleave(10)[:, None]
    labels = torch.arange(4).repeat_interleave(10)
    features[labels == 3] = features[labels == 3][:1]  # one class without variance: skipped
    moments.add(features[:20], labels[:20], range(0, 2))
    moments.add(features[20:], labels[20:], range(2, 4))
    for c in range(4):
        mean, var = moments.mean_and_variance(c)
        x = features[labels == c].double().numpy()
        np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(var.numpy(), np.var(x, axis=0), rtol=1e-8, atol=1e-10)
    head = nn.Linear(DIM, 4)
    reference = copy.deepcopy(head)
    torch.manual_seed(5)
    refine_head(head, moments, n_classes=4, n_old=2, per_class=16, epochs=3, lr=1e-2,
                weight_decay=5e-4, final_lr=1e-6, ridge=1e-4, device="cpu")
    stats = [moments.mean_and_variance(c) for c in range(4)]
    torch.manual_seed(5)
    official_refinement(reference, [m for m, _ in stats], [v for _, v in stats], [2, 2], 1, 16, 3,
                        1e-2, 5e-4)
    torch.testing.assert_close(head.weight, reference.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.bias, reference.bias, rtol=1e-5, atol=1e-6)
    assert VQPrompt.Config().stats_transform == "train"  # the official augmented pass


def test_training_step_runs_under_bf16_autocast():
    s = make()
    s.task, s.known_classes, s.is_training = 0, 0, True
    s.mbatch = [torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 1, 0]), torch.zeros(4, dtype=torch.long)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s.mb_output = s.forward()
        loss = s.criterion()
    loss.backward()
    assert torch.isfinite(loss) and s.extra_loss().dtype == torch.float32
    assert torch.isfinite(s.model.prompt.prompts.grad).all() and s.model.prompt.keys.grad.abs().sum() > 0


# ----------------------------------------------------------------- end to end on digits
@pytest.mark.slow
def test_digits_forgets_less_than_finetune_and_resumes_identically(tmp_path, monkeypatch):
    plan = lambda name, methods: RunPlan(run_dir=str(tmp_path / name), methods=methods,  # noqa: E731
                                         epochs=1)
    runner.run(plan("full", ["vq-prompt", "finetune"]), log=lambda *_: None)
    vq, finetune = digits_results(tmp_path / "full", "vq-prompt"), digits_results(tmp_path / "full", "finetune")
    assert vq["metrics"]["forgetting"] < finetune["metrics"]["forgetting"]
    assert vq["metrics"]["final_acc"] > finetune["metrics"]["final_acc"]
    assert vq["forward_passes_per_image"] == 2
    assert [i["refined_classes"] for i in vq["method_info"]] == [0, 4, 6, 8, 10]
    kill_after_task(monkeypatch)
    with pytest.raises(Killed):
        runner.run(plan("resumed", ["vq-prompt"]), log=lambda *_: None)
    runner.run(plan("resumed", ["vq-prompt"]), log=lambda *_: None)
    resumed = digits_results(tmp_path / "resumed", "vq-prompt")
    assert resumed["complete"] and resumed["correct"] == vq["correct"]
    assert resumed["method_info"] == vq["method_info"]
    assert math.isfinite(resumed["metrics"]["final_acc"])
