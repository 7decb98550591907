"""Sparsity patterns and mask selection, shared by every method (METHODS.md §12, "comparison group").

Conventions: a *prune mask* is ``True`` where a weight is removed. Scores are "higher = keep".
``N:M`` follows the hardware notation: at most ``n`` non-zeros in every ``m`` consecutive weights of a
row along the input dimension (2:4 keeps 2 of 4, i.e. 50% sparsity); the reference scripts'
``prunen`` is ``m - n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pattern:
    """Unstructured at ``ratio``, N:M (``n`` kept of every ``m``), or structured: ``ratio`` of the
    attention + MLP parameters removed as whole heads / channels (structured pruners only)."""

    kind: str  # "unstructured" | "nm" | "structured"
    ratio: float = 0.0
    n: int | None = None
    m: int | None = None

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.n / self.m if self.kind == "nm" else self.ratio

    @property
    def pruned_per_group(self) -> int:
        return self.m - self.n

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else f"{self.ratio:.0%} {self.kind}"

    @classmethod
    def from_config(cls, cfg) -> Pattern:
        kind = cfg.kind
        if kind in ("unstructured", "structured"):
            ratio = float(cfg.ratio)
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"sparsity.ratio={ratio} is outside [0, 1)")
            return cls(kind, ratio=ratio)
        if kind == "nm":
            n, m = int(cfg.n), int(cfg.m)
            if not (m >= 2 and 0 < n < m):
                raise ValueError(f"sparsity N:M needs 0 < n < m (got n={n}, m={m})")
            return cls("nm", ratio=1.0 - n / m, n=n, m=m)
        raise ValueError(f"sparsity.kind='{kind}' is not one of: unstructured, nm, structured")


def lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest entries of each row of a 2-D score (stable sort, as Wanda)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(score, dim=-1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    return mask


def prune_per_row(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """``int(d_in * ratio)`` lowest of every row (Wanda's comparison group)."""
    return lowest_k(score, int(score.shape[1] * ratio))


def prune_per_matrix(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """``int(numel * ratio)`` lowest of the whole matrix (magnitude; SparseGPT inside one column block)."""
    return lowest_k(score.reshape(1, -1), int(score.numel() * ratio)).view_as(score)


def prune_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row, in every group of ``m`` consecutive columns, the ``m - n`` lowest."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M needs the input dimension ({cols}) to be a multiple of m={m}")
    grouped = score.reshape(rows * cols // m, m)
    return lowest_k(grouped, m - n).view(rows, cols)


def select_prune_mask(score: torch.Tensor, pattern: Pattern, group: str = "row") -> torch.Tensor:
    """Prune mask for ``pattern``; ``group`` is the unstructured comparison group (``row`` | ``matrix``)."""
    if pattern.kind == "nm":
        return prune_n_of_m(score, pattern.n, pattern.m)
    if group == "row":
        return prune_per_row(score, pattern.ratio)
    if group == "matrix":
        return prune_per_matrix(score, pattern.ratio)
    raise ValueError(f"unknown comparison group '{group}'")


def sparsity(weight: torch.Tensor) -> float:
    return (weight == 0).sum().item() / weight.numel()


def satisfies_n_of_m(weight: torch.Tensor, n: int, m: int) -> bool:
    """Every group of ``m`` consecutive weights of a row has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())
