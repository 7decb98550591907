"""Wanda-sp: Wanda's weight-times-activation score on whole units (the structured baseline of FLAP's and GOA's
tables; docs/methods.md §7.6).

FLAP's code (``prune_wanda_sp``) reads each reader's input (o_proj / out_proj / c_proj, down_proj / fc2) block by
block, on the model as pruned so far, and scores input channel ``j`` by the mean over output rows of Wanda's
element score::

    s_j = mean_i |W_ij| · ||X_j||        (||X_j||: the root mean square of input j over the calibration tokens)

A head's (KV group's) score is the sum of its channels' scores, an MLP neuron's is its channel's; the
``int(ratio · count)`` lowest-scoring units of each module are removed (UL-UM, the reference's rounding), with no
compensation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ModuleResult, register
from .engine import walk_blocks
from .masks import Pattern
from .resume import resume_walk
from .settings import EngineSettings
from .stats import ChannelMoments
from .structured import (
    StructuredPruner,
    reader_taps,
    remove_kept,
    top_units,
    uniform_keep,
)


def wanda_sp_scores(reader: torch.Tensor, mean_square: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``[count]``: for each unit owning reader input ``columns[u]``, ``Σ_{j ∈ u} mean_i |W_ij| · sqrt(E[x_j²])``."""
    channel = (reader.abs().to(mean_square.dtype) * mean_square.sqrt().unsqueeze(0)).mean(0)
    return channel[columns.to(channel.device)].sum(dim=1)


@register
@dataclass
class WandaSP(StructuredPruner):
    """``pruner=wanda_sp`` (module docstring)."""

    name = "wanda_sp"
    statistic = ChannelMoments
    propagate = "pruned"  # each block scored on the outputs of the blocks pruned before it (as FLAP's code)
    keeps_statistics = False
    allocations = ("uniform",)
    allocation: str = "uniform"  # uniform (each module: ratio of its units; the reference's only mode)
    attention_unit: str = "kv_group"  # kv_group (whole KV groups under GQA, plain heads otherwise) | query_head
    min_units: int = 1  # units of each kind every block keeps
    rounding: str = "floor"  # int(ratio * count) units per module, as the reference | nearest: round(ratio * count)
    blocks: list | None = None  # [start, stop) of the blocks pruned (as pruner=goa; the GOA tables: [4, 30)); null = all

    def unit_scores(self, block, group, stat, pattern):
        return wanda_sp_scores(block.get_submodule(group.reader).weight.data, stat.mean_square.double(),
                               group.reader_columns())

    @torch.no_grad()
    def prune(self, model, adapter, pattern: Pattern, calib_ids, settings: EngineSettings | None = None,
              ratios=None) -> dict[str, ModuleResult]:
        settings = self.start(pattern, calib_ids, settings, ratios)
        prefix = adapter.blocks_prefix()
        start, batches, results, keep_done = resume_walk(model, adapter, settings)  # (engine.resume)
        blocks = walk_blocks(model, adapter, calib_ids, lambda b: reader_taps(adapter, b, self.groups(adapter, b)),
                             self.statistic, settings, self.propagate, desc=f"{self.name}", start=start,
                             start_batches=batches, after_block=keep_done)
        for index, block, stats in blocks:
            if not self.prunes_block(index):
                continue
            for group in self.groups(adapter, block):
                score = self.unit_scores(block, group, stats[group.kind], pattern).cpu()
                keep = uniform_keep({0: score}, pattern.ratio, {0: top_units(score, self.min_units)}, self.rounding)[0]
                keep = adapter.repair_keep(block, group, keep, score)
                name, result = remove_kept(adapter, block, group, keep, prefix, index)
                results[name] = result
        return results
