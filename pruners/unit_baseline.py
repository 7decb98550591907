"""The data-free structured baselines of the GOA and LLM-Pruner tables (docs/methods.md §7): whole units (heads
or KV groups, MLP neurons, Mamba channels) ranked at random or by the L1 / L2 norm of every weight they own
(their level-1 rows, biases and reader columns: :func:`unit_norms`), the lowest removed, ``ratio`` of each
module's units (``allocation: uniform``, the tables' UL-UM) or one ranking over all (``global``). No
calibration data and no compensation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models import UnitGroup

from .base import register
from .structured import StructuredPruner

SCORES = ("random", "l1", "l2")


def unit_norms(block, group: UnitGroup, order: int) -> torch.Tensor:
    """``[count]``: the L1 (``order=1``) or L2 (``order=2``) norm of all the parameters each unit owns."""
    total = torch.zeros(group.count, dtype=torch.float64)
    for path, (axis, index) in group.owned.items():
        owned = block.get_parameter(path).detach().double().cpu().index_select(axis, index.reshape(-1))
        per_unit = owned.movedim(axis, 0).reshape(group.count, -1)
        total += per_unit.abs().sum(1) if order == 1 else per_unit.pow(2).sum(1)
    return total if order == 1 else total.sqrt()


@register
@dataclass
class UnitBaseline(StructuredPruner):
    """``pruner=unit_baseline``: Random / L1 / L2 unit pruning (module docstring)."""

    name = "unit_baseline"
    needs_calibration = False
    keeps_statistics = False
    score: str = "l2"  # random | l1 | l2
    allocation: str = "uniform"  # uniform (each module: ratio of its units) | global (one ranking, parameter-weighted)
    attention_unit: str = "kv_group"  # kv_group (whole KV groups under GQA, plain heads otherwise) | query_head
    min_units: int = 1  # units of each kind every block keeps
    rounding: str = "nearest"  # uniform: round(ratio * count) units per module | floor: int(ratio * count)
    blocks: list | None = None  # [start, stop) of the blocks pruned (as pruner=goa; the GOA tables: [4, 30)); null = all

    def check(self, pattern):
        super().check(pattern)
        if self.score not in SCORES:
            raise ValueError(f"pruner.score='{self.score}' is not one of: {', '.join(SCORES)}")

    def prune(self, model, adapter, pattern, calib_ids, settings=None, ratios=None):
        # random: draws from the run's seed (the runner seeds torch; whatever used the global generator since)
        self._generator = torch.Generator().manual_seed(torch.initial_seed())
        return super().prune(model, adapter, pattern, calib_ids, settings, ratios)

    def unit_scores(self, block, group, stat, pattern):
        if self.score == "random":
            return torch.rand(group.count, dtype=torch.float64, generator=self._generator)
        return unit_norms(block, group, 1 if self.score == "l1" else 2)
