"""Pretrain and evaluate ``vit-tiny-letters``, the tiny ViT that ships in ``clbench/assets``.

Continual-learning methods for pretrained ViTs assume a pretrained backbone and none can be
downloaded offline, so clbench ships one: the architecture of ``clbench.backbones.BACKBONES
["vit-tiny-letters"]`` (the one source of its timm tag and kwargs: 16×16 input, 4×4 patches,
width 96, depth 4, 3 heads, class token) trained to classify the 52 printed Latin letters (A–Z,
a–z) rendered with Pillow's bundled scalable font. No digit is in the data, so the default
benchmark (scikit-learn's handwritten digits) is a domain *and* class shift from it — a small
analogue of ImageNet → ImageNet-R. The harness itself only loads the weights (through
``clbench.backbones.load_backbone``); nothing here runs during ``clbench run``.

Rendering imitates how the UCI optical digits were made: a white-on-black glyph is drawn on a
32×32 canvas under a random affine map, thickened and blurred, then (mostly) box-reduced to 8×8 —
the UCI digits count "on" pixels in 4×4 blocks of a 32×32 bitmap — and upsampled bilinearly to
16×16, with pixel noise. Everything is deterministic from a seed.

Usage::

    python scripts/pretrain_letters.py pretrain --out clbench/assets/vit-tiny-letters.safetensors \\
        [--steps 3200] [--seed 0] [--device cpu|cuda] [--threads 2]
    python scripts/pretrain_letters.py evaluate [--checkpoint FILE]

``pretrain`` writes the state_dict (letter head included) with safetensors and a sidecar JSON
(same stem) with the architecture, normalisation, provenance and the ``evaluate`` figures.
``evaluate`` is a plain linear probe on frozen features of the ``digits`` split (logistic
regression on standardised CLS features), for the checkpoint loaded by the harness's own loader
and for the same network at random init; the class-incremental figure is what the harness
measures (``clbench run --methods linear-probe``).

The shipped checkpoint was written by ``python -m clbench.letters pretrain --out
clbench/assets/vit-tiny-letters.safetensors --steps 3200 --seed 0 --device cpu`` (the JSON's
``command``), the module this script replaced; rendering, initialisation and training loop are
unchanged (short runs of both give identical tensors). Its JSON also holds a
``cil_linear_final`` figure from a class-incremental loop that module had; it was dropped.
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

from clbench.backbones import BACKBONES, load_backbone

SPEC = BACKBONES["vit-tiny-letters"]
DEFAULT_CHECKPOINT = SPEC.file
LETTERS = string.ascii_uppercase + string.ascii_lowercase  # class i is LETTERS[i]
NUM_LETTER_CLASSES = len(LETTERS)  # 52
IMAGE_SIZE = 16
PRETRAIN_MEAN = PRETRAIN_STD = (0.5, 0.5, 0.5)  # input normalisation chosen for pretraining

_CANVAS = 32          # rendering canvas (UCI digits: 32×32 bitmaps reduced by 4×4 blocks)
_FONT_SIZE = 48       # glyph bank resolution (larger than the canvas: glyphs are only shrunk)
_STROKE_WIDTHS = (0, 0, 1, 2, 3)  # thickening at _FONT_SIZE (stem width is ~5 px there)


# ------------------------------------------------------------------------------------ rendering

@lru_cache(maxsize=1)
def _glyph_bank() -> list[list]:
    """``bank[class][k]`` = PIL 'L' image of the glyph cropped to its ink, stroke width k."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=_FONT_SIZE)
    if type(font).__name__ != "FreeTypeFont":
        raise SystemExit("Pillow was built without FreeType: cannot render the scalable default "
                         "font the letters are drawn with")
    side = 2 * _FONT_SIZE
    bank = []
    for ch in LETTERS:
        per_width = []
        for sw in _STROKE_WIDTHS:
            im = Image.new("L", (side, side), 0)
            ImageDraw.Draw(im).text((side // 2, side // 2), ch, font=font, fill=255,
                                    anchor="mm", stroke_width=sw, stroke_fill=255)
            per_width.append(im.crop(im.getbbox()))
        bank.append(per_width)
    return bank


def _render_one(glyph, rng: np.random.Generator) -> np.ndarray:
    """One augmented sample from a cropped glyph image; uint8 (16, 16)."""
    from PIL import Image, ImageFilter

    w, h = glyph.size
    # Forward map glyph -> canvas: size-normalised scale with anisotropic jitter, shear,
    # rotation, translation. The random draws keep this order (the shipped weights depend on it).
    s = rng.uniform(0.6, 1.0) * _CANVAS / max(w, h)
    sx = s * math.exp(rng.uniform(-0.2, 0.2))
    sy = s * math.exp(rng.uniform(-0.2, 0.2))
    theta = math.radians(rng.uniform(-18.0, 18.0))
    shear = rng.uniform(-0.35, 0.35)
    tx, ty = rng.uniform(-0.12, 0.12, size=2) * _CANVAS
    c, si = math.cos(theta), math.sin(theta)
    forward = np.array([[c, -si], [si, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    # PIL wants the inverse map (output -> input): glyph centre lands on canvas centre + t.
    inverse = np.linalg.inv(forward)
    offset = np.array([w / 2.0, h / 2.0]) - inverse @ np.array([_CANVAS / 2.0 + tx,
                                                                _CANVAS / 2.0 + ty])
    data = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    im = glyph.transform((_CANVAS, _CANVAS), Image.Transform.AFFINE, data,
                         resample=Image.Resampling.BILINEAR, fillcolor=0)
    if rng.random() < 0.5:  # binary bitmap, like the UCI scans
        im = im.point(lambda v: 255 if v >= 128 else 0)
    if rng.random() < 0.1:  # extra thickening at canvas resolution
        im = im.filter(ImageFilter.MaxFilter(3))
    radius = rng.uniform(0.0, 0.8)
    if radius > 0.15:
        im = im.filter(ImageFilter.GaussianBlur(radius))
    if rng.random() < 0.7:  # mostly to 8×8 by 4×4 block averaging (the UCI digits)
        low = im.reduce(4)
        if rng.random() < 0.5:  # 17 grey levels like the UCI counts 0..16
            arr = np.round(np.asarray(low, dtype=np.float32) / 255.0 * 16.0) / 16.0 * 255.0
            low = Image.fromarray(arr.astype(np.uint8))
    else:
        r = int(rng.choice([10, 12, 16]))
        low = im.resize((r, r), Image.Resampling.BOX)
    out = np.asarray(low.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR),
                     dtype=np.float32) / 255.0
    out = out * rng.uniform(0.8, 1.0)  # contrast jitter, then pixel noise
    sigma = rng.uniform(0.0, 0.06)
    if sigma > 0.005:
        out = out + rng.normal(0.0, sigma, size=out.shape)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def render_letters(n: int, seed: int = 0, *, as_uint8: bool = False):
    """``n`` letter images from ``seed``; sample ``i`` has class ``i % 52`` (balanced).

    Returns ``(x, y)``: ``x`` float32 (n, 3, 16, 16) in [0, 1] (uint8 (n, 16, 16) with
    ``as_uint8``, a compact cache), ``y`` int64 (n,)."""
    bank = _glyph_bank()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x1e77e5])))
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % NUM_LETTER_CLASSES
    for i in range(n):
        images[i] = _render_one(bank[labels[i]][int(rng.integers(len(_STROKE_WIDTHS)))], rng)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    return (x, y) if as_uint8 else (to_float3(x), y)


def to_float3(x_u8: torch.Tensor) -> torch.Tensor:
    return (x_u8.float() / 255.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


# ---------------------------------------------------------------------------------------- model

def build_model(num_classes: int = NUM_LETTER_CLASSES):
    """The registered ``vit-tiny-letters`` architecture at timm's default random init."""
    import timm

    return timm.create_model(SPEC.tag, pretrained=False, num_classes=num_classes,
                             **SPEC.model_kwargs)


def architecture(model) -> dict:
    """The timm ``VisionTransformer`` kwargs that describe ``model`` (for the JSON sidecar)."""
    return dict(img_size=int(model.patch_embed.img_size[0]),
                patch_size=int(model.patch_embed.patch_size[0]),
                in_chans=int(model.patch_embed.proj.in_channels), embed_dim=int(model.embed_dim),
                depth=len(model.blocks), num_heads=int(model.blocks[0].attn.num_heads),
                class_token=model.cls_token is not None, global_pool=model.global_pool)


def normalize(x: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """Images in [0, 1] → the backbone's input normalisation (the harness's mean/std)."""
    mean = torch.tensor(mean or SPEC.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std or SPEC.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def features(model, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Pooled (CLS, after the final norm) features of a ``num_classes=0`` model; float32 CPU."""
    model = model.eval()
    return torch.cat([model(normalize(x[i:i + batch_size])).float().cpu()
                      for i in range(0, len(x), batch_size)])


# ----------------------------------------------------------------------------------- evaluation

def linear_probe_accuracy(f_train, y_train, f_test, y_test, max_iter: int = 3000) -> float:
    """Logistic regression on standardised frozen features; test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=1.0))
    clf.fit(np.asarray(f_train), np.asarray(y_train))
    return float(clf.score(np.asarray(f_test), np.asarray(y_test)))


def evaluate(checkpoint=None, random_seeds=(0, 1, 2), log=print) -> dict:
    """Linear-probe accuracy on ``digits`` of the checkpoint (loaded as ``clbench run`` loads
    it) and of the same architecture at random init."""
    from clbench.digits_data import load_digits_tensors

    x_tr, y_tr, x_te, y_te = load_digits_tensors()

    def probe(model) -> dict:
        return {"linear_probe": linear_probe_accuracy(features(model, x_tr), y_tr,
                                                      features(model, x_te), y_te)}

    loaded = load_backbone(SPEC.name, checkpoint)
    results = {"pretrained": probe(loaded.model), "random_init": {}}
    log(f"pretrained ({loaded.source}): linear_probe={results['pretrained']['linear_probe']:.4f}")
    for seed in random_seeds:
        torch.manual_seed(seed)
        results["random_init"][str(seed)] = probe(build_model(num_classes=0))
        log(f"random init seed {seed}: "
            f"linear_probe={results['random_init'][str(seed)]['linear_probe']:.4f}")
    results["random_init_mean"] = {"linear_probe": float(np.mean(
        [r["linear_probe"] for r in results["random_init"].values()]))}
    results["protocol"] = ("frozen CLS features of clbench.digits_data.load_digits_tensors() "
                           "(checkpoint loaded by clbench.backbones.load_backbone); "
                           "StandardScaler + LogisticRegression(max_iter=3000), test accuracy")
    return results


# ---------------------------------------------------------------------------------- pretraining

def pretrain(out=DEFAULT_CHECKPOINT, *, steps: int = 3200, seed: int = 0, device: str = "cpu",
             batch_size: int = 128, pool_size: int = 104_000, val_size: int = 5_200,
             lr: float = 2e-3, weight_decay: float = 0.05, warmup_steps: int = 200,
             label_smoothing: float = 0.1, threads: int = 2, run_evaluation: bool = True,
             command: str = "", log=print) -> dict:
    """AdamW with linear warmup + cosine to 0, label smoothing, gradient clipping at 1, on a
    fixed pool of rendered letters; writes ``out`` (safetensors) and its JSON sidecar."""
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
    log(f"rendered {pool_size} + {val_size} letter images in {t_render:.1f}s")
    mean = torch.tensor(PRETRAIN_MEAN).view(1, 3, 1, 1).to(device)
    std = torch.tensor(PRETRAIN_STD).view(1, 3, 1, 1).to(device)

    def prep(xb_u8):
        return (to_float3(xb_u8).to(device) - mean) / std

    model = build_model(NUM_LETTER_CLASSES).to(device)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    def lr_at(step):
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps)
                                          / max(1, steps - warmup_steps)))

    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(pool_size, generator=gen), 0
    model.train()
    log_every, running = max(1, steps // 20), 0.0
    for step in range(steps):
        if pos + batch_size > pool_size:
            perm, pos = torch.randperm(pool_size, generator=gen), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = F.cross_entropy(model(prep(x_pool[idx])), y_pool[idx].to(device),
                               label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += float(loss.detach())
        if (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps}  loss {running / log_every:.4f}  "
                f"lr {lr_at(step):.2e}  {time.time() - t0:.0f}s")
            running = 0.0

    model.eval()
    with torch.no_grad():
        correct = sum(int((model(prep(x_val[i:i + 1024])).argmax(1).cpu()
                           == y_val[i:i + 1024]).sum()) for i in range(0, val_size, 1024))
    val_acc = correct / val_size
    wall = time.time() - t0
    log(f"letters val accuracy {val_acc:.4f}; training wall time {wall:.0f}s")

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={"format": "pt", "model": "vit-tiny-letters"})
    import PIL
    import timm

    meta = {
        "name": SPEC.name, "class": "timm.models.vision_transformer.VisionTransformer",
        "timm_tag": SPEC.tag, "arch_kwargs": architecture(model),
        "num_classes": NUM_LETTER_CLASSES, "classes": LETTERS,
        "feature_dim": int(model.embed_dim), "input_size": [3, IMAGE_SIZE, IMAGE_SIZE],
        "mean": list(PRETRAIN_MEAN), "std": list(PRETRAIN_STD),
        "pretraining": {
            "data": "Pillow-rendered printed Latin letters A-Z a-z (ImageFont.load_default, "
                    "Aileron Regular), random affine/thickening/blur/noise, 32x32 canvas "
                    "reduced to 8x8 (70%) or 10/12/16, upsampled to 16x16; white on black",
            "pool_size": pool_size, "steps": steps, "batch_size": batch_size, "seed": seed,
            "optimizer": "AdamW", "lr": lr, "weight_decay": weight_decay,
            "schedule": f"linear warmup {warmup_steps} steps + cosine to 0",
            "label_smoothing": label_smoothing, "grad_clip": 1.0, "device": device,
            "torch_threads": threads, "torch": torch.__version__, "timm": timm.__version__,
            "pillow": PIL.__version__,
            "pool_sha256": hashlib.sha256(x_pool.numpy().tobytes()).hexdigest(),
            "letters_val_accuracy": val_acc, "wall_time_s": round(wall, 1),
            "render_time_s": round(t_render, 1),
        },
        "command": command,
    }
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    if run_evaluation:
        meta["evaluation_digits"] = evaluate(out, log=log)
        sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {sidecar}")
    return meta


# ---------------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python scripts/pretrain_letters.py",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="pretrain vit-tiny-letters on rendered letters")
    p.add_argument("--out", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--steps", type=int, default=3200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pool-size", type=int, default=104_000)
    p.add_argument("--val-size", type=int, default=5_200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-eval", action="store_true")
    e = sub.add_parser("evaluate", help="digits linear probe: checkpoint vs random init")
    e.add_argument("--checkpoint", default=None, help="default: the shipped weights")
    e.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "pool_size", "val_size", "threads"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.cmd == "pretrain":
        pretrain(args.out, steps=args.steps, seed=args.seed, device=args.device,
                 batch_size=args.batch_size, pool_size=args.pool_size, val_size=args.val_size,
                 lr=args.lr, threads=args.threads, run_evaluation=not args.no_eval,
                 command="python scripts/pretrain_letters.py " + shlex.join(argv))
    else:
        torch.set_num_threads(args.threads)
        print(json.dumps(evaluate(args.checkpoint), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
