"""Numerical Pruning (Shen et al., AAAI'25, arXiv 2412.12441; docs/methods.md §4).

Scores live on the *reader* of each unit (o_proj / out_proj for heads, down_proj / fc2 for MLP
neurons, Mamba's out_proj for inner channels). With the reader's weight ``W`` [d_out, D] (PyTorch
orientation) and its calibration inputs ``X`` [N, D], the relaxed-mask objective (§4.2, Eq. 3)

    min_z  1/2 sum_i ||X W_i - X (z * W_i)||^2 + lam/2 (1^T z - r)^2,        r = (1 - rho) D

is a quadratic with ``K = (W^T W) o (X^T X)``: gradient ``g = K (z - 1) + lam (1^T z - r) 1`` and
Hessian ``H_N = K + lam 1 1^T`` (constant). Newton's method (Algorithm 1, T = 50 in the paper)
therefore lands on the optimum in one step from any start:

    z* = 1 - kappa K^-1 1,     kappa = lam (D - r) / (1 + lam 1^T K^-1 1)                 (closed form)

Heads average their channels' z (§4.3). The paper leaves open whether z is clipped to [0, 1] between
Newton steps; ``solver: newton`` with ``clip: true`` is that variant (then T matters). ``lam`` is not
given in the paper [U]: here it is relative to ``mean(diag K)`` (scale-free), and it only changes
cross-module comparisons, not the ranking inside a module. ``K`` is damped by ``score_damp * mean(diag K)``.

Allocation (§4.3; PruneLab's decision): ``global`` sorts all heads and channels of all blocks by score
and removes the lowest until the removed attention + MLP parameters are closest to ``ratio`` (a head
counts all its parameters, a channel its own); ``alpha`` is the paper's literal reading (head scores
scaled by ``alpha`` = parameters per head / parameters per channel, ``4 D_h / 3`` for LLaMA, and the
threshold at the ``ratio`` quantile of *units*, so the parameter ratio is not guaranteed); ``uniform``
removes ``ratio`` of each block's heads and channels.

Compensation (§4.4, Theorem 3): before a reader loses input columns ``P``, the remaining columns take
the optimal update ``W <- W - W[:, P] (S_PP)^-1 S_P,:`` with ``S = (2 X^T X + gamma I)^-1`` (gamma =
``percdamp * mean diag``): the least-squares refit of the kept columns to the dense output. Its inputs
come from a second, sequential pass over the already-pruned blocks (``compensation_inputs: pruned``,
default; whether the paper uses dense or pruned inputs is open [U]) or from the scoring pass on the
dense model (``dense``: no second pass, the Grams of every block are kept in host memory meanwhile).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import register
from .engine import walk_blocks
from .resume import resume_walk
from .stats import Hessian, damped_inverse_cholesky
from .structured import StructuredPruner, global_keep, reader_taps, unit_mean


def numerical_kernel(weight: torch.Tensor, gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``K = (W^T W) o (X^T X) + damp * mean(diag K) I`` for a reader weight ``W`` [d_out, D] (§4.2)."""
    W = weight.to(gram.dtype)
    K = (W.T @ W) * gram
    mean_diag = torch.diagonal(K).mean().clamp_min(torch.finfo(K.dtype).tiny)
    return K + damp * mean_diag * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)


def _kinv_ones(K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    L = torch.linalg.cholesky(K)
    ones = torch.ones(K.shape[0], 1, dtype=K.dtype, device=K.device)
    return L, torch.cholesky_solve(ones, L).squeeze(1)


def numerical_score_closed_form(K: torch.Tensor, r: float, lam: float) -> torch.Tensor:
    """``z* = 1 - kappa K^-1 1``, ``kappa = lam_abs (D - r) / (1 + lam_abs 1^T K^-1 1)``, lam_abs = lam * mean diag K."""
    D = K.shape[0]
    lam_abs = lam * torch.diagonal(K).mean()
    _, u = _kinv_ones(K)
    kappa = lam_abs * (D - r) / (1 + lam_abs * u.sum())
    return 1 - kappa * u


def numerical_score_newton(K: torch.Tensor, r: float, lam: float, iterations: int = 50, clip: bool = False,
                           z0: torch.Tensor | None = None) -> torch.Tensor:
    """Algorithm 1: ``z <- z - H_N^-1 g`` for ``iterations`` steps (optionally clipped to [0, 1] after each).

    ``H_N = K + lam 1 1^T`` is constant: K is factorized once and ``H_N^-1`` applied by Sherman-Morrison.
    The start is the dense mask ``z0 = 1`` unless given.
    """
    D = K.shape[0]
    lam_abs = lam * torch.diagonal(K).mean()
    L, u = _kinv_ones(K)
    z = torch.ones(D, dtype=K.dtype, device=K.device) if z0 is None else z0.to(K.dtype).clone()
    for _ in range(iterations):
        g = K @ (z - 1) + lam_abs * (z.sum() - r)
        kinv_g = torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
        step = kinv_g - u * (lam_abs * kinv_g.sum() / (1 + lam_abs * u.sum()))
        z = z - step
        if clip:
            z = z.clamp(0.0, 1.0)
    return z


def compensate_column_removal(weight: torch.Tensor, hessian: torch.Tensor, prune_cols: torch.Tensor,
                              percdamp: float = 0.01) -> tuple[torch.Tensor, float]:
    """Theorem 3: ``W - W[:, P] (S_PP)^-1 S_P,:`` with ``S = (H + gamma I)^-1``; returns (W, loss
    ``1/2 tr(W_P S_PP^-1 W_P^T)``). Only the kept columns of the result are meaningful. Damping and dead
    inputs as everywhere (:func:`pruners.stats.damped_inverse_cholesky`)."""
    U, _ = damped_inverse_cholesky(hessian.double(), percdamp)
    S = U.T @ U
    P = prune_cols.to(S.device)
    W = weight.double()
    W_P = W[:, P]
    coef = torch.linalg.solve(S[P][:, P], W_P.T).T  # W_P S_PP^-1   [d_out, |P|]
    updated = W - coef @ S[P]
    loss = 0.5 * float((coef * W_P).sum())
    return updated.to(weight.dtype), loss


@register
@dataclass
class Numerical(StructuredPruner):
    name = "numerical"
    statistic = Hessian  # the reader's Gram X^T X (as 2/N X^T X: the scale cancels in every relative damping)
    allocations = ("global", "alpha", "uniform")
    solver: str = "closed_form"  # closed_form | newton (Algorithm 1; = closed form after one step without clip)
    iterations: int = 50  # Newton steps (the paper's T)
    clip: bool = False  # clip z to [0, 1] after each Newton step (the paper leaves it open)
    lam: float = 1.0  # constraint weight, relative to mean(diag K) (not given in the paper)
    score_damp: float = 0.01  # damping of K, relative to mean(diag K)
    allocation: str = "global"  # global (parameter-weighted) | alpha (paper's literal Eq. 7-8) | uniform
    compensate: bool = True  # Theorem 3 update of o_proj / down_proj (fc2, out_proj) before removal
    percdamp: float = 0.01  # gamma of the compensation, relative to mean(diag 2 X^T X)
    compensation_inputs: str = "pruned"  # pruned (second sequential pass) | dense (the scoring pass's Grams)
    attention_unit: str = "kv_group"  # kv_group (whole GQA groups; = heads without GQA) | query_head
    min_units: int = 1  # units of each kind every block keeps

    @property
    def keeps_statistics(self) -> bool:
        return self.compensate and self.compensation_inputs == "dense"

    def check(self, pattern):
        super().check(pattern)
        if self.solver not in ("closed_form", "newton"):
            raise ValueError(f"pruner.solver='{self.solver}' is not one of: closed_form, newton")
        if self.compensation_inputs not in ("pruned", "dense"):
            raise ValueError(f"pruner.compensation_inputs='{self.compensation_inputs}' is not one of: pruned, dense")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"pruner.iterations={self.iterations} must be an integer >= 1")
        for key in ("lam", "score_damp", "percdamp"):
            if getattr(self, key) < 0:
                raise ValueError(f"pruner.{key}={getattr(self, key)} must be >= 0")

    def channel_scores(self, weight: torch.Tensor, gram: torch.Tensor, ratio: float) -> torch.Tensor:
        K = numerical_kernel(weight, gram.double(), self.score_damp)
        r = (1 - ratio) * K.shape[0]
        if self.solver == "newton":
            return numerical_score_newton(K, r, self.lam, self.iterations, self.clip)
        return numerical_score_closed_form(K, r, self.lam)

    def unit_scores(self, block, group, stat, pattern):
        reader = block.get_submodule(group.reader)
        return unit_mean(self.channel_scores(reader.weight.data, stat.matrix, pattern.ratio), group)

    def allocate(self, scores, params, pattern, protected):
        if self.allocation != "alpha":
            return super().allocate(scores, params, pattern, protected)
        # Eq. 7-8 as printed: head scores scaled by alpha, threshold at the ratio quantile of units
        smallest = min(params.values())
        scaled = {key: score * (params[key] / smallest) for key, score in scores.items()}
        return global_keep(scaled, {key: 1 for key in scores}, pattern.ratio, protected)

    def compensate_reader(self, reader, removed_cols, stat):
        if not self.compensate:
            return None
        updated, loss = compensate_column_removal(reader.weight.data.float(), stat.matrix.to(reader.weight.device),
                                                  removed_cols, self.percdamp)
        reader.weight.data.copy_(updated.to(reader.weight.dtype))
        return loss

    def apply(self, model, adapter, keep, stats, calib_ids, settings):
        if not (self.compensate and self.compensation_inputs == "pruned"):
            return super().apply(model, adapter, keep, stats, calib_ids, settings)
        # fresh Grams of the readers, block by block, on the inputs of the already-pruned blocks
        start, batches, results, keep_done = resume_walk(model, adapter, settings)  # (engine.resume)
        blocks = walk_blocks(model, adapter, calib_ids, lambda b: reader_taps(adapter, b, self.groups(adapter, b)),
                             Hessian, settings, "pruned", desc=f"{self.name} compensate", start=start,
                             start_batches=batches, after_block=keep_done)
        for index, block, block_stats in blocks:
            self.prune_block(adapter, block, index, keep, block_stats, results)
        return results
