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

One Hessian, and one Cholesky factorization, per group of linears sharing an input.
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
    W = weight.clone().to(torch.promote_types(weight.dtype, torch.float32))
    U = U.to(W.dtype)
    d_out, d_in = W.shape
    mask_out = torch.zeros_like(W, dtype=torch.bool)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = U[i1:i2, i1:i2]
        diag = torch.diag(Hinv1)
        if prune_mask is not None:
            mask1 = prune_mask[:, i1:i2].clone()
        elif pattern.kind == "unstructured":
            mask1 = prune_per_matrix(W1**2 / diag.unsqueeze(0) ** 2, pattern.ratio)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_mask is None and pattern.kind == "nm" and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                mask1[:, group] = prune_n_of_m(W1[:, group] ** 2 / diag[group].unsqueeze(0) ** 2, pattern.n, pattern.m)
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            loss += ((w - q) ** 2 / d**2).sum().double() / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask_out[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W, mask_out, loss.item()


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
