"""TUNA against references written from the official code (LAMDA-CL/ICCV2025-TUNA
``models/tuna.py``, ``backbone/vit_tuna.py``, ``exps/``): the CosFace loss, the orthogonality
term, the optimiser, EMR merging of the universal adapter, entropy selection and the combined
logits, the classifier alignment and its mean decay, the recipes; old adapters frozen, statistics
equal to a direct computation, no task label at test time; resume, bf16 and (slow) two gloo
processes against one (MOS and TUNA)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from clbench.methods.prototype import tuna
from clbench.methods.prototype.tuna import TUNA, TUNAGaussians, emr_unified, entropy_selected
from task_adapter_checks import (check_bf16_run, check_prediction_ignores_task_labels,
                                 check_resume_continues_identically, official_classifier_align,
                                 train_recording)
from helpers import images_of

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(epochs=2, lr=0.05, batch_size=4, ffn_num=4, ca_epochs=2, ca_samples=20, reg=0.5)


def train(tasks=3, **config):
    return train_recording(TUNA, tuna, tasks, **{**SMALL, **config})


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return train()


# ----------------------------------------------------------------- references (official math)
def official_cosface(wf, labels, s, m):
    """``AngularPenaltySMLoss(loss_type='cosface')``."""
    numerator = s * (torch.diagonal(wf.transpose(0, 1)[labels]) - m)
    excl = torch.cat([torch.cat((wf[i, :y], wf[i, y + 1:])).unsqueeze(0)
                      for i, y in enumerate(labels)], dim=0)
    denominator = torch.exp(numerator) + torch.sum(torch.exp(s * excl), dim=1)
    return -torch.mean(numerator - torch.log(denominator))


def official_orth_loss(cur_ups, prev_ups_per_task):
    final = 0
    for prev_ups in prev_ups_per_task:
        loss = 0
        for cur, prev in zip(cur_ups, prev_ups):
            dot = torch.mean(torch.matmul(F.normalize(cur, p=2, dim=1),
                                          F.normalize(prev, p=2, dim=1).transpose(1, 0)))
            loss += torch.abs(dot) / len(cur_ups)
        final += loss
    return final


def official_emr(task_vectors):
    """``emr_merge``'s unified vector (dicts of tensors)."""
    unified = {}
    for n in task_vectors[0]:
        mean = torch.stack([tv[n] for tv in task_vectors]).mean(0)
        flag = (mean > 0) * 2 - 1
        param_max = torch.zeros_like(task_vectors[0][n])
        for tv in task_vectors:
            mask = (tv[n] * flag) > 0
            param_abs = torch.abs(mask * tv[n])
            param_max = torch.where(param_abs > param_max, param_abs, param_max)
        unified[n] = param_max * flag
    return unified


def official_eval(all_logits, universal_logits):
    """``_eval_cnn`` for a task > 0: lowest-entropy adapter, both softmaxes added."""
    probs = F.softmax(all_logits, dim=2)
    entropy = -torch.sum(probs * torch.log(probs + 1e-10), dim=2)
    pick = torch.argmin(entropy, axis=0)
    chosen = all_logits[pick, torch.arange(len(pick))]
    return F.softmax(universal_logits, dim=1) + F.softmax(chosen, dim=1), pick


# ----------------------------------------------------------------- parity
@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_loss_is_the_official_cosface(trained, margin):
    _, strategy, _, _ = trained
    g = torch.Generator().manual_seed(1)
    cosine = torch.rand(7, 6, generator=g) * 2 - 1
    labels = torch.tensor([4, 5, 4, 5, 5, 4, 4])
    strategy.config.margin, strategy.is_training = margin, True
    strategy.mb_output, strategy.mbatch = cosine, [None, labels, None]
    strategy.config.use_orth = False
    try:
        ours = strategy.criterion()
    finally:
        strategy.config.margin, strategy.config.use_orth = 0.0, True
    expected = official_cosface(cosine[:, 4:], labels - 4, 20.0, margin)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_orthogonality_term_is_the_official_one(trained):
    _, strategy, _, _ = trained
    ups = [strategy.up_projections(k) for k in range(3)]
    weight = strategy.config.reg * torch.exp(-torch.tensor(3, dtype=torch.float32))
    expected = official_orth_loss(ups[2], ups[:2]) * weight
    torch.testing.assert_close(strategy.extra_loss(), expected, rtol=1e-6, atol=1e-9)
    assert float(expected) > 0


def test_universal_adapter_is_the_official_emr_merge(trained):
    _, strategy, _, _ = trained
    for wrapper in strategy.adapters:
        vectors = [dict(wrapper.adapters[strategy.slot(k)].state_dict()) for k in range(3)]
        unified = official_emr(vectors)
        for name, value in wrapper.adapters[0].state_dict().items():
            assert torch.equal(value, unified[name].to(value.dtype)), name
    g = torch.Generator().manual_seed(0)  # signs disagree, zeros, ties
    vectors = [torch.randn(5, 4, generator=g).round() for _ in range(4)]
    assert torch.equal(emr_unified(vectors), official_emr([{"w": v} for v in vectors])["w"].float())


def test_selection_and_combined_logits_follow_the_official_code(trained):
    stream, strategy, _, _ = trained
    strategy.model.eval()
    x = torch.cat([images_of(stream.test[t].dataset)[0] for t in range(3)])
    head = strategy.model.head
    with torch.no_grad():
        per_task = torch.stack([20 * head(strategy.adapter_features(x, strategy.slot(k)))
                                for k in range(3)])
        universal = 20 * head(strategy.adapter_features(x, 0))
        expected, pick = official_eval(per_task, universal)
        calls = []  # the backbone passes predict runs, against the reported count
        hook = strategy.model.backbone.patch_embed.register_forward_hook(lambda *a: calls.append(1))
        torch.testing.assert_close(strategy.predict(x), expected, rtol=1e-5, atol=1e-6)
        assert strategy.forward_passes_per_image == len(calls) == 4
        strategy.config.universal, calls[:] = "last", []  # the official code's evaluated path
        last, _ = official_eval(per_task, per_task[-1])
        torch.testing.assert_close(strategy.predict(x), last, rtol=1e-5, atol=1e-6)
        assert strategy.forward_passes_per_image == len(calls) == 3
        strategy.config.universal = "merged"
    hook.remove()


def test_optimiser_is_the_official_one(trained):
    """``get_optimizer``: the current adapter and every head block at lr with the weight decay
    (the code's two groups hold the same values); SGD momentum 0.9."""
    _, strategy, _, _ = trained
    optimizer = strategy.make_optimizer_for_task(strategy.trainable_parameters())
    expected = [*strategy.task_adapter_parameters(2), *strategy.model.head.blocks]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, params)) == sorted(map(id, expected))
    assert {(g["lr"], g["weight_decay"], g["momentum"]) for g in optimizer.param_groups} == {
        (strategy.config.lr, strategy.config.weight_decay, 0.9)}


def test_alignment_is_the_official_classifer_align(trained):
    """From the second task on, the cosine head is realigned as ``classifer_align`` does it on the
    same Gaussians and draws: logits × scale, T_max fixed at 5, only the head blocks train, means
    decayed by 0.9 + 0.1·(task of c + 1)/(t + 1) (the code's rule with the task size's sign
    corrected: docs)."""
    _, strategy, _, alignments = trained
    assert [call["task"] for call in alignments] == [1, 2]
    cfg = strategy.config
    for call in alignments:
        head, t, size = call["before"], call["task"], 2  # 2 classes per task
        factors = [0.9 + (c // size + 1) / (t + 1) * 0.1 for c in range(len(call["means"]))]
        torch.set_rng_state(call["rng"])
        official_classifier_align(head, list(head.blocks), call["means"], call["covs"],
                                  cfg.batch_size, cfg.ca_lr, cfg.ca_epochs, cfg.weight_decay,
                                  t_max=5, scale=20.0, mean_factors=factors)
        for name, value in call["after"].state_dict().items():
            torch.testing.assert_close(value, head.state_dict()[name], rtol=1e-5, atol=1e-6)


# exps/tuna_*.json: tuned_epoch, init_lr, batch_size, use_orth, decay, crct_epochs, ca_lr, m
OFFICIAL_RECIPES = {"cifar100": (15, 0.01, 16, False, False, 30, 0.005, 0.0),
                    "imagenet-r": (10, 0.02, 32, True, True, 30, 0.005, 0.0),
                    "imagenet-a": (20, 0.01, 16, True, True, 10, 0.01, 0.3)}


@pytest.mark.parametrize("benchmark", sorted(OFFICIAL_RECIPES))
def test_recipe_is_the_official_config(benchmark):
    epochs, lr, batch, orth, decay, ca_epochs, ca_lr, margin = OFFICIAL_RECIPES[benchmark]
    cfg = TUNA.Config(**TUNA.defaults_for(benchmark, 10))
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.use_orth, cfg.decay) == (
        epochs, lr, batch, orth, decay)
    assert (cfg.ca_epochs, cfg.ca_lr, cfg.margin, cfg.ca_samples) == (
        ca_epochs, ca_lr, margin, 5 * batch)
    # every file: weight_decay 5e-4 (also the alignment's), min_lr 0, reg 0.001, scale 20, r 16;
    # the code's alignment T_max is 5
    assert (cfg.weight_decay, cfg.ca_weight_decay, cfg.min_lr, cfg.reg, cfg.scale) == (
        5e-4, 5e-4, 0.0, 0.001, 20.0)
    assert (cfg.ffn_num, cfg.ca_t_max, cfg.universal, cfg.decay_rule) == (16, 5, "merged", "task")


def test_the_lowest_entropy_adapter_wins_as_in_the_official_code():
    g = torch.Generator().manual_seed(2)
    sharpness = torch.tensor([1.0, 4.0, 2.0, 8.0]).view(4, 1, 1)  # vary which row is sharpest
    logits = torch.randn(4, 50, 9, generator=g) * sharpness * torch.rand(4, 50, 1, generator=g)
    _, pick = official_eval(logits, torch.zeros(50, 9))
    assert len(pick.unique()) == 4
    assert torch.equal(entropy_selected(logits), logits[pick, torch.arange(50)])


def test_statistics_equal_a_direct_computation(trained):
    stream, strategy, _, _ = trained
    strategy.model.eval()
    with torch.no_grad():
        for task in range(3):
            x, y = images_of(stream.train[task].dataset)
            own = strategy.adapter_features(x, strategy.slot(task)).double()
            for c in y.unique().tolist():
                torch.testing.assert_close(strategy.gaussians.means[c], own[y == c].mean(0))
                cov = torch.cov(own[y == c].T) + 1e-4 * torch.eye(own.shape[1], dtype=torch.float64)
                torch.testing.assert_close(strategy.gaussians.covs[c], cov.float(), rtol=1e-4,
                                           atol=1e-5)


def test_decay_rules():
    g = TUNAGaussians(2, 1e-4, decay=True, rule="task")
    g.class_task = [0] * 10 + [1] * 10 + [2] * 10
    assert [g.mean_scale(c, 2) for c in (0, 15, 29)] == pytest.approx(
        [0.9 + 0.1 / 3, 0.9 + 0.2 / 3, 1.0])
    g.rule = "official"  # task_size = known − total = −10: class // −10 ≤ 0
    assert [g.mean_scale(c, 2) for c in (0, 5, 15, 29)] == pytest.approx(
        [0.9 + 0.1 / 3, 0.9, 0.9 - 0.1 / 3, 0.9 - 0.2 / 3])
    g.decay = False
    assert g.mean_scale(0, 2) == 1.0


def test_old_adapters_frozen_bit_identical_unless_the_official_gradient_is_asked(trained):
    _, strategy, snapshots, _ = trained
    for task, snapshot in enumerate(snapshots):
        now = strategy.task_adapter_parameters(task)
        assert all(torch.equal(a, b) for a, b in zip(snapshot, now))
        assert not any(p.requires_grad for p in now)
    _, moved, snapshots, _ = train(tasks=2, orth_moves_old=True, epochs=1)
    ups = {id(p) for p in moved.up_projections(0)}
    now = moved.task_adapter_parameters(0)
    changed = [not torch.equal(a, b) for a, b in zip(snapshots[0], now)]
    names = [id(p) in ups for p in moved.task_adapter_parameters(0)]
    assert changed == names  # only the earlier up-projections moved


def test_prediction_sees_only_images_no_task_label(trained):
    check_prediction_ignores_task_labels(trained[1], trained[0])


def test_resume_continues_identically():
    check_resume_continues_identically(TUNA, **{**SMALL, "epochs": 1})


def test_a_run_under_bf16_autocast_trains_aligns_and_predicts():
    check_bf16_run(TUNA, **{**SMALL, "epochs": 1})


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, tiny_checkpoint):
    """MOS and TUNA over 2 CPU processes (gloo) against one: the class Gaussians (and MOS's
    prototypes) are summed over ranks, the alignment draws the same samples on every rank, so
    the statistics and the counts match. Adapter dropout off (each rank draws its own masks);
    MOS's batch-dependent orthogonality term off (a rank sees half the batch: docs)."""
    common = ["run", "--methods", "mos,tuna", "--epochs", "1", "--tasks", "2",
              "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--no-report",
              "--device", "cpu"]
    for item in ("mos.reg=0", "mos.adapter_dropout=0", "tuna.adapter_dropout=0",
                 "mos.ca_epochs=2", "tuna.ca_epochs=2"):
        common += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("single", []), ("ddp", ["--ddp", "--nproc", "2"])):
        done = subprocess.run([sys.executable, "-m", "clbench", *common, "--name", name, *extra],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    for method in ("mos", "tuna"):
        single, ddp = (json.loads(next((tmp_path / name).rglob(f"{method}/seed-*/results.json"))
                                  .read_text()) for name in ("single", "ddp"))
        assert ddp["total"] == single["total"]
        for row_single, row_ddp in zip(single["correct"], ddp["correct"]):
            assert all(abs(a - b) <= 2 for a, b in zip(row_single, row_ddp)), method
        states = [torch.load(next((tmp_path / name).rglob(f"{method}/seed-*/checkpoint.pt")),
                             weights_only=True)["state"] for name in ("single", "ddp")]
        for key in ("class_means", "class_covs"):
            a, b = (s["gaussians"][key].double() for s in states)
            assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max()), (method, key)
