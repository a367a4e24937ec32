"""Input-subspace memory for gradient-projection methods (GPM / DualGPM), as InfLoRA's official
code computes it, plus a streaming accumulator of a layer's input second moments.

Per adapted layer the memory stores an orthonormal basis (D × k) of either

* the subspace spanned by old tasks' inputs ("remove" mode: new directions must avoid it), or
* its orthogonal complement ("retain" mode: new directions must lie inside it).

DualGPM switches a layer to "retain" once its "remove" basis exceeds D/2 columns, so no layer
ever stores more than D/2 vectors; plain GPM never switches.

Energy is measured on the singular values of the **second-moment matrix** S (squared, i.e. the
4th power of the data matrix's singular values) exactly as in the official ``update_DualGPM``,
not on the data matrix as in the GPM papers. Since sum(σ_i(A)²) = ||A||_F², the totals use
Frobenius norms instead of a second SVD (same numbers). All linear algebra runs in float64.
"""
from __future__ import annotations

import torch
from torch import nn

from clbench.precision import exact


def threshold(lambda_b: float, lambda_e: float, task: int, n_tasks: int) -> float:
    """ε_t = λ_b + (λ_e − λ_b)·t/T with the 0-based task index t (so ε_{T−1} < λ_e)."""
    return lambda_b + (lambda_e - lambda_b) * task / n_tasks


def _left_singular(matrix: torch.Tensor, full: bool = False):
    u, s, _ = torch.linalg.svd(matrix, full_matrices=full)
    return u, s


def project_out(second_moment: torch.Tensor, basis: torch.Tensor, retain: bool) -> torch.Tensor:
    """(I − MMᵀ)S in "remove" mode, M⊥M⊥ᵀS in "retain" mode (left side only, as official)."""
    basis = basis.to(second_moment)
    inside = basis @ (basis.T @ second_moment)
    return inside if retain else second_moment - inside


def design_down(second_moment: torch.Tensor, basis: torch.Tensor | None, retain: bool, rank: int,
                scale: float) -> torch.Tensor:
    """InfLoRA's designed down-projection: top-``rank`` left singular vectors of the projected
    second moment, as rows, times ``scale`` (official 1/√3). ``basis=None``: no projection."""
    matrix = second_moment.double()
    if basis is not None:
        matrix = project_out(matrix, basis, retain)
    u, _ = _left_singular(matrix)
    return u[:, :rank].T * scale


def first_basis(second_moment: torch.Tensor, eps: float) -> torch.Tensor:
    """After the first task: the k leading directions, k = #{cumulative energy share < ε} (≥ 1)."""
    u, s = _left_singular(second_moment.double())
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    k = max(int((share < eps).sum()), 1)
    return u[:, :k]


def extend_basis(second_moment: torch.Tensor, basis: torch.Tensor, eps: float) -> torch.Tensor:
    """"Remove" mode: add the residual's leading directions until the captured share ≥ ε."""
    s_mat = second_moment.double()
    basis = basis.to(s_mat)
    total = (s_mat**2).sum()
    residual = project_out(s_mat, basis, retain=False)
    u, s = _left_singular(residual)
    captured = float((total - (residual**2).sum()) / total)
    ratios = (s**2 / total).tolist()
    added = 0
    while added < len(ratios) and captured < eps:
        captured += ratios[added]
        added += 1
    if added == 0:
        return basis
    return torch.cat([basis, u[:, :added]], dim=1)[:, : s_mat.shape[0]]


def shrink_complement(second_moment: torch.Tensor, complement: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """"Retain" mode: drop the new task's leading directions from the complement while the
    share of energy still outside the protected space is ≥ 1 − ε."""
    s_mat = second_moment.double()
    complement = complement.to(s_mat)
    kept = complement.shape[1]
    if kept == 0:
        return complement
    total = (s_mat**2).sum()
    residual = project_out(s_mat, complement, retain=True)
    u, s = _left_singular(residual)
    outside = float((residual**2).sum() / total)
    ratios = (s**2 / total).tolist()
    removed = 0
    # Guard (not in the official loop): never remove more directions than the complement has.
    while removed < kept and outside >= 1 - eps:
        outside -= ratios[removed]
        removed += 1
    if removed == 0:
        return complement
    taken = u[:, :removed]
    rest = complement - taken @ (taken.T @ complement)
    u_rest, _ = _left_singular(rest, full=True)
    return u_rest[:, : kept - removed]


def complement_of(basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of span(basis)⊥: trailing columns of a full SVD."""
    u, _ = _left_singular(basis.double(), full=True)
    return u[:, basis.shape[1]:]


def spectral_basis(second_moment: torch.Tensor, share: float) -> torch.Tensor:
    """Leading singular vectors of S up to and including the first at which the cumulative
    share of the singular values themselves (not squared, unlike the GPM energies above)
    reaches ``share`` (the projection basis of Adam-NSCL-style optimisers, as in LoRA-Sub-DRS)."""
    u, s = _left_singular(second_moment.double())
    share_so_far = torch.cumsum(s, 0) / s.sum()
    k = min(int((share_so_far < share).sum()) + 1, u.shape[1])
    return u[:, :k]


class LayerMemory:
    """One layer's stored basis and mode; ``update`` applies one task's GPM/DualGPM step."""

    def __init__(self, dim: int, dual: bool = True):
        self.dim = dim
        self.dual = dual
        self.basis = torch.zeros(dim, 0, dtype=torch.float64)
        self.retain = False
        self.tasks_seen = 0

    def projection_basis(self) -> torch.Tensor | None:
        """What ``design_down`` projects with; ``None`` before any task (no projection)."""
        return self.basis if self.tasks_seen > 0 else None

    def update(self, second_moment: torch.Tensor, eps: float) -> None:
        if self.tasks_seen == 0:
            # Official: k ≥ D/2 after task 0 marks "retain" yet stores the leading vectors (a
            # bug, unreachable with its thresholds); here the switch rule below handles it.
            self.basis = first_basis(second_moment, eps)
        elif self.retain:
            self.basis = shrink_complement(second_moment, self.basis, eps)
        else:
            self.basis = extend_basis(second_moment, self.basis, eps)
        if self.dual and not self.retain and self.basis.shape[1] > self.dim / 2:
            self.basis = complement_of(self.basis)
            self.retain = True
        self.basis = self.basis.cpu()
        self.tasks_seen += 1

    def state(self) -> dict:
        return {"basis": self.basis.clone(), "retain": int(self.retain),
                "tasks_seen": self.tasks_seen}

    def load(self, state: dict) -> None:
        self.basis = state["basis"].double().cpu()
        self.retain = bool(state["retain"])
        self.tasks_seen = int(state["tasks_seen"])


class SecondMoments:
    """Context manager: forward pre-hooks on ``modules`` accumulate Σ x xᵀ over every input token
    and the token count — streaming, nothing stored. Each batch's Gram matrix is formed in
    float64 (autocast off) on the activations' device, not only summed in float64. (Not
    ``ClassStatistics``: these are per-token Gram matrices of every adapted layer, kept on the
    device, with no classes.)"""

    def __init__(self, modules: list[nn.Module]):
        self.modules = list(modules)
        self.sums: list[torch.Tensor | None] = [None] * len(self.modules)
        self.counts = [0] * len(self.modules)
        self._handles = []

    def _hook(self, index: int):
        def record(module, inputs):
            x = inputs[0].detach()
            flat = x.reshape(-1, x.shape[-1]).double()
            with exact(flat.device):
                gram = flat.T @ flat
            self.sums[index] = gram if self.sums[index] is None else self.sums[index] + gram
            self.counts[index] += flat.shape[0]
        return record

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook(i))
                         for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def matrices(self) -> list[torch.Tensor]:
        """S = (1/n) Σ x xᵀ per module (the uncentred second moment of its input tokens), summed
        over data-parallel ranks so every rank designs the same projection."""
        from clbench.distributed import all_reduce_sum

        result = []
        for total, n in zip(self.sums, self.counts):
            count = all_reduce_sum(torch.tensor(float(n), dtype=torch.float64, device=total.device))
            result.append(all_reduce_sum(total.clone()) / count)
        return result
