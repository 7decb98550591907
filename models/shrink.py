"""Shrinking a model whose zeroed rows and columns line up with whole units (docs/methods.md §5, rows + columns).

A unit (an attention head or KV group, an MLP neuron, a Mamba channel: :class:`models.base.UnitGroup`) is
*silent* when removing it changes no output: nothing reads it (every input column it owns in a linear is
zero) or it puts out zero whatever its input (the family's rule, :meth:`models.base.Adapter.zero_output_units`).
Silent units are removed through the adapter, as structured pruning removes units, so the logits stay the same
and the matrices get smaller.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, UnitGroup


def silent_units(adapter: Adapter, block: nn.Module, group: UnitGroup) -> torch.Tensor:
    """``[count]`` bool: the units of ``group`` that no output depends on."""
    return adapter.unread_units(block, group) | adapter.zero_output_units(block, group)


def shrink_silent_units(model: nn.Module, adapter: Adapter) -> dict:
    """Remove every silent unit of every block (coarse groups first, then their refinements; a group keeps at
    least one unit, and a removal the family cannot realize, such as uneven query heads per KV group, is left
    out). Returns ``{"parameters_before", "parameters_after", "blocks": [{kind: {"kept", "of"}}]}``."""
    before = sum(p.numel() for p in model.parameters())
    blocks = []
    for block in adapter.blocks():
        counts = adapter.block_counts(block)
        for kind in [g.kind for g in adapter.unit_groups(block)]:  # (not an MoE layer's experts: never silent here)
            group = adapter.unit_group(block, kind)  # as the block is after the removals before it
            silent = silent_units(adapter, block, group)
            if not silent.any():
                continue
            keep = (~silent).nonzero().flatten()
            if not keep.numel():  # all silent: one stays (its output is zero or unread anyway)
                keep = torch.zeros(1, dtype=torch.long)
            try:
                adapter.remove_units(block, kind, keep)
            except ValueError:
                continue
        now = adapter.block_counts(block)
        blocks.append({kind: {"kept": now[kind], "of": counts[kind]} for kind in counts})
    return {"parameters_before": before, "parameters_after": sum(p.numel() for p in model.parameters()),
            "blocks": blocks}
