"""Magnitude pruning (docs/methods.md §3.1): score ``|W_ij|``, no calibration, no update.

Comparison group: the whole matrix (``--gmp`` in SparseGPT, ``prune_magnitude`` in Wanda), or each
row (``group: row``). N:M groups are per row, as in Wanda.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import ScoreMaskPruner, register


def magnitude_score(weight):
    return weight.abs()


@register
@dataclass
class Magnitude(ScoreMaskPruner):
    name = "magnitude"
    needs_calibration = False  # the score is |W| alone
    group: str = "matrix"

    def score(self, weight, stat):
        return magnitude_score(weight)
