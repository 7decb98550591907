"""The sequential calibration engine (METHODS.md §1.2; DESIGN.md "The sequential engine").

Embed once and capture block 0's inputs and kwargs (whatever the installed transformers passes:
attention mask, position ids, rotary position embeddings, cache position...); then per block: move it
to the compute device, hook its taps, run the calibration windows through it while the method's
statistics accumulate, prune each group, re-run to produce the next block's inputs (pruned outputs
unless the method asks for dense ones), move it back. Peak device memory: one block, its statistics
and the calibration activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from models import Adapter

from .base import ModuleResult, Pruner
from .masks import Pattern


class _Caught(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0: records its input and kwargs, then stops the forward."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden, *args, **kwargs):
        raise _Caught(hidden, args, kwargs)

    def __getattr__(self, name):  # models may read attributes of their layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


@dataclass
class BlockInputs:
    """Hidden states entering the current block, in batches, and the kwargs each batch size needs."""

    batches: list[torch.Tensor]
    kwargs_by_batch_size: dict[int, dict] = field(default_factory=dict)

    def kwargs(self, hidden: torch.Tensor) -> dict:
        return self.kwargs_by_batch_size[hidden.shape[0]]


def _to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


@torch.no_grad()
def capture_block_inputs(model, adapter: Adapter, ids: torch.Tensor, device, batch_size: int) -> BlockInputs:
    """Run the embeddings on ``device`` and capture what block 0 receives, batch by batch."""
    blocks = adapter.blocks()
    pre = adapter.pre_block_modules()
    for module in pre:
        module.to(device)
    original = blocks[0]
    blocks[0] = _Catcher(original)
    captured = BlockInputs([])
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _Caught as caught:
                hidden, args, kwargs = caught.args
                if args:
                    raise RuntimeError("block 0 received unexpected positional arguments") from None
                captured.batches.append(hidden)
                # windows are fixed-length and unpadded, so kwargs depend only on the batch size
                captured.kwargs_by_batch_size.setdefault(hidden.shape[0], kwargs)
    finally:
        blocks[0] = original
        if str(device) != "cpu":
            for module in pre:
                module.to("cpu")
    return captured


def _hook(module: nn.Module, tap, stat):
    if tap.where == "input":
        return module.register_forward_pre_hook(lambda m, args: stat.add(tap.select(args, None)))
    return module.register_forward_hook(lambda m, args, out: stat.add(tap.select(args, out)))


@torch.no_grad()
def run_block(adapter: Adapter, block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    return [adapter.call_block(block, h, inputs.kwargs(h)) for h in inputs.batches]


def walk_blocks(model, adapter: Adapter, calib_ids: torch.Tensor | None, taps_of, statistic, device="cpu",
                batch_size: int = 8, stats_dtype=torch.float32, propagate: str = "pruned", progress: bool = True,
                desc: str = "blocks"):
    """Yield ``(index, block, stats)`` for every block in order, the block on ``device``.

    ``taps_of(block)`` maps keys to ``(Tap, width)``: each gets a ``statistic(width, device, dtype)``
    fed by a hook while the calibration windows run through the block (``stats`` is empty without
    calibration data). The consumer may change the block (prune it, remove units) before asking for
    the next one; the next block's inputs are then this block's outputs after the change
    (``propagate="pruned"``) or before it (``"dense"``). Used under ``torch.no_grad()``.
    """
    blocks = adapter.blocks()
    inputs = capture_block_inputs(model, adapter, calib_ids, device, batch_size) if calib_ids is not None else None
    for index in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress):
        block = blocks[index]
        block.to(device)
        stats, dense_outputs = {}, None
        if inputs is not None:
            handles = []
            for key, (tap, width) in taps_of(block).items():
                stats[key] = statistic(width, device, stats_dtype)
                handles.append(_hook(block.get_submodule(tap.module), tap, stats[key]))
            try:
                dense_outputs = run_block(adapter, block, inputs)
            finally:
                for handle in handles:
                    handle.remove()
            for key, stat in stats.items():
                if stat.count == 0:  # e.g. a fused kernel that bypassed the hooked module
                    raise RuntimeError(f"block {index}: tap for {key} never saw an input")
        yield index, block, stats
        del stats
        if inputs is not None:
            outputs = run_block(adapter, block, inputs) if propagate == "pruned" else dense_outputs
            inputs = BlockInputs(outputs, inputs.kwargs_by_batch_size)
        if str(device) != "cpu":
            block.to("cpu")
            torch.cuda.empty_cache()


@torch.no_grad()
def prune_sequential(model, adapter: Adapter, pruner: Pruner, pattern: Pattern, calib_ids: torch.Tensor | None,
                     device="cpu", batch_size: int = 8, stats_dtype=torch.float32, progress: bool = True
                     ) -> dict[str, ModuleResult]:
    """Prune every block in order (layer-wise methods); returns per-module results keyed by full module name."""
    pruner.check(pattern)
    if pruner.needs_calibration and calib_ids is None:
        raise ValueError(f"pruner '{pruner.name}' needs calibration data")
    prefix = adapter.blocks_prefix()

    def taps_of(block):  # one statistic per group of linears sharing an input
        return {group: (group.tap, block.get_submodule(group.names[0]).in_features)
                for group in adapter.linear_groups(block)}

    results: dict[str, ModuleResult] = {}
    blocks = walk_blocks(model, adapter, calib_ids if pruner.needs_calibration else None, taps_of, pruner.statistic,
                         device, batch_size, stats_dtype, pruner.propagate, progress,
                         desc=f"{pruner.name} {pattern.describe()}")
    for index, block, stats in blocks:
        for group in adapter.linear_groups(block):
            modules = {name: block.get_submodule(name) for name in group.names}
            for name, result in pruner.prune_group(modules, stats.get(group), pattern).items():
                results[f"{prefix}.{index}.{name}"] = result
    return results
