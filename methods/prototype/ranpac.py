"""RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual
Learning", NeurIPS 2023; official code RanPAC/RanPAC ``RanPAC.py``, ``inc_net.py``; also
LAMDA-PILOT ``models/ranpac.py``).

First task: the same first-session tuning as APER (adapters or SSF + cosine head), then
everything is frozen. An image's feature is h = ReLU(f(x) W) with a frozen random projection
W ∈ R^{d×M}; after every task G += Σ h hᵀ and Q += Σ h yᵀ (float64 sums over the task's training
images) and the classifier is the ridge solution W_o = (G + λI)⁻¹ Q, with λ chosen on a hold-out
of the current task's images.

Recipe, sources and deviations: docs/methods/prototype.md
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clbench.class_stats import ClassStatistics
from clbench.distributed import all_reduce_sum
from clbench.errors import UsageError
from clbench.methods.prototype.first_session import AdapterConfig, FirstSessionTuning
from clbench.precision import exact
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

    recipes = BENCHMARK_DEFAULTS
    fallback_recipe = _DEFAULT

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
        with exact(features.device):
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
                with exact(device):
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
        with exact(h.device):
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
