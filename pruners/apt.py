"""APT: joint multi-weight OBS pruning (Zhao et al., EMNLP'24 Findings; docs/methods.md §6).

SparseGPT solves a chain of *single* removals (SRP) and freezes the kept weights of every processed
column. APT solves the *multiple removal problem* (MRP): for a row ``w`` with inverse Hessian ``S`` of
its free columns and pruned set ``P`` (all removed at once),

    delta_w* = -w_P (S_PP)^-1 S_P,:         L*(P) = 1/2 w_P (S_PP)^-1 w_P^T          (docs/methods.md §1.1, §6.1)

which is the exact optimum of the layer-wise reconstruction for that mask.

The paper's code was never released; this is the documented reconstruction (docs/methods.md §6.2,
variant (b)), unverified against the paper:

* **block mode** (default, ``blocksize: 128``): columns are processed in blocks like SparseGPT. With
  ``H^-1 = U^T U`` (U upper Cholesky), the inverse Hessian of the free columns ``>= i1`` restricted to
  the block is ``S_blk = U_blk^T U_blk`` and ``S_blk,F = U_blk^T U[i1:i2, i1:]``. Each row removes its
  block-pruned set jointly, updating *every* free column, including the kept ones inside the block
  (which SparseGPT freezes), then the block is frozen. ``blocksize: 1`` is exactly SparseGPT.
* **full mode** (``blocksize: 0``): one block spanning the row, i.e. the exact MRP optimum given the mask
  (one ``|P| x |P|`` solve per row; for small layers and checks).

Mask selection ("Solution S" / "Solution M"):
* unstructured: the ``int(numel * s)`` lowest single-removal scores ``w_j^2 / [S_blk]_jj`` of the block
  over all rows (SparseGPT's comparison group); ``group: row`` selects per row instead;
* N:M: for every row and group of ``m`` columns, the prune set of ``m - n`` weights with the least
  joint loss ``L*(P)`` among all ``C(m, m - n)`` candidates (6 for 2:4, 70 for 4:8), evaluated with
  the block's ``S`` at the start of the block (interactions across groups ignored, as in the
  third-party re-implementation).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .base import InverseHessianPruner, register
from .masks import Pattern, prune_per_matrix, prune_per_row


def joint_removal_coefficients(S_blk: torch.Tensor, w_blk: torch.Tensor, prune_mask: torch.Tensor,
                               max_elements: int = 2**26) -> torch.Tensor:
    """``X[r] = (S_PP)^-1 w_P`` for every row r (its own pruned set P = prune_mask[r]), zero off P.

    Batched over rows: ``A_r = S_blk * (m m^T) + diag(1 - m)`` is SPD and decouples P from the rest,
    so one batched Cholesky solve gives all rows at once (in chunks of at most ``max_elements`` entries).
    """
    out = torch.zeros_like(w_blk)
    row_chunk = max(1, max_elements // (S_blk.shape[0] ** 2))
    for start in range(0, w_blk.shape[0], row_chunk):
        m = prune_mask[start : start + row_chunk].to(S_blk.dtype)
        A = S_blk.unsqueeze(0) * (m.unsqueeze(2) * m.unsqueeze(1)) + torch.diag_embed(1 - m)
        b = (w_blk[start : start + row_chunk] * m).unsqueeze(2)
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info > 0).any()):  # numerically indefinite: fall back to a general solve
            x = torch.linalg.solve(A, b)
        else:
            x = torch.cholesky_solve(b, L)
        out[start : start + row_chunk] = x.squeeze(2) * m
    return out


def nm_mask_by_joint_loss(w_blk: torch.Tensor, S_blk: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per row and group of ``m`` columns, the prune set (size ``m - n``) minimizing ``w_P S_PP^-1 w_P^T``."""
    rows, width = w_blk.shape
    if width % m:
        raise ValueError(f"N:M needs the block width ({width}) to be a multiple of m={m}")
    groups = width // m
    subsets = torch.tensor(list(itertools.combinations(range(m), m - n)), device=w_blk.device)  # [C, k]
    S_groups = torch.stack([S_blk[g * m : (g + 1) * m, g * m : (g + 1) * m] for g in range(groups)])  # [G, m, m]
    S_PP = S_groups[:, subsets.unsqueeze(2), subsets.unsqueeze(1)]  # [G, C, k, k]
    S_PP_inv = torch.linalg.inv(S_PP)
    w_P = w_blk.view(rows, groups, m)[:, :, subsets]  # [rows, G, C, k]
    loss = torch.einsum("rgck,gckl,rgcl->rgc", w_P, S_PP_inv, w_P)
    best = subsets[loss.argmin(-1)]  # [rows, G, k]
    mask = torch.zeros(rows, groups, m, dtype=torch.bool, device=w_blk.device)
    mask.scatter_(2, best, True)
    return mask.view(rows, width)


def apt_prune(weight: torch.Tensor, U: torch.Tensor, pattern: Pattern, blocksize: int = 128, group: str = "matrix",
              prune_mask: torch.Tensor | None = None):
    """Block-MRP pruning of ``weight`` [d_out, d_in] given the upper Cholesky factor U of the damped ``H^-1``.

    ``blocksize <= 0`` means one block (full-row MRP). ``prune_mask`` fixes the mask (then ``pattern``
    only names it). Returns (pruned weight, prune mask, MRP loss sum ``1/2 sum_r w_P S_PP^-1 w_P``).
    Dead input columns must already be zero in ``weight``.
    """
    W = weight.clone().to(torch.promote_types(weight.dtype, torch.float32))
    U = U.to(W.dtype)
    d_out, d_in = W.shape
    B = d_in if blocksize <= 0 else blocksize
    mask_out = torch.zeros_like(W, dtype=torch.bool)
    loss = 0.0
    for i1 in range(0, d_in, B):
        i2 = min(i1 + B, d_in)
        U_blk = U[i1:i2, i1:i2]
        S_blk = U_blk.T @ U_blk  # inverse Hessian of the block given the earlier columns frozen
        w_blk = W[:, i1:i2]
        if prune_mask is not None:
            mask = prune_mask[:, i1:i2]
        elif pattern.kind == "nm":
            mask = nm_mask_by_joint_loss(w_blk, S_blk, pattern.n, pattern.m)
        else:
            score = w_blk**2 / torch.diag(S_blk).unsqueeze(0)
            mask = prune_per_row(score, pattern.ratio) if group == "row" else prune_per_matrix(score, pattern.ratio)
        X = joint_removal_coefficients(S_blk, w_blk, mask)
        loss += 0.5 * float((X * w_blk).sum())
        # delta = -X S_blk,F = -(X U_blk^T) U[i1:i2, i1:]
        W[:, i1:] -= (X @ U_blk.T) @ U[i1:i2, i1:]
        W[:, i1:i2].masked_fill_(mask, 0)
        mask_out[:, i1:i2] = mask
    return W, mask_out, loss


@register
@dataclass
class APT(InverseHessianPruner):
    name = "apt"
    blocksize: int = 128  # 0 = full-row MRP (exact optimum for the mask; for small layers)
    percdamp: float = 0.01
    group: str = "matrix"  # unstructured comparison group inside a block: matrix (SparseGPT) | row

    def check(self, pattern: Pattern) -> None:
        super().check(pattern)
        if self.blocksize < 0:
            raise ValueError(f"pruner.blocksize={self.blocksize} must be >= 0 (0 = full row)")
        if self.percdamp < 0:
            raise ValueError(f"pruner.percdamp={self.percdamp} must be >= 0")
        if self.group not in ("matrix", "row"):
            raise ValueError(f"pruner.group='{self.group}' is not one of: matrix, row")
        if pattern.kind == "nm" and self.blocksize and self.blocksize % pattern.m:
            raise ValueError(f"pruner.blocksize={self.blocksize} must be a multiple of m={pattern.m}")

    def prune_weight(self, weight, U, pattern):
        return apt_prune(weight, U, pattern, self.blocksize, self.group)
