"""``vit-tiny-letters``: an embedded tiny ViT pretrained on rendered printed Latin letters.

Continual-learning methods for pretrained ViTs assume a pretrained backbone, and none can be
downloaded here. This module ships one: a timm ``VisionTransformer`` (16×16 input, 4×4 patches,
width 96, depth 4, 3 heads, class token) trained to classify the 52 printed Latin letters
(A–Z, a–z) rendered with Pillow's bundled scalable font. The pretraining data contains no digit;
the default benchmark (scikit-learn's handwritten digits, see :mod:`clbench.digits_data`) is thus
a domain *and* class shift from it — a small analogue of ImageNet → ImageNet-R.

Rendering imitates how the UCI optical digits were made: a white-on-black glyph is drawn on a
32×32 canvas under a random affine map, thickened and blurred, then (mostly) box-reduced to 8×8 —
the UCI digits are counts of "on" pixels in 4×4 blocks of a 32×32 bitmap — and upsampled
bilinearly to 16×16, with pixel noise. Everything is deterministic from a seed.

Command line::

    python -m clbench.letters pretrain --out clbench/assets/vit-tiny-letters.safetensors \
        [--steps N] [--seed S] [--device cpu|cuda]
    python -m clbench.letters evaluate [--checkpoint FILE]

``pretrain`` writes the state_dict (head included) with :func:`safetensors.torch.save_file` and a
sidecar JSON (same stem) with the architecture, normalisation, provenance and the figures of
``evaluate``. The harness loads the backbone with :func:`load_letters_backbone`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import string
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ARCH_KWARGS", "NUM_LETTER_CLASSES", "LETTERS", "LETTERS_MEAN", "LETTERS_STD",
    "DEFAULT_CHECKPOINT", "DEFAULT_METADATA", "IMAGE_SIZE",
    "render_letters", "build_letters_vit", "load_letters_backbone", "load_letters_metadata",
    "normalize", "extract_features", "linear_probe_accuracy", "class_incremental_linear_accuracy",
    "evaluate_backbones", "pretrain", "main",
]

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------
LETTERS = string.ascii_uppercase + string.ascii_lowercase  # class i is LETTERS[i]
NUM_LETTER_CLASSES = len(LETTERS)  # 52
IMAGE_SIZE = 16

#: Architecture of ``vit-tiny-letters`` (timm ``VisionTransformer`` kwargs, without num_classes).
ARCH_KWARGS: dict = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=96, depth=4,
                         num_heads=3, class_token=True, global_pool="token")

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_CHECKPOINT = ASSETS_DIR / "vit-tiny-letters.safetensors"
DEFAULT_METADATA = DEFAULT_CHECKPOINT.with_suffix(".json")

_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.5, 0.5, 0.5)

# Class order of the class-incremental evaluation (5 tasks × 2 classes).
CIL_ORDER_SEED = 1993
CIL_NUM_TASKS = 5


def load_letters_metadata(path: str | Path | None = None) -> dict:
    """The sidecar JSON of the checkpoint (``{}`` when it does not exist yet)."""
    path = Path(path) if path is not None else DEFAULT_METADATA
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def _read_norm() -> tuple[tuple[float, ...], tuple[float, ...]]:
    meta = load_letters_metadata()
    return (tuple(meta.get("mean", _DEFAULT_MEAN)), tuple(meta.get("std", _DEFAULT_STD)))


#: Input normalisation of the shipped checkpoint (read from its JSON).
LETTERS_MEAN, LETTERS_STD = _read_norm()

# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
_CANVAS = 32          # rendering canvas (UCI digits: 32×32 bitmaps reduced by 4×4 blocks)
_FONT_SIZE = 48       # glyph bank resolution (larger than the canvas: glyphs are only shrunk)
_STROKE_WIDTHS = (0, 0, 1, 2, 3)  # thickening at _FONT_SIZE (stem width is ~5 px there)


@lru_cache(maxsize=1)
def _glyph_bank() -> list[list]:
    """``bank[class][k]`` = (PIL 'L' image of the glyph cropped to its ink, stroke width k)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=_FONT_SIZE)
    if not hasattr(font, "getbbox") or type(font).__name__ != "FreeTypeFont":
        raise RuntimeError("Pillow was built without FreeType: cannot render the scalable "
                           "default font needed by clbench.letters")
    side = 2 * _FONT_SIZE
    bank = []
    for ch in LETTERS:
        per_width = []
        for sw in _STROKE_WIDTHS:
            im = Image.new("L", (side, side), 0)
            ImageDraw.Draw(im).text((side // 2, side // 2), ch, font=font, fill=255,
                                    anchor="mm", stroke_width=sw, stroke_fill=255)
            box = im.getbbox()
            per_width.append(im.crop(box))
        bank.append(per_width)
    return bank


def _render_one(glyph, rng: np.random.Generator) -> np.ndarray:
    """One augmented sample from a cropped glyph image; returns uint8 (16, 16)."""
    from PIL import Image, ImageFilter

    w, h = glyph.size
    # Forward affine map glyph -> canvas: scale (size-normalised like the UCI digits, with
    # anisotropic jitter), shear, rotation, translation.
    fill = rng.uniform(0.6, 1.0)
    s = fill * _CANVAS / max(w, h)
    sx = s * math.exp(rng.uniform(-0.2, 0.2))
    sy = s * math.exp(rng.uniform(-0.2, 0.2))
    theta = math.radians(rng.uniform(-18.0, 18.0))
    shear = rng.uniform(-0.35, 0.35)
    tx, ty = rng.uniform(-0.12, 0.12, size=2) * _CANVAS
    c, si = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -si], [si, c]])
    sh = np.array([[1.0, shear], [0.0, 1.0]])
    sc = np.diag([sx, sy])
    A = rot @ sh @ sc
    # Glyph centre -> canvas centre + t; PIL wants the inverse map (output -> input).
    gc = np.array([w / 2.0, h / 2.0])
    cc = np.array([_CANVAS / 2.0 + tx, _CANVAS / 2.0 + ty])
    Ainv = np.linalg.inv(A)
    b = gc - Ainv @ cc
    data = (Ainv[0, 0], Ainv[0, 1], b[0], Ainv[1, 0], Ainv[1, 1], b[1])
    im = glyph.transform((_CANVAS, _CANVAS), Image.Transform.AFFINE, data,
                         resample=Image.Resampling.BILINEAR, fillcolor=0)
    if rng.random() < 0.5:  # binary bitmap, like the UCI scans
        im = im.point(lambda v: 255 if v >= 128 else 0)
    if rng.random() < 0.1:  # extra thickening at canvas resolution
        im = im.filter(ImageFilter.MaxFilter(3))
    radius = rng.uniform(0.0, 0.8)
    if radius > 0.15:
        im = im.filter(ImageFilter.GaussianBlur(radius))
    # Reduce: mostly to 8×8 by 4×4 block averaging (the UCI digits), else to a finer grid.
    if rng.random() < 0.7:
        low = im.reduce(4)
        if rng.random() < 0.5:  # 17 grey levels like the UCI counts 0..16
            arr = np.round(np.asarray(low, dtype=np.float32) / 255.0 * 16.0) / 16.0 * 255.0
            low = Image.fromarray(arr.astype(np.uint8))
    else:
        r = int(rng.choice([10, 12, 16]))
        low = im.resize((r, r), Image.Resampling.BOX)
    out = np.asarray(low.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR),
                     dtype=np.float32) / 255.0
    # Contrast jitter and pixel noise.
    out = out * rng.uniform(0.8, 1.0)
    sigma = rng.uniform(0.0, 0.06)
    if sigma > 0.005:
        out = out + rng.normal(0.0, sigma, size=out.shape)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def render_letters(n: int, seed: int = 0, *, as_uint8: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` letter images deterministically from ``seed``.

    Labels cycle through the 52 classes (balanced; sample ``i`` has class ``i % 52``).
    Returns ``(x, y)``: ``x`` float32 (n, 3, 16, 16) in [0, 1] (or uint8 (n, 16, 16) with
    ``as_uint8=True``, a compact cache), ``y`` int64 (n,).
    """
    bank = _glyph_bank()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x1e77e5])))
    imgs = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % NUM_LETTER_CLASSES
    n_widths = len(_STROKE_WIDTHS)
    for i in range(n):
        glyph = bank[labels[i]][int(rng.integers(n_widths))]
        imgs[i] = _render_one(glyph, rng)
    x = torch.from_numpy(imgs)
    y = torch.from_numpy(labels)
    if as_uint8:
        return x, y
    return _to_float3(x), y


def _to_float3(x_u8: torch.Tensor) -> torch.Tensor:
    return (x_u8.float() / 255.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def build_letters_vit(num_classes: int = NUM_LETTER_CLASSES, arch_kwargs: dict | None = None):
    """The ``vit-tiny-letters`` architecture at timm's default (random) initialisation."""
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(arch_kwargs if arch_kwargs is not None else ARCH_KWARGS)
    kwargs.pop("num_classes", None)
    return VisionTransformer(**kwargs, num_classes=num_classes)


def load_letters_backbone(num_classes: int = 0, checkpoint: str | Path | None = None):
    """Build ``vit-tiny-letters`` from its JSON's architecture kwargs and load its weights.

    ``num_classes=0`` (default) gives a feature extractor returning (N, 96) CLS features
    (after the final norm). With ``num_classes=52`` the letter head is loaded too; any other
    value gets a freshly initialised head. All other weights are loaded strictly.
    Inputs must be normalised with ``LETTERS_MEAN`` / ``LETTERS_STD`` (see :func:`normalize`).
    """
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    meta = load_letters_metadata(checkpoint.with_suffix(".json"))
    arch = meta.get("arch_kwargs", ARCH_KWARGS)
    trained_classes = int(meta.get("num_classes", NUM_LETTER_CLASSES))
    model = build_letters_vit(num_classes=num_classes, arch_kwargs=arch)
    state = load_file(str(checkpoint))
    if num_classes == trained_classes:
        model.load_state_dict(state, strict=True)
    else:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad_missing = [k for k in missing if not k.startswith("head.")]
        if bad_missing or unexpected:
            raise RuntimeError(f"checkpoint mismatch: missing={bad_missing} "
                               f"unexpected={list(unexpected)}")
    return model.eval()


def normalize(x: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """Apply the checkpoint's input normalisation to images in [0, 1] of shape (N, 3, H, W)."""
    mean = torch.tensor(mean if mean is not None else LETTERS_MEAN, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std if std is not None else LETTERS_STD, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def extract_features(model, x: torch.Tensor, *, batch_size: int = 512, mean=None, std=None,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """Frozen pooled (CLS) features of images in [0, 1]; (N, embed_dim) float32 on CPU."""
    model = model.eval().to(device)
    out = []
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i:i + batch_size], mean, std).to(device)
        feats = model.forward_head(model.forward_features(xb), pre_logits=True)
        out.append(feats.float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Evaluation on the digits benchmark
# --------------------------------------------------------------------------------------------
def linear_probe_accuracy(f_train, y_train, f_test, y_test) -> float:
    """Logistic regression on standardised frozen features; test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
    clf.fit(np.asarray(f_train), np.asarray(y_train))
    return float(clf.score(np.asarray(f_test), np.asarray(y_test)))


def class_incremental_linear_accuracy(f_train, y_train, f_test, y_test, *, num_tasks: int = 5,
                                      epochs: int = 10, lr: float = 1e-3, batch_size: int = 32,
                                      seed: int = 0, zero_init: bool = True,
                                      standardize: bool = True) -> float:
    """Final accuracy of a linear head trained class-incrementally on frozen features.

    Class order ``np.random.seed(1993); np.random.permutation(C)``, split into ``num_tasks``
    equal tasks. Features are standardised per dimension (training-set statistics, as in the
    linear probe). The head (zero-initialised, all C rows) is trained task by task with Adam on
    that task's samples, the cross-entropy using only the current task's logits (the other rows
    are masked out of the loss). Afterwards: accuracy over all C classes on the test set.
    """
    f_train = torch.as_tensor(f_train, dtype=torch.float32)
    f_test = torch.as_tensor(f_test, dtype=torch.float32)
    y_train = torch.as_tensor(y_train, dtype=torch.long)
    y_test = torch.as_tensor(y_test, dtype=torch.long)
    if standardize:  # per-dimension standardisation with the training features' statistics
        mu, sd = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
        f_train, f_test = (f_train - mu) / sd, (f_test - mu) / sd
    n_classes = int(y_train.max()) + 1
    np.random.seed(CIL_ORDER_SEED)
    order = np.random.permutation(n_classes)
    tasks = np.array_split(order, num_tasks)
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(f_train.shape[1], n_classes)
    if zero_init:
        # With 2-way softmax losses the sum of a task's rows never moves from its init, so
        # a random init would only add noise to the cross-task comparison.
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    else:
        with torch.no_grad():  # deterministic init from ``seed``
            bound = 1.0 / math.sqrt(f_train.shape[1])
            head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=gen))
            head.bias.copy_(torch.empty_like(head.bias).uniform_(-bound, bound, generator=gen))
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for task in tasks:
        cls = torch.as_tensor(task, dtype=torch.long)
        mask = torch.isin(y_train, cls)
        ft, yt = f_train[mask], y_train[mask]
        # map labels to positions within the current task's logits
        remap = torch.full((n_classes,), -1, dtype=torch.long)
        remap[cls] = torch.arange(len(cls))
        for _ in range(epochs):
            perm = torch.randperm(len(ft), generator=gen)
            for i in range(0, len(ft), batch_size):
                idx = perm[i:i + batch_size]
                logits = head(ft[idx])[:, cls]
                loss = F.cross_entropy(logits, remap[yt[idx]])
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        pred = head(f_test).argmax(1)
    return float((pred == y_test).float().mean())


def _digits_measures(model, digits, mean, std) -> dict:
    x_tr, y_tr, x_te, y_te = digits
    f_tr = extract_features(model, x_tr, mean=mean, std=std)
    f_te = extract_features(model, x_te, mean=mean, std=std)
    return {"linear_probe": linear_probe_accuracy(f_tr, y_tr, f_te, y_te),
            "cil_linear_final": class_incremental_linear_accuracy(f_tr, y_tr, f_te, y_te)}


def evaluate_backbones(checkpoint: str | Path | None = None, random_seeds=(0, 1, 2),
                       verbose: bool = True) -> dict:
    """Digits figures of the pretrained checkpoint and of the architecture at random init."""
    from .digits_data import load_digits_tensors

    checkpoint = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    meta = load_letters_metadata(checkpoint.with_suffix(".json"))
    mean = tuple(meta.get("mean", _DEFAULT_MEAN))
    std = tuple(meta.get("std", _DEFAULT_STD))
    digits = load_digits_tensors()
    results = {"pretrained": _digits_measures(
        load_letters_backbone(0, checkpoint), digits, mean, std)}
    if verbose:
        print(f"pretrained ({checkpoint.name}): " + _fmt(results["pretrained"]), flush=True)
    rand = {}
    for s in random_seeds:
        torch.manual_seed(s)
        model = build_letters_vit(num_classes=0, arch_kwargs=meta.get("arch_kwargs", ARCH_KWARGS))
        rand[str(s)] = _digits_measures(model, digits, mean, std)
        if verbose:
            print(f"random init seed {s}: " + _fmt(rand[str(s)]), flush=True)
    results["random_init"] = rand
    results["random_init_mean"] = {k: float(np.mean([r[k] for r in rand.values()]))
                                   for k in ("linear_probe", "cil_linear_final")}
    if verbose:
        print("random init mean: " + _fmt(results["random_init_mean"]), flush=True)
    return results


def _fmt(d: dict) -> str:
    return f"linear_probe={d['linear_probe']:.4f}  cil_linear_final={d['cil_linear_final']:.4f}"


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------
def pretrain(out: str | Path = DEFAULT_CHECKPOINT, *, steps: int = 3200, seed: int = 0,
             device: str = "cpu", batch_size: int = 128, pool_size: int = 104_000,
             val_size: int = 5_200, lr: float = 2e-3, weight_decay: float = 0.05,
             warmup_steps: int = 200, label_smoothing: float = 0.1, threads: int = 2,
             evaluate: bool = True, command: str | None = None) -> dict:
    """Pretrain ``vit-tiny-letters`` on rendered letters; write safetensors + JSON sidecar."""
    from safetensors.torch import save_file

    t0 = time.time()
    if device.startswith("cuda"):  # deterministic cuBLAS (must be set before CUDA starts)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    x_pool, y_pool = render_letters(pool_size, seed=seed, as_uint8=True)
    x_val, y_val = render_letters(val_size, seed=seed + 10_000, as_uint8=True)
    t_render = time.time() - t0
    print(f"rendered {pool_size} + {val_size} letter images in {t_render:.1f}s", flush=True)

    mean = torch.tensor(_DEFAULT_MEAN).view(1, 3, 1, 1).to(device)
    std = torch.tensor(_DEFAULT_STD).view(1, 3, 1, 1).to(device)

    def prep(xb_u8):
        return (_to_float3(xb_u8).to(device) - mean) / std

    model = build_letters_vit(NUM_LETTER_CLASSES).to(device)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    def lr_at(step):
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))

    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(pool_size, generator=gen), 0
    model.train()
    log_every = max(1, steps // 20)
    running = 0.0
    for step in range(steps):
        if pos + batch_size > pool_size:
            perm, pos = torch.randperm(pool_size, generator=gen), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        xb, yb = prep(x_pool[idx]), y_pool[idx].to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += float(loss.detach())
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {running / log_every:.4f}  "
                  f"lr {lr_at(step):.2e}  {time.time() - t0:.0f}s", flush=True)
            running = 0.0

    model.eval()
    with torch.no_grad():
        correct = 0
        for i in range(0, val_size, 1024):
            correct += int((model(prep(x_val[i:i + 1024])).argmax(1).cpu()
                            == y_val[i:i + 1024]).sum())
    val_acc = correct / val_size
    wall = time.time() - t0
    print(f"letters val accuracy {val_acc:.4f}; training wall time {wall:.0f}s", flush=True)

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={"format": "pt", "model": "vit-tiny-letters"})
    meta = {
        "name": "vit-tiny-letters",
        "class": "timm.models.vision_transformer.VisionTransformer",
        "arch_kwargs": dict(ARCH_KWARGS),
        "num_classes": NUM_LETTER_CLASSES,
        "classes": LETTERS,
        "feature_dim": ARCH_KWARGS["embed_dim"],
        "input_size": [3, IMAGE_SIZE, IMAGE_SIZE],
        "mean": list(_DEFAULT_MEAN),
        "std": list(_DEFAULT_STD),
        "pretraining": {
            "data": "Pillow-rendered printed Latin letters A-Z a-z (ImageFont.load_default, "
                    "Aileron Regular), random affine/thickening/blur/noise, 32x32 canvas "
                    "reduced to 8x8 (70%) or 10/12/16, upsampled to 16x16; white on black",
            "pool_size": pool_size, "steps": steps, "batch_size": batch_size, "seed": seed,
            "optimizer": "AdamW", "lr": lr, "weight_decay": weight_decay,
            "schedule": f"linear warmup {warmup_steps} steps + cosine to 0",
            "label_smoothing": label_smoothing, "grad_clip": 1.0,
            "device": device, "torch_threads": threads,
            "torch": torch.__version__, "timm": _timm_version(), "pillow": _pillow_version(),
            "pool_sha256": hashlib.sha256(x_pool.numpy().tobytes()).hexdigest(),
            "letters_val_accuracy": val_acc, "wall_time_s": round(wall, 1),
            "render_time_s": round(t_render, 1),
        },
        "command": command or "python -m clbench.letters " + " ".join(
            shlex.quote(a) for a in sys.argv[1:]),
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    if evaluate:
        meta["evaluation_digits"] = evaluate_backbones(out)
        meta["evaluation_digits"]["protocol"] = (
            "frozen CLS features of clbench.digits_data.load_digits_tensors(); linear_probe: "
            "StandardScaler + LogisticRegression(max_iter=3000), test accuracy; "
            "cil_linear_final: features standardised (train statistics), class order "
            "np.random.seed(1993) permutation(10), 5 tasks x 2 classes, zero-initialised "
            "linear head trained per task with Adam lr 1e-3, 10 epochs, batch 32, "
            "cross-entropy on the current task's logits only; final accuracy over all 10 "
            "classes on the test set")
        out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {out.with_suffix('.json')}")
    return meta


def _pillow_version() -> str:
    import PIL
    return PIL.__version__


def _timm_version() -> str:
    import timm
    return timm.__version__


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clbench.letters", description=__doc__.split(
        "\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="pretrain vit-tiny-letters on rendered letters")
    p.add_argument("--out", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--steps", type=int, default=3200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pool-size", type=int, default=104_000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-eval", action="store_true")
    e = sub.add_parser("evaluate", help="digits figures: pretrained vs random init")
    e.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    e.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.cmd == "pretrain":
        argv_list = sys.argv[1:] if argv is None else list(argv)
        pretrain(args.out, steps=args.steps, seed=args.seed, device=args.device,
                 batch_size=args.batch_size, pool_size=args.pool_size, lr=args.lr,
                 threads=args.threads, evaluate=not args.no_eval,
                 command="python -m clbench.letters " + " ".join(
                     shlex.quote(a) for a in argv_list))
    else:
        torch.set_num_threads(args.threads)
        evaluate_backbones(args.checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
