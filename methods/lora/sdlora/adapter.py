"""SD-LoRA's decoupled low-rank components on the q and v slices of every block's fused ``qkv``.

One adapted slice (a block's q or v) holds a stack of low-rank components ``B_k A_k``
(code layout: ``A_k`` is (r_k, d), ``B_k`` is (d, r_k)). Its weight delta is

    ΔW = Σ_k  (α[task_k] + offset_k) · inv_norm_k · B_k A_k

* ``α`` is ONE vector of magnitudes, one scalar per task, shared by every block and by q and v
  (``Magnitudes``, owned by the model; adapters only reference it);
* ``inv_norm_k`` turns ``B_k A_k`` into a direction: 1/(‖B_k‖_F‖A_k‖_F) (official code) or
  1/‖B_k A_k‖_F (paper Eq. 3); 1 for the component being trained (the official code leaves it
  raw; normalising a zero-initialised B would be 0/0);
* ``offset_k`` is 0 except after SD-LoRA-KD absorbed a later direction of this slice into it.

Old components live in buffers stacked per slice ((Σr, d) and (d, Σr)) with a per-column task
index, norm coefficient and offset, all fixed within a task. A training step therefore costs one
gather of ``α`` and one stacked product, whatever the number of tasks: ``_MergedLowRank`` folds
the scaled stack into the qkv weight (one (d,Σr)·(Σr,d) product) so the forward is a single
``F.linear``, and its backward computes the magnitude and current-factor gradients from two
(N,d)·(d,Σr) products instead of autograd's dense weight gradient. For evaluation the core calls
``merge()`` (``QKVAdapter``): inference then costs exactly one plain backbone forward.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from clbench.adapters import SLICE_INDEX, QKVAdapter, install_qkv_adapters
from clbench.precision import exact

NORMS = ("factor_product", "frobenius")


def component_norm(A: torch.Tensor, B: torch.Tensor, norm: str) -> float:
    """‖B‖_F·‖A‖_F (official code) or ‖BA‖_F (paper Eq. 3), without forming the d×d product."""
    A64, B64 = A.detach().double(), B.detach().double()
    if norm == "factor_product":
        return float(torch.linalg.norm(B64) * torch.linalg.norm(A64))
    if norm == "frobenius":  # ‖BA‖² = tr(BᵀB·AAᵀ)
        return math.sqrt(max(float(((B64.T @ B64) * (A64 @ A64.T)).sum()), 0.0))
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class Magnitudes(nn.Module):
    """The magnitudes α_1..α_t: one scalar per task for the whole network (a single Parameter)."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(0))

    def set(self, values: torch.Tensor) -> None:
        self.alpha = nn.Parameter(values.detach().clone().to(self.alpha.device, self.alpha.dtype))


class _MergedLowRank(torch.autograd.Function):
    """``F.linear(x, W + Σ_targets B·diag(c)·A on the target rows, bias)`` with cheap gradients.

    Per target: ``A`` (R, d), ``B`` (d, R), coefficients ``c`` (R,); only the last ``n_train``
    columns (the current component) need factor gradients. Gradients: x through the merged weight
    (what the frozen layer costs anyway); c_j = Σ_tokens (g B)_j (x Aᵀ)_j; current A and B from
    the same two (N, R) products. ``meta`` holds (row_start, n_train) per target.

    Under autocast the merged weight is still summed in the weights' dtype; the token products
    run in the incoming gradient's dtype (bf16), and every returned gradient has its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, meta, *factors):
        merged = weight.detach().clone()
        dim = weight.shape[1]
        with exact(x.device):
            for (start, _), i in zip(meta, range(0, len(factors), 3)):
                A, B, c = factors[i:i + 3]
                merged[start:start + dim].addmm_(B * c, A)
        ctx.meta = meta
        ctx.save_for_backward(x, merged, *factors)
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, merged, *factors = ctx.saved_tensors
        dim = merged.shape[1]
        low = grad_out.dtype  # bf16 under autocast; otherwise the weights' dtype (no casts)
        grad_x = (grad_out @ merged.to(low)).to(x.dtype) if ctx.needs_input_grad[0] else None
        x2 = x.reshape(-1, dim).to(low)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grads = []
        for k, ((start, n_train), i) in enumerate(zip(ctx.meta, range(0, len(factors), 3))):
            A, B, c = factors[i:i + 3]
            need_A, need_B, need_c = ctx.needs_input_grad[4 + i:7 + i]
            if not (need_A or need_B or need_c):
                grads += [None, None, None]
                continue
            g = g2[:, start:start + dim]
            gB = (g @ B.to(low)).to(c.dtype)        # (N, R)
            xA = (x2 @ A.to(low).T).to(c.dtype)     # (N, R)
            grad_c = (gB * xA).sum(0) if need_c else None
            grad_A = grad_B = None
            if n_train and need_A:
                grad_A = torch.zeros_like(A)
                grad_A[-n_train:] = ((gB[:, -n_train:] * c[-n_train:]).T.to(low) @ x2).to(A.dtype)
            if n_train and need_B:
                grad_B = torch.zeros_like(B)
                # (yᵀg)ᵀ, not gᵀy: BLAS is several times faster with the strided g on the right
                grad_B[:, -n_train:] = ((xA[:, -n_train:] * c[-n_train:]).T.to(low) @ g).T.to(B.dtype)
            grads += [grad_A, grad_B, grad_c]
        return (grad_x, None, None, None, *grads)


class DecoupledSlice(nn.Module):
    """The components of one adapted projection (one block's q or v)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("A", torch.zeros(0, dim))
        self.register_buffer("B", torch.zeros(dim, 0))
        self.register_buffer("col_task", torch.zeros(0, dtype=torch.long))
        self.register_buffer("col_inv_norm", torch.zeros(0))
        self.register_buffer("col_offset", torch.zeros(0))
        self.register_parameter("A_cur", None)  # the pair being trained, (r, d) and (d, r)
        self.register_parameter("B_cur", None)
        self.cur_task = -1

    # -- structure
    def components(self) -> list[list[int]]:
        """[task, rank] of every stored (frozen) component, in order."""
        if self.col_task.numel() == 0:
            return []
        tasks, counts = torch.unique_consecutive(self.col_task, return_counts=True)
        return [[int(t), int(n)] for t, n in zip(tasks, counts)]

    def spans(self):
        start = 0
        for task, rank in self.components():
            yield task, slice(start, start + rank)
            start += rank

    def allocate(self, components: list[list[int]]) -> None:
        """Empty buffers shaped for ``components`` (resume: load_state_dict fills them)."""
        total = sum(rank for _, rank in components)
        like = self.A
        self.A = like.new_zeros(total, self.dim)
        self.B = like.new_zeros(self.dim, total)
        self.col_task = torch.tensor([t for t, r in components for _ in range(r)],
                                     dtype=torch.long, device=like.device)
        self.col_inv_norm = like.new_ones(total)
        self.col_offset = like.new_zeros(total)

    def start(self, task: int, rank: int) -> None:
        """New trainable pair: A as nn.Linear's default init (kaiming-uniform a=√5), B = 0."""
        device, dtype = self.A.device, self.A.dtype
        A = torch.empty(rank, self.dim, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.A_cur = nn.Parameter(A)
        self.B_cur = nn.Parameter(torch.zeros(self.dim, rank, device=device, dtype=dtype))
        self.cur_task = task

    def freeze_current(self) -> None:
        """Append the trained pair to the frozen stack, raw (coefficient α_t alone)."""
        rank = self.A_cur.shape[0]
        self.A = torch.cat([self.A, self.A_cur.detach()])
        self.B = torch.cat([self.B, self.B_cur.detach()], dim=1)
        self.col_task = torch.cat([self.col_task, self.col_task.new_full((rank,), self.cur_task)])
        self.col_inv_norm = torch.cat([self.col_inv_norm, self.col_inv_norm.new_ones(rank)])
        self.col_offset = torch.cat([self.col_offset, self.col_offset.new_zeros(rank)])
        self.drop_current()

    def drop_current(self) -> None:
        self.A_cur = None
        self.B_cur = None
        self.cur_task = -1

    def normalize(self, norm: str) -> None:
        """Once per task: every stored component becomes a direction under ``norm``."""
        inv = self.col_inv_norm.clone()
        for _, cols in self.spans():
            n = component_norm(self.A[cols], self.B[:, cols], norm)
            inv[cols] = 1.0 / n if n > 0 else 0.0  # an all-zero component stays zero
        self.col_inv_norm = inv

    # -- per step
    def factors(self, alpha: torch.Tensor):
        """Stacked (A, B, coefficients) over stored + current components, and the current rank."""
        coef = (alpha[self.col_task] + self.col_offset) * self.col_inv_norm
        if self.A_cur is None:
            return self.A, self.B, coef, 0
        rank = self.A_cur.shape[0]
        A = torch.cat([self.A, self.A_cur])
        B = torch.cat([self.B, self.B_cur], dim=1)
        coef = torch.cat([coef, alpha[self.cur_task].expand(rank)])
        return A, B, coef, rank

    def delta_weight(self, alpha: torch.Tensor) -> torch.Tensor | None:
        A, B, coef, _ = self.factors(alpha)
        return (B * coef) @ A if A.shape[0] else None

    # -- SD-LoRA-KD
    def directions(self) -> list[torch.Tensor]:
        """The stored components as dense directions D_k (float64, CPU)."""
        A, B, inv = self.A.detach().double().cpu(), self.B.detach().double().cpu(), self.col_inv_norm.double().cpu()
        return [(B[:, cols] * inv[cols]) @ A[cols] for _, cols in self.spans()]

    def absorb(self, coefficients: torch.Tensor) -> None:
        """Add ``coefficients[k]`` to component k's offset (per slice) and drop the current pair."""
        offset = self.col_offset.clone()
        for (_, cols), value in zip(self.spans(), coefficients.tolist()):
            offset[cols] += value
        self.col_offset = offset
        self.drop_current()


def least_squares_fit(new: torch.Tensor, old: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """argmin_c ‖vec(new) − Σ c_k vec(old_k)‖ (float64, SVD-based so rank-deficient stacks are
    fine) and the plain Frobenius residual, computed explicitly (Algorithm 1 compares it to τ)."""
    P = torch.stack([d.reshape(-1) for d in old], dim=1).double()
    target = new.reshape(-1, 1).double()
    coefficients = torch.linalg.lstsq(P, target, driver="gelsd").solution
    residual = float(torch.linalg.norm(target - P @ coefficients))
    return coefficients.reshape(-1), residual


class SDLoRAQKV(QKVAdapter):
    """Decoupled low-rank components on the q and v slices of one block's fused qkv."""

    def __init__(self, qkv: nn.Linear, magnitudes: Magnitudes, targets=("q", "v")):
        super().__init__(qkv, targets)
        self.slices = nn.ModuleDict({t: DecoupledSlice(self.dim) for t in self.targets})
        # A reference, not a submodule: the one Magnitudes module is owned by the model.
        object.__setattr__(self, "magnitudes", magnitudes)

    def slice_delta(self, x, target):
        """Low-rank reference path (x Aᵀ)(B·c)ᵀ; ``unmerged_forward`` uses the faster fused path."""
        A, B, coef, _ = self.slices[target].factors(self.magnitudes.alpha)
        return F.linear(F.linear(x, A), B * coef) if A.shape[0] else None

    def slice_delta_weight(self, target):
        return self.slices[target].delta_weight(self.magnitudes.alpha)

    def unmerged_forward(self, x):
        """W + Σ scaled components folded per call (``_MergedLowRank``): one linear, cheap grads."""
        meta, factors = [], []
        alpha = self.magnitudes.alpha
        for target in self.targets:
            A, B, coef, n_train = self.slices[target].factors(alpha)
            if A.shape[0]:
                meta.append((SLICE_INDEX[target] * self.dim, n_train))
                factors += [A, B, coef]
        if not meta:
            return self.qkv(x)
        return _MergedLowRank.apply(x, self.qkv.weight, self.qkv.bias, tuple(meta), *factors)


class DecoupledLoRA:
    """The whole network's SD-LoRA state: adapters on every block plus the shared magnitudes.

    Task boundaries (the strategy calls them): ``begin_task`` normalises the previous component,
    sets the magnitudes (reset to ``init`` for every task, as the official code does, or carried
    over with a new one at ``init``) and opens a new pair per slice; ``end_task`` optionally runs
    the SD-LoRA-KD fit per slice and freezes (or absorbs) the trained pair.
    """

    def __init__(self, model: nn.Module, targets=("q", "v")):
        self.magnitudes = Magnitudes()
        self.adapters: list[SDLoRAQKV] = install_qkv_adapters(
            model.backbone, lambda i, qkv: SDLoRAQKV(qkv, self.magnitudes, targets))

    def slices(self):
        for adapter in self.adapters:
            yield from adapter.slices.values()

    @property
    def n_tasks(self) -> int:
        return self.magnitudes.alpha.numel()

    def begin_task(self, task: int, rank: int, norm: str, reset_magnitudes: bool, init: float) -> None:
        if task != self.n_tasks:
            raise RuntimeError(f"task {task} begins but {self.n_tasks} magnitudes exist")
        for s in self.slices():
            s.normalize(norm)
        old = self.magnitudes.alpha.detach()
        if reset_magnitudes:
            values = torch.full((task + 1,), init)
        else:
            values = torch.cat([old.cpu(), torch.tensor([init])])
        self.magnitudes.set(values)
        for s in self.slices():
            s.start(task, rank)

    @torch.no_grad()
    def end_task(self, kd_threshold: float | None, norm: str) -> dict:
        """Freeze the trained pairs; with ``kd_threshold``, first try to absorb each into the
        slice's old directions (least squares, Frobenius residual ≤ τ)."""
        absorbed, residuals = 0, []
        alpha = self.magnitudes.alpha.detach()
        for s in self.slices():
            if s.A_cur is None:
                continue
            if kd_threshold is not None and s.components():
                n_t = component_norm(s.A_cur, s.B_cur, norm)
                if n_t > 0:
                    new = (s.B_cur.detach().double().cpu() @ s.A_cur.detach().double().cpu()) / n_t
                    coefficients, residual = least_squares_fit(new, s.directions())
                else:  # a zero component: dropping it changes nothing
                    coefficients, residual = torch.zeros(len(s.components()), dtype=torch.float64), 0.0
                residuals.append(residual)
                if residual <= kd_threshold:
                    # Exact substitution of the term as evaluated now: α_t·B A = α_t·n_t·D_t.
                    s.absorb(coefficients * float(alpha[s.cur_task]) * n_t)
                    absorbed += 1
                    continue
            s.freeze_current()
        info = {"kd_absorbed": absorbed, "kd_fitted": len(residuals)}
        if residuals:
            info["kd_residual_min"] = min(residuals)
            info["kd_residual_max"] = max(residuals)
        return info

    # -- checkpoints
    def structure(self) -> dict:
        return {"n_tasks": self.n_tasks,
                "components": [[s.components() for s in adapter.slices.values()]
                               for adapter in self.adapters]}

    def rebuild(self, structure: dict) -> None:
        self.magnitudes.set(torch.zeros(structure["n_tasks"]))
        for adapter, per_slice in zip(self.adapters, structure["components"]):
            for s, components in zip(adapter.slices.values(), per_slice):
                s.drop_current()
                s.allocate(components)

    def stored_directions(self) -> int:
        return sum(len(s.components()) for s in self.slices())
