"""The shipped backbone ``vit-tiny-letters`` and the script that made it (scripts/pretrain_letters.py).

The harness needs only the weights and ``clbench.backbones``' spec; these tests check that the
spec, the shipped files and the script agree, and that the script still runs."""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

from clbench.backbones import BACKBONES, load_backbone

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_letters.py"
SPEC = BACKBONES["vit-tiny-letters"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("pretrain_letters", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shipped_meta():
    return json.loads(SPEC.file.with_suffix(".json").read_text())


def test_rendering_is_deterministic_and_well_formed(script):
    x1, y1 = script.render_letters(104, seed=3)
    x2, y2 = script.render_letters(104, seed=3)
    x3, _ = script.render_letters(104, seed=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.shape == (104, 3, 16, 16) and x1.dtype == torch.float32 and y1.dtype == torch.int64
    assert float(x1.min()) >= 0.0 and float(x1.max()) <= 1.0
    assert sorted(set(y1.tolist())) == list(range(52)) == list(range(script.NUM_LETTER_CLASSES))
    assert float(x1.mean()) < 0.5  # white strokes on black
    assert bool((x1.amax(dim=(1, 2, 3)) > 0.3).all())  # every image has ink
    xu, _ = script.render_letters(104, seed=3, as_uint8=True)
    assert xu.dtype == torch.uint8 and xu.shape == (104, 16, 16)
    assert torch.allclose(script.to_float3(xu), x1)


def test_spec_is_the_architecture_of_the_shipped_weights(script, shipped_meta):
    """One source: the backbones spec builds exactly the network the shipped file holds."""
    from safetensors.torch import load_file

    model = script.build_model(script.NUM_LETTER_CLASSES)
    assert script.architecture(model) == shipped_meta["arch_kwargs"]
    model.load_state_dict(load_file(str(SPEC.file)), strict=True)  # letter head included
    assert SPEC.file.stat().st_size < 2.5e6
    assert (SPEC.mean, SPEC.std) == (tuple(shipped_meta["mean"]), tuple(shipped_meta["std"]))
    assert shipped_meta["input_size"] == [3, 16, 16] and shipped_meta["num_classes"] == 52
    x, y = script.render_letters(52, seed=11)
    with torch.no_grad():
        letter_acc = float((model.eval()(script.normalize(x)).argmax(1) == y).float().mean())
    assert letter_acc > 0.5  # the shipped weights recognise fresh letters
    harness = load_backbone(SPEC.name).model  # what clbench run loads: same trunk, no head
    assert harness.num_classes == 0 and harness.embed_dim == 96
    assert torch.equal(harness.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    feats = script.features(harness, x)
    assert feats.shape == (52, 96) and torch.isfinite(feats).all()


def _nearest_mean_accuracy(f_train, y_train, f_test, y_test) -> float:
    means = torch.stack([f_train[y_train == c].mean(0) for c in range(int(y_train.max()) + 1)])
    return float((torch.cdist(f_test, means).argmin(1) == y_test).float().mean())


def test_shipped_weights_separate_the_digits_by_nearest_class_mean(script):
    """Computed, not read from the sidecar: the shipped trunk, loaded as ``clbench run`` loads it,
    gives digit features whose nearest class mean is right for 0.89 of the test digits (the same
    architecture at random init: 0.28-0.31, seeds 0-2), so wrong or damaged weights fail here."""
    from clbench.digits_data import load_digits_tensors

    x_tr, y_tr, x_te, y_te = load_digits_tensors()
    model = load_backbone(SPEC.name).model
    accuracy = _nearest_mean_accuracy(script.features(model, x_tr), y_tr,
                                      script.features(model, x_te), y_te)
    assert accuracy > 0.85, accuracy


def test_short_pretraining_writes_weights_the_harness_loads(script, tmp_path):
    out = tmp_path / "letters.safetensors"
    meta = script.pretrain(out, steps=2, pool_size=104, val_size=52, batch_size=26,
                           warmup_steps=1, threads=1, run_evaluation=False, log=lambda *a: None)
    loaded = load_backbone(SPEC.name, out)
    assert loaded.source == str(out) and loaded.feature_dim == 96
    assert meta["arch_kwargs"] == json.loads(SPEC.file.with_suffix(".json").read_text())["arch_kwargs"]
    assert json.loads(out.with_suffix(".json").read_text())["pretraining"]["steps"] == 2
    assert loaded.weights_sha256 != load_backbone(SPEC.name).weights_sha256


def test_pretraining_is_deterministic(script, tmp_path):
    from safetensors.torch import load_file

    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        script.pretrain(out, steps=6, pool_size=208, val_size=52, batch_size=32, warmup_steps=2,
                        threads=1, run_evaluation=False, log=lambda *a: None)
        runs.append(load_file(str(out)))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def _quick_probe(script, model, digits) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_tr, y_tr, x_te, y_te = digits
    f_tr, f_te = script.features(model, x_tr).numpy(), script.features(model, x_te).numpy()
    scaler = StandardScaler().fit(f_tr)
    clf = LogisticRegression(max_iter=150, tol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random features may not converge in 150 iterations
        clf.fit(scaler.transform(f_tr), y_tr.numpy())
    return float(clf.score(scaler.transform(f_te), y_te.numpy()))


@pytest.mark.slow  # a few seconds: features of 1,797 digits, three probes
def test_pretrained_features_beat_random_init_on_digits(script, shipped_meta):
    from clbench.digits_data import load_digits_tensors

    digits = load_digits_tensors()
    shipped = load_backbone(SPEC.name).model
    # the sidecar's number, recomputed from the weights by its own protocol (max_iter=3000)
    x_tr, y_tr, x_te, y_te = digits
    recomputed = script.linear_probe_accuracy(script.features(shipped, x_tr), y_tr,
                                              script.features(shipped, x_te), y_te)
    recorded = shipped_meta["evaluation_digits"]["pretrained"]["linear_probe"]
    assert recomputed == pytest.approx(recorded, abs=2 / len(y_te)), (recomputed, recorded)
    acc_pre = _quick_probe(script, shipped, digits)
    torch.manual_seed(0)
    acc_rand = _quick_probe(script, script.build_model(num_classes=0), digits)
    # measured: 0.98 with the shipped weights, 0.78-0.81 at random init (3 seeds)
    assert acc_pre > 0.90, acc_pre
    assert acc_pre > acc_rand + 0.08, (acc_pre, acc_rand)


@pytest.mark.slow
def test_script_runs_from_the_command_line(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(SCRIPT), "pretrain", "--steps", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--steps must be a positive integer" in out.stderr
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "pretrain" in out.stdout and "evaluate" in out.stdout
