"""RanPAC: ridge solution = direct least squares on projected features, λ = the official hold-out
choice, projection frozen after the first task, statistics independent of batch order."""
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from clbench.methods.prototype import parallel_adapter
from clbench.class_stats import ClassStatistics
from clbench.methods.prototype.ranpac import RIDGES, RanPAC, holdout_mask
from helpers import build, tensor_stream, tiny_vit


def images_labels(dataset):
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    return x, y


def official_ridge(h_fit, y_fit, h_val, y_val):
    """RanPAC.py ``optimise_ridge_parameter`` on explicit fit / hold-out features."""
    losses = []
    for ridge in RIDGES:
        w = torch.linalg.solve(h_fit.T @ h_fit + ridge * torch.eye(h_fit.shape[1], dtype=h_fit.dtype),
                               h_fit.T @ y_fit).T
        losses.append(F.mse_loss(h_val @ w.T, y_val).item())
    return RIDGES[min(range(len(losses)), key=losses.__getitem__)]


def test_ridge_equals_direct_least_squares_and_projection_is_frozen():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=12)
    strategy = build(RanPAC, tiny_vit(), n_tasks=2, epochs=1, batch_size=8, ffn_num=4, rp_dim=16)
    strategy.train(stream.train[0])
    projection = strategy.projection.clone()
    adapters = [p.clone() for p in parallel_adapter.adapter_parameters(strategy.adapters, 0)]
    strategy.train(stream.train[1])
    assert strategy.train_epochs == 0 and strategy.trainable_parameter_count() == 0
    assert torch.equal(strategy.projection, projection)
    assert all(torch.equal(a, b) for a, b in
               zip(adapters, parallel_adapter.adapter_parameters(strategy.adapters, 0)))

    strategy.model.eval()
    hs, ys = [], []
    for task in range(2):
        x, y = images_labels(stream.train[task].dataset)
        with torch.no_grad():
            h = strategy.projected(strategy.model.features(x)).double()
        onehot = F.one_hot(y, 4).double()
        # λ of this task: the official rule on the task's hold-out split (mask of the pixels)
        held = holdout_mask(x)
        assert 0 < held.sum() < len(held)
        cols = slice(2 * task, 2 * task + 2)
        assert strategy.ridges[task] == official_ridge(h[~held], onehot[~held][:, cols],
                                                       h[held], onehot[held][:, cols])
        hs.append(h)
        ys.append(onehot)
    h, y = torch.cat(hs), torch.cat(ys)
    ridge = strategy.ridges[-1]
    # ridge regression as one least-squares problem: [H; √λ I] W = [Y; 0]
    lhs = torch.cat([h, ridge ** 0.5 * torch.eye(16, dtype=torch.float64)])
    rhs = torch.cat([y, torch.zeros(16, 4, dtype=torch.float64)])
    direct = torch.linalg.lstsq(lhs, rhs).solution.T
    assert torch.allclose(strategy.weights.double(), direct, rtol=1e-4, atol=1e-5)
    assert torch.allclose(strategy.gram, h.T @ h)
    with torch.no_grad():
        logits = strategy.predict(torch.cat([images_labels(stream.train[t].dataset)[0] for t in range(2)]))
    assert torch.allclose(logits.double(), h @ direct.T, rtol=1e-3, atol=1e-4)


def test_holdout_is_a_property_of_each_image_not_of_its_batch():
    x = torch.rand(500, 3, 16, 16)
    mask = holdout_mask(x)
    assert 0.15 < mask.float().mean() < 0.25  # ≈ the official 20 %
    order = torch.randperm(500)
    shuffled = torch.cat([holdout_mask(x[order[i:i + 7]]) for i in range(0, 500, 7)])
    assert torch.equal(shuffled, mask[order])


def snapshot(strategy):
    return (strategy.gram.clone(), strategy.targets.state_dict(), list(strategy.ridges))


def restore(strategy, state):
    strategy.gram, targets, strategy.ridges = state[0].clone(), state[1], list(state[2])
    strategy.targets = ClassStatistics(strategy.rp_dim, second_moments=False)
    strategy.targets.load_state_dict(targets)


def test_result_does_not_depend_on_batch_order():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=10)
    strategy = build(RanPAC, tiny_vit(), n_tasks=2, epochs=1, batch_size=8, ffn_num=4, rp_dim=32)
    strategy.train(stream.train[0])
    before = snapshot(strategy)
    strategy.train(stream.train[1])  # the harness's shuffled loader, batch 8
    gram, weights, ridge = strategy.gram.clone(), strategy.weights.clone(), strategy.ridges[-1]

    restore(strategy, before)
    dataset = stream.train[1].dataset
    reversed_loader = DataLoader(Subset(dataset, list(range(len(dataset)))[::-1]), batch_size=3)
    strategy.accumulate_and_solve(reversed_loader)
    assert strategy.ridges[-1] == ridge
    # equal up to the float32 rounding of features computed in batches of another size, relative
    # to each matrix's scale (2e-7 and 2e-5 seen; one image more or less moves them by percents)
    def close(a, b, tolerance):
        return float((a - b).abs().max()) <= tolerance * float(b.abs().max())

    assert close(strategy.gram, gram, 1e-6) and close(strategy.weights, weights, 1e-4)


def test_resume_continues_identically():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=8)
    first = build(RanPAC, tiny_vit(), n_tasks=2, epochs=1, batch_size=8, ffn_num=4, rp_dim=16)
    first.train(stream.train[0])
    second = build(RanPAC, tiny_vit(), n_tasks=2, epochs=1, batch_size=8, ffn_num=4, rp_dim=16)
    second.load_checkpoint(first.checkpoint())
    for strategy in (first, second):
        strategy.train(stream.train[1])
    assert torch.equal(first.weights, second.weights)
    assert first.ridges == second.ridges


@pytest.mark.slow
def test_statistics_over_two_gloo_processes_match_one_process(tmp_path, tiny_checkpoint):
    """Class sums, Gram matrices and the hold-out λ are reduced over ranks: a 2-process run
    reaches the single-process counts and ridges."""
    import json
    import os
    import subprocess
    import sys

    common = ["run", "--methods", "simplecil,ranpac", "--epochs", "1", "--tasks", "2",
              "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--no-report",
              "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("single", []), ("ddp", ["--ddp", "--nproc", "2"])):
        done = subprocess.run([sys.executable, "-m", "clbench", *common, "--name", name, *extra],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    for method in ("simplecil", "ranpac"):
        single, ddp = (json.loads(next((tmp_path / name).rglob(f"{method}/seed-*/results.json"))
                                  .read_text()) for name in ("single", "ddp"))
        assert ddp["total"] == single["total"]
        for row_single, row_ddp in zip(single["correct"], ddp["correct"]):
            # features of other batch compositions round differently: a borderline sample may flip
            assert all(abs(a - b) <= 2 for a, b in zip(row_single, row_ddp)), method
        assert ddp["method_info"] == single["method_info"], method  # same λ per task


def test_holdout_is_the_same_for_uint8_pixels_and_their_totensor_values():
    """Image loaders deliver uint8; a run must hold out the images ToTensor's floats would."""
    pixels = torch.randint(0, 256, (300, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(holdout_mask(pixels), holdout_mask(pixels.float().div(255)))
