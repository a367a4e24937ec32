"""Backbone short names → full timm weight tags, and the one loader every run goes through.

Always the full tag: bare timm names have silently changed weights between releases (in timm
>= 0.9 ``vit_base_patch16_224`` means the augreg2 weights, which none of the baselines' codes
loaded) — a known cause of "cannot reproduce the paper" reports. Any other timm name is accepted
as is. ``--checkpoint FILE`` goes through timm's own pretrained-weights path
(``pretrained_cfg_overlay=dict(file=...)``, loaded with ``weights_only=True``), so the head is
dropped and position embeddings resampled exactly as for hub weights; since timm then loads
non-strictly, a file missing any of the model's tensors is refused rather than left partly random.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from clbench.errors import UsageError

ASSETS = Path(__file__).parent / "assets"
UNIT_RANGE = None  # pixels fed in [0, 1], no normalisation (what the official codes do)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    tag: str
    description: str
    mean: tuple[float, ...] | None = UNIT_RANGE
    std: tuple[float, ...] | None = UNIT_RANGE
    model_kwargs: dict = field(default_factory=dict)
    file: Path | None = None  # weights shipped with the package


def _letters_spec() -> BackboneSpec:
    import json

    meta_path = ASSETS / "vit-tiny-letters.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return BackboneSpec(
        name="vit-tiny-letters",
        tag="vit_tiny_patch16_224",
        description="tiny ViT (16×16 input, patch 4, width 96, depth 4) pretrained on rendered "
                    "printed letters; ships with clbench, default for `digits`",
        mean=tuple(meta.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(meta.get("std", (0.5, 0.5, 0.5))),
        model_kwargs=dict(img_size=16, patch_size=4, embed_dim=96, depth=4, num_heads=3),
        file=ASSETS / "vit-tiny-letters.safetensors",
    )


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec for spec in [
        BackboneSpec("vit-b16-in21k-ft-in1k", "vit_base_patch16_224.augreg2_in21k_ft_in1k",
                     "ViT-B/16 IN-21k → IN-1k (augreg2); what the SD-LoRA official code loads"),
        BackboneSpec("vit-b16-augreg-in21k-ft-in1k", "vit_base_patch16_224.augreg_in21k_ft_in1k",
                     "ViT-B/16 IN-21k → IN-1k (augreg); CODA-Prompt and the L2P PyTorch port"),
        BackboneSpec("vit-b16-in21k", "vit_base_patch16_224.augreg_in21k",
                     "ViT-B/16 IN-21k only; what InfLoRA loads"),
        BackboneSpec("vit-b16-dino", "vit_base_patch16_224.dino",
                     "ViT-B/16 self-supervised DINO; the SD-LoRA paper's second backbone"),
        _letters_spec(),
    ]
}


@dataclass
class LoadedBackbone:
    model: object  # timm VisionTransformer with num_classes=0
    spec: BackboneSpec
    feature_dim: int
    input_size: int
    weights_sha256: str
    source: str  # "hub", "package file" or the checkpoint path

    def describe(self) -> dict:
        return {"name": self.spec.name, "tag": self.spec.tag, "source": self.source,
                "weights_sha256": self.weights_sha256, "feature_dim": self.feature_dim,
                "input_size": self.input_size, "mean": self.spec.mean, "std": self.spec.std,
                "model_kwargs": self.spec.model_kwargs}


def spec_for(name: str) -> BackboneSpec:
    if name in BACKBONES:
        return BACKBONES[name]
    import timm

    base = name.split(".")[0]
    if not timm.is_model(base):
        import difflib

        close = difflib.get_close_matches(name, list(BACKBONES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown backbone {name!r}.{hint} Use one of {', '.join(BACKBONES)} "
                         "or any timm model name (timm.list_models())")
    return BackboneSpec(name, name, "timm model")


def weights_hash(model) -> str:
    """SHA-256 over the parameters and buffers in state-dict order: proves two runs used the same weights."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def input_size(spec: BackboneSpec) -> int:
    """The model's input resolution, known without building it (data can be checked first)."""
    if "img_size" in spec.model_kwargs:
        return int(spec.model_kwargs["img_size"])
    import timm

    config = timm.get_pretrained_cfg(spec.tag)
    return int(config.input_size[-1]) if config is not None else 224


def load_backbone(name: str, checkpoint: str | Path | None = None) -> LoadedBackbone:
    """Create the timm model for ``name`` with pretrained weights and no classifier head."""
    import timm

    spec = spec_for(name)
    file = Path(checkpoint) if checkpoint else spec.file
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UsageError(f"checkpoint {checkpoint} not found: pass an existing .safetensors or .pth file")
    kwargs = dict(pretrained=True, num_classes=0, **spec.model_kwargs)
    if file is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(file), hf_hub_id=None, url=None,
                                                custom_load=False)  # a state dict, never .npz
        source = str(file) if checkpoint else "package file"
        try:
            with _recording_loads() as loads:
                model = timm.create_model(spec.tag, **kwargs)
        except Exception as exc:  # corrupt or foreign checkpoint
            raise UsageError(f"cannot load checkpoint {file} into {spec.tag} ({_problem(exc)}); "
                             f"{EXPECTED_CHECKPOINT}") from None
        # timm drops the classifier and then loads non-strictly: a state dict of some other
        # model would leave every weight randomly initialised without an error.
        missing = [key for module, result in loads if module is model for key in result.missing_keys]
        if missing:
            total = len(model.state_dict())
            raise UsageError(f"checkpoint {file} does not hold the weights of {spec.tag} "
                             f"({len(missing)} of {total} tensors missing, e.g. {missing[0]}): "
                             "pass weights saved from that architecture, or choose the matching "
                             "--backbone")
    else:
        source = "hub"
        model = _create_from_hub(timm, spec.tag, kwargs)
    model.eval()
    return LoadedBackbone(model=model, spec=spec, feature_dim=model.num_features,
                          input_size=int(model.patch_embed.img_size[0]),
                          weights_sha256=weights_hash(model), source=source)


EXPECTED_CHECKPOINT = ("expected the backbone's weights as a .safetensors file, or a .pth/.bin "
                       "state dict of tensors (torch.save(model.state_dict(), path))")


def _problem(exc: Exception) -> str:
    """What is wrong with a checkpoint file, in clbench's terms: torch's advice to retry with
    ``weights_only=False`` is not an option clbench offers (it never unpickles code)."""
    text = str(exc).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds pickled Python objects, not only tensors; clbench does not unpickle them"
    first = text.splitlines()[0][:160] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@contextlib.contextmanager
def _recording_loads():
    """Record every ``load_state_dict`` result while timm builds a model (its missing keys)."""
    import torch

    original = torch.nn.Module.load_state_dict
    loads = []

    def recording(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        loads.append((self, result))
        return result

    torch.nn.Module.load_state_dict = recording
    try:
        yield loads
    finally:
        torch.nn.Module.load_state_dict = original


def _create_from_hub(timm, tag: str, kwargs: dict):
    """Use the local Hugging Face cache first; go online only when the hub answers (fail fast)."""
    offline_before = os.environ.get("HF_HUB_OFFLINE")
    advice = (f"no cached weights for {tag} and the Hugging Face hub is unreachable: run once with "
              f"internet (python -c \"import timm; timm.create_model('{tag}', pretrained=True)\"), "
              "pass its weights with --checkpoint FILE, or use the embedded backbone with "
              "--backbone vit-tiny-letters (no download)")
    try:
        os.environ["HF_HUB_OFFLINE"] = "1"
        import huggingface_hub.constants as hf_constants
        hf_constants.HF_HUB_OFFLINE = True
        try:
            return timm.create_model(tag, **kwargs)
        except Exception:
            pass
    finally:
        if offline_before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline_before
        hf_constants.HF_HUB_OFFLINE = offline_before in ("1", "true", "yes")
    if not _hub_reachable():
        raise UsageError(advice)
    return timm.create_model(tag, **kwargs)


def architecture(spec: BackboneSpec) -> tuple[int, int]:
    """(depth, embed_dim) of the backbone, read off a weightless model on the meta device, so
    method options can be checked against it before anything loads."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(spec.tag, pretrained=False, num_classes=0, **spec.model_kwargs)
    return len(getattr(model, "blocks", ())), int(model.num_features)
