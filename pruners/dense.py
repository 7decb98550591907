"""``pruner=dense``: no pruning (the dense baseline row)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Pruner, register
from .masks import PATTERN_KINDS


@register
@dataclass
class Dense(Pruner):
    name = "dense"
    needs_calibration = False
    removes_weights = False
    patterns = PATTERN_KINDS  # any: the pattern is ignored

    def prune_group(self, modules, stat, pattern):
        return {}

    def prune(self, model, adapter, pattern, calib_ids, settings=None, ratios=None):
        return {}  # (no walk over the blocks, no progress bar naming a pattern it does not apply)
