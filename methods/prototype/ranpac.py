"""RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual
Learning", NeurIPS 2023; official code RanPAC/RanPAC ``RanPAC.py``, ``inc_net.py``; also
LAMDA-PILOT ``models/ranpac.py``).

1. First task: the same first-session tuning as APER (parallel adapters, or SSF on ImageNet-R/A
   as in the official runs, + cosine head; SGD momentum 0.9, CosineAnnealingLR); then
   everything is frozen.
2. After the first task: a frozen random projection W ∈ R^{d×M}, entries N(0, 1), is drawn once;
   an image's feature is h = ReLU(f(x) W) with f the adapted backbone (one forward pass).
3. After every task: G += Σ h hᵀ and Q += Σ h yᵀ (one-hot y) over the task's training images,
   float64 sums (per-class sums of h through ``clbench.class_stats``, reduced over ranks); the
   ridge λ is chosen from 10^-8 … 10^8 by fitting on 80 % of the *current task's* images and
   measuring the mean squared error of the one-hot targets on the other 20 % (the official
   ``optimise_ridge_parameter``); the classifier is W_o = (G + λI)⁻¹ Q (``torch.linalg.solve``),
   logits = h W_o.

Per-benchmark settings (official ``args/*_publish.csv``, the PETL + RP rows, M = 10000): batch 48,
20 epochs, lr 0.01, wd 5e-4, min_lr 0 for CIFAR-100, CUB-200, ImageNet-R, ImageNet-A and
DomainNet alike; SSF on ImageNet-R and ImageNet-A, adapters (bottleneck 64, scale 0.1)
elsewhere. ``digits`` (tiny backbone, width 96): M = 1000 (the official M is 13× the ViT-B width; 10× here keeps G small) and bottleneck 8.

Deviations from the official code:
* the 20 % hold-out is a pseudo-random subset of the task's images (an integer hash of the pixels
  the statistics pass sees), not the tail of one shuffled pass, so with deterministic transforms
  the chosen λ — like G and Q — does not depend on batch order or the number of data-parallel
  ranks (under ``stats_transform="train"`` the hashed pixels are the augmented ones); the hold-out MSE is computed exactly from
  hold-out sums (Σ hhᵀ, Σ hyᵀ, count) instead of stored features, averaged over the task's
  classes (the official mean over all dataset classes differs by a constant factor); if a task
  has no image in one of the two parts (tiny tests), λ = 1;
* DomainNet's official row is a single 345-class session; its adapter recipe is used as is;
* none in the statistics' data: G and Q use the training images under the test transform, as
  the official ``train_loader_for_CPs`` (``stats_transform="train"``: the augmented training
  loader, an ablation);
* G, Q are float64 (official float32); the checkpoint therefore holds an M×M float64 matrix
  (800 MB at M = 10000);
* the backbone is the run's (official: ``vit_base_patch16_224`` or ``_in21k`` per dataset).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clbench.class_stats import ClassStatistics
from clbench.distributed import all_reduce_sum
from clbench.errors import UsageError
from clbench.methods.prototype.first_session import AdapterConfig, FirstSessionTuning
from clbench.registry import register_method

RIDGES = tuple(10.0 ** k for k in range(-8, 9))
HOLDOUT_PERMILLE = 200

_DEFAULT = dict(epochs=20, lr=0.01, batch_size=48, weight_decay=5e-4, min_lr=0.0, ffn_num=64,
                rp_dim=10000)
BENCHMARK_DEFAULTS = {name: _DEFAULT for name in ("cifar100", "cub200", "domainnet")}
BENCHMARK_DEFAULTS.update({name: dict(_DEFAULT, peft="ssf")  # SSF rows of the official csv
                           for name in ("imagenet-r", "imagenet-a")})
BENCHMARK_DEFAULTS["digits"] = dict(_DEFAULT, ffn_num=8, rp_dim=1000)


@dataclass
class RanPACConfig(AdapterConfig):
    rp_dim: int = 10000   # M; 0 = no projection (decorrelated prototypes on f(x) itself)

    def __post_init__(self):
        super().__post_init__()
        if self.rp_dim < 0:
            raise UsageError(f"rp_dim={self.rp_dim}: use a positive projection size, or 0 for none")


def holdout_mask(images: torch.Tensor) -> torch.Tensor:
    """True for the ≈20 % of images used to choose λ: an exact integer hash of the pixels (uint8
    as loaded, or ToTensor's floats scaled back to them), so the same pixels always fall on the
    same side whatever the batch they arrive in."""
    pixels = images.detach().flatten(1).cpu()
    if pixels.dtype != torch.uint8:
        pixels = torch.round(pixels.float() * 255)
    pixels = pixels.to(torch.int64)
    weights = torch.randint(1, 2**20, (pixels.shape[1],),
                            generator=torch.Generator().manual_seed(1993))
    return torch.remainder((pixels * weights).sum(1), 1000) < HOLDOUT_PERMILLE


def choose_ridge(g_fit, q_fit, g_val, q_val, n_val: float) -> float:
    """argmin over RIDGES of the hold-out MSE of W(λ) = (G_fit + λI)⁻¹ Q_fit, computed from
    hold-out sums: Σ‖hW − y‖² = tr(Wᵀ G_val W) − 2 tr(Wᵀ Q_val) + n_val."""
    eye = torch.eye(g_fit.shape[0], dtype=g_fit.dtype, device=g_fit.device)
    losses = []
    for ridge in RIDGES:
        w = torch.linalg.solve(g_fit + ridge * eye, q_fit)
        error = (w * (g_val @ w)).sum() - 2 * (w * q_val).sum() + n_val
        losses.append(float(error) / (n_val * q_fit.shape[1]))
    return RIDGES[min(range(len(losses)), key=losses.__getitem__)]


@register_method("ranpac", "RanPAC: first-task adapters, frozen random ReLU projection, ridge "
                           "regression on decorrelated class prototypes, 1 forward pass")
class RanPAC(FirstSessionTuning):
    Config = RanPACConfig
    forward_passes_per_image = 1

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        return dict(BENCHMARK_DEFAULTS.get(benchmark, _DEFAULT))

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        self.projection: torch.Tensor | None = None   # d × M, drawn after the first task
        self.gram: torch.Tensor | None = None          # Σ h hᵀ over all tasks, float64
        self.targets = None                            # ClassStatistics: Σ h per class = Qᵀ
        self.weights: torch.Tensor | None = None       # W_oᵀ, classes × M
        self.ridges: list[float] = []

    @property
    def rp_dim(self) -> int:
        return self.config.rp_dim or self.model.head.in_features

    def draw_projection(self) -> None:
        d = self.model.head.in_features
        if self.config.rp_dim:
            generator = torch.Generator().manual_seed(self.seed)
            self.projection = torch.randn(d, self.config.rp_dim, generator=generator).to(self.device)
        else:
            self.projection = None
        self.gram = torch.zeros(self.rp_dim, self.rp_dim, dtype=torch.float64)
        self.targets = ClassStatistics(self.rp_dim, second_moments=False)

    def projected(self, features: torch.Tensor) -> torch.Tensor:
        """h = ReLU(f W) in float32, outside autocast."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.float()
            if self.projection is None:
                return features
            return torch.relu(features @ self.projection)

    @torch.no_grad()
    def learn_without_gradients(self, task: int) -> None:
        if task == 0:
            self.draw_projection()
        self.accumulate_and_solve(self.statistics_loader(self.config.stats_transform))

    @torch.no_grad()
    def accumulate_and_solve(self, loader) -> None:
        """Add one task's Σhhᵀ and Σhyᵀ, pick λ on the task's hold-out, solve the ridge."""
        m, device = self.rp_dim, self.device
        gram_task = torch.zeros(m, m, dtype=torch.float64, device=device)
        gram_val = torch.zeros(m, m, dtype=torch.float64, device=device)
        validation = ClassStatistics(m, second_moments=False)
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in loader:
                images, labels = batch[0].to(device), batch[1]
                with torch.autocast(device_type=device.type, enabled=False):
                    h = self.projected(self.model.features(images)).double()
                held = holdout_mask(batch[0]).to(device)
                gram_task += h.T @ h
                gram_val += h[held].T @ h[held]
                self.targets.update(h, labels)
                validation.update(h[held.cpu()], labels[held.cpu()])
        finally:
            self.model.train(was_training)
        classes = self.new_classes
        gram_task, gram_val = all_reduce_sum(gram_task), all_reduce_sum(gram_val)
        self.targets.reduce(classes)
        validation.reduce(classes)

        new = slice(classes.start, classes.stop)
        q_task = self.targets.sum[new].T.to(device)
        q_val = validation.sum[new].T.to(device)
        n_val = float(validation.count[new].sum())
        n_fit = float(self.targets.count[new].sum()) - n_val
        if n_val > 0 and n_fit > 0:
            ridge = choose_ridge(gram_task - gram_val, q_task - q_val, gram_val, q_val, n_val)
        else:
            ridge = 1.0
        self.ridges.append(ridge)
        self.gram = self.gram.to(device) + gram_task
        self.solve(ridge)

    def solve(self, ridge: float) -> None:
        n = self.model.head.n_classes
        q = self.targets.sum[:n].T.to(self.gram.device)
        eye = torch.eye(self.rp_dim, dtype=torch.float64, device=self.gram.device)
        self.weights = torch.linalg.solve(self.gram + ridge * eye, q).T.float()

    def predict(self, images):
        h = self.projected(self.model.features(images))
        with torch.autocast(device_type=h.device.type, enabled=False):
            return h @ self.weights.T

    def task_info(self) -> dict:
        return {"ridge": self.ridges[-1] if self.ridges else None, "rp_dim": self.rp_dim}

    def extra_state(self) -> dict:
        state = super().extra_state()
        if self.gram is not None:
            projection = None if self.projection is None else self.projection.cpu()
            state.update(projection=projection, gram=self.gram.cpu(),
                         targets=self.targets.state_dict(), weights=self.weights.cpu(),
                         ridges=list(self.ridges))
        return state

    def restore_structure(self, state: dict) -> None:
        super().restore_structure(state)
        if "gram" in state:
            projection = state["projection"]
            self.projection = None if projection is None else projection.to(self.device)
            self.gram = state["gram"].to(self.device)
            self.targets = ClassStatistics(self.rp_dim, second_moments=False)
            self.targets.load_state_dict(state["targets"])
            self.weights = state["weights"].to(self.device)
            self.ridges = list(state["ridges"])
