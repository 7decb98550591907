"""Wanda (Sun et al., ICLR'24; docs/methods.md §3.2).

Score ``S_ij = |W_ij| * ||X_j||_2`` with ``||X_j||`` over all calibration tokens; the comparison group is
each output row (``int(d_in * s)`` pruned per row); N:M groups are M consecutive inputs of a row.
No weight update; the pruned block's outputs calibrate the next block.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import ScoreMaskPruner, register
from .stats import ColumnSquares, wanda_score  # the score is shared: OWL's outlier pass uses it too

__all__ = ["Wanda", "wanda_score"]


@register
@dataclass
class Wanda(ScoreMaskPruner):
    name = "wanda"
    statistic = ColumnSquares
    needs_calibration = True
    group: str = "row"  # the paper's choice; "matrix" is the layer-wise ablation

    def score(self, weight, stat):
        return wanda_score(weight, stat.norm)
