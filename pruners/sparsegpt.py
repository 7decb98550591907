"""SparseGPT (Frantar & Alistarh, ICML'23; docs/methods.md §3.3).

Sequential OBS over input columns with a shared Hessian ``H = 2 X X^T``: columns are eliminated left to
right; pruning column i updates the not-yet-processed columns by ``-err_i * [H^-1]_{i,i:} / [H^-1]_ii``
(the rows of the upper Cholesky factor U of ``H^-1`` are exactly the inverse Hessians of the
remaining columns). Updates inside a block of ``blocksize`` columns are applied eagerly, updates to
later columns lazily once per block (``W[:, i2:] -= Err1 @ U[i1:i2, i2:]``).

Mask selection: unstructured -> inside each column block, the ``int(numel * s)`` lowest of
``w^2 / U_jj^2`` over all rows of the block (the reference takes ``<= kth value``, one more on ties;
we prune exactly k); N:M -> when a group's first column is reached, the ``m - n`` lowest of the
group per row, using the already-updated weights.

One Hessian, and one Cholesky factorization, per group of linears sharing an input, and one pass over the
columns for the group's stacked rows (:func:`sparsegpt_prune_stacked`): the same weights as one linear at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import InverseHessianPruner, register
from .masks import Pattern, prune_n_of_m, prune_per_matrix


def sparsegpt_prune(weight: torch.Tensor, U: torch.Tensor, pattern: Pattern, blocksize: int = 128,
                    prune_mask: torch.Tensor | None = None):
    """Prune ``weight`` [d_out, d_in] given the upper Cholesky factor U of the damped ``H^-1``.

    ``prune_mask`` fixes the mask (for comparisons on the same mask); otherwise it is selected as above.

    Returns (pruned weight in fp32, prune mask, OBS loss sum ``sum (w - q)^2 / U_jj^2 / 2``).
    Dead input columns must already be zero in ``weight``.
    """
    return sparsegpt_prune_stacked([weight], U, pattern, blocksize,
                                   None if prune_mask is None else [prune_mask])[0]


def sparsegpt_prune_stacked(weights: list[torch.Tensor], U: torch.Tensor, pattern: Pattern, blocksize: int = 128,
                            prune_masks: list[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """:func:`sparsegpt_prune` for several matrices that share U (the linears of a group: one Hessian), in one pass
    over the columns with their rows stacked (docs/methods.md §3.3). A row's updates depend on that row and U only
    (``W1[r, i:] -= err_r * U[i, i:]``), so stacking changes no number; the unstructured selection stays per
    matrix (in each column block, the ``int(numel * s)`` lowest of that matrix's rows). One column loop for q/k/v
    (gate/up) instead of one per linear is most of PruneLab's saving over the reference's prune time.

    Per column the loop does only the update: ``err = w * removed / d`` (``(w - q) / d``, q = w with the removed
    entries zeroed) and ``W1[:, i:] -= err U[i, i:]``; the kept block is ``W1`` with the removed entries zeroed
    (an entry kept has err 0, so the loop leaves it as it was when its column came: q), and the loss
    ``sum err^2 / 2`` is summed once per block.
    """
    bounds, row = [], 0
    for weight in weights:
        bounds.append((row, row + weight.shape[0]))
        row += weight.shape[0]
    W = torch.cat([w.to(torch.promote_types(w.dtype, torch.float32)) for w in weights], dim=0)
    U = U.to(W.dtype)
    fixed = None if prune_masks is None else torch.cat(list(prune_masks), dim=0)
    d_out, d_in = W.shape
    mask_out = torch.zeros_like(W, dtype=torch.bool)
    losses = torch.zeros(len(weights), dtype=torch.float64, device=W.device)
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = U[i1:i2, i1:i2]
        diag = torch.diag(Hinv1)
        if fixed is not None:
            mask1 = fixed[:, i1:i2].clone()
        elif pattern.kind == "unstructured":
            score = W1**2 / diag.unsqueeze(0) ** 2
            mask1 = torch.cat([prune_per_matrix(score[a:b], pattern.ratio) for a, b in bounds], dim=0)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if fixed is None and pattern.kind == "nm" and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                mask1[:, group] = prune_n_of_m(W1[:, group] ** 2 / diag[group].unsqueeze(0) ** 2, pattern.n, pattern.m)
            err = W1[:, i].masked_fill(~mask1[:, i], 0) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = W1.masked_fill(mask1, 0)
        mask_out[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        per_row = Err1.double().pow(2).sum(1)
        losses += torch.stack([per_row[a:b].sum() for a, b in bounds]) / 2
    return [(W[a:b], mask_out[a:b], float(losses[j])) for j, (a, b) in enumerate(bounds)]


@register
@dataclass
class SparseGPT(InverseHessianPruner):
    name = "sparsegpt"
    blocksize: int = 128
    percdamp: float = 0.01

    def check(self, pattern):
        super().check(pattern)
        if self.blocksize < 1:
            raise ValueError(f"pruner.blocksize={self.blocksize} must be >= 1")
        if not 0 <= self.percdamp:
            raise ValueError(f"pruner.percdamp={self.percdamp} must be >= 0")
        if pattern.kind == "nm" and self.blocksize % pattern.m:
            raise ValueError(f"pruner.blocksize={self.blocksize} must be a multiple of m={pattern.m}")

    def prune_weight(self, weight, U, pattern):
        return sparsegpt_prune(weight, U, pattern, self.blocksize)

    def prune_weights(self, weights, U, pattern):
        return sparsegpt_prune_stacked(weights, U, pattern, self.blocksize)
