"""Magnitude pruning (METHODS.md §3.1): score ``|W_ij|``, no calibration, no update.

Comparison group: the whole matrix (``--gmp`` in SparseGPT, ``prune_magnitude`` in Wanda), or each
row (``group: row``). N:M groups are per row, as in Wanda.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Pruner, apply_prune_mask
from .masks import select_prune_mask


def magnitude_score(weight):
    return weight.abs()


@dataclass
class Magnitude(Pruner):
    name = "magnitude"
    group: str = "matrix"

    def check(self, pattern):
        super().check(pattern)
        if self.group not in ("matrix", "row"):
            raise ValueError(f"pruner.group='{self.group}' is not one of: matrix, row")

    def prune_group(self, modules, stat, pattern):
        results = {}
        for name, module in modules.items():
            weight = module.weight.data.float()
            mask = select_prune_mask(magnitude_score(weight), pattern, self.group)
            results[name] = apply_prune_mask(module, weight, mask)
        return results
