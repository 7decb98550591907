"""The sequential calibration engine (docs/architecture.md §1; docs/methods.md §1.2).

Embed once and capture block 0's inputs and kwargs (whatever the installed transformers passes:
attention mask, position ids, rotary position embeddings, cache position...); then per block: move it
to the compute device, hook its taps, run the calibration windows through it while the method's
statistics accumulate, prune each group, re-run to produce the next block's inputs (pruned outputs
unless the method asks for dense ones), move it back. Peak device memory: one block, its statistics
and the calibration activations.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from models import Adapter
from models.blocks import BlockInputs, capture_block_inputs, kept_batches, run_block
from models.onload import store_of

from .allocation import LayerRatios
from .masks import Pattern
from .resume import resume_walk
from .settings import EngineSettings

log = logging.getLogger("prunelab")

if TYPE_CHECKING:  # (annotations only: pruners/base.py imports this module, never the other way round)
    from .base import ModuleResult, Pruner


def drive(pruner: Pruner, model, adapter: Adapter, pattern: Pattern, calib_ids, settings: EngineSettings | None = None,
          ratios: LayerRatios | None = None) -> dict[str, ModuleResult]:
    """The driver choice (docs/architecture.md §1): layer-wise methods (``scope = "block"``) go block by block
    through :func:`prune_sequential`, whole-model methods (``scope = "model"``) through their ``prune_model``.
    ``ratios``: per-linear ratios from :func:`pruners.allocation.allocate` (layer-wise methods only)."""
    settings = settings or EngineSettings()
    if ratios is not None and pruner.scope != "block":
        raise ValueError(f"pruner '{pruner.name}' allocates its own sparsity: sparsity.allocation must be uniform "
                         f"over every linear")
    if pruner.scope == "model":
        pruner.check(pattern)
        if pruner.needs_calibration and calib_ids is None:
            raise ValueError(f"pruner '{pruner.name}' needs calibration data")
        return pruner.prune_model(model, adapter, pattern, calib_ids if pruner.needs_calibration else None, settings)
    return prune_sequential(model, adapter, pruner, pattern, calib_ids, settings, ratios)


def resume_kwargs(model, adapter: Adapter, calib_ids: torch.Tensor, device, batch_size: int) -> dict:
    """The block kwargs of every batch size the windows come in (a resumed walk has its hidden states kept): the
    windows are fixed-length and unpadded, so the first batch, and the last one where it is shorter, give them all."""
    n = calib_ids.shape[0]
    parts = [calib_ids[:batch_size]] + ([calib_ids[n - n % batch_size :]] if n % batch_size and n > batch_size else [])
    kwargs: dict = {}
    for ids in parts:
        kwargs.update(capture_block_inputs(model, adapter, ids, device, batch_size).kwargs_by_batch_size)
    return kwargs


class _Enough(Exception):
    """Raised by the last statistic's hook: the rest of the block's forward is not needed (its outputs are
    recomputed after pruning)."""


def _hook(module: nn.Module, tap, stat, stop: bool = False):
    if tap.where == "input":
        def record(m, args):
            stat.add(tap.select(args, None))
            if stop:
                raise _Enough

        return module.register_forward_pre_hook(record)
    return module.register_forward_hook(lambda m, args, out: stat.add(tap.select(args, out)))


def _statistics_pass(adapter: Adapter, block: nn.Module, inputs: BlockInputs, stopped: bool, keep: bool) -> list | None:
    """The calibration batches through ``block`` for its statistics: its outputs where ``keep`` (a method that
    calibrates the next block on the dense outputs), else None (they would be a third copy of the activations
    beside the inputs and the pruned block's outputs); ``stopped``: the last statistic's hook ends each forward."""
    if keep:
        return run_block(adapter, block, inputs)
    for hidden in inputs.batches:
        try:
            adapter.call_block(block, hidden, inputs.kwargs(hidden))
        except _Enough:
            if not stopped:
                raise
    return None


def walk_blocks(model, adapter: Adapter, calib_ids: torch.Tensor | None, taps_of, statistic,
                settings: EngineSettings | None = None, propagate: str = "pruned", desc: str = "blocks",
                start: int = 0, start_batches: list[torch.Tensor] | None = None, after_block=None,
                stop_after=None, observe=None, writes: bool = True):
    """Yield ``(index, block, stats)`` for every block in order, the block on ``settings.device``.

    ``taps_of(block)`` maps keys to ``(Tap, width)``: each gets a ``statistic(width, device, stats_dtype)``
    fed by a hook while the calibration windows run through the block (``stats`` is empty without
    calibration data). The consumer may change the block (prune it, remove units) before asking for
    the next one; the next block's inputs are then this block's outputs after the change
    (``propagate="pruned"``) or before it (``"dense"``). Used under ``torch.no_grad()``.

    Resuming (:mod:`pruners.resume`): ``start`` skips the blocks before it (already done), ``start_batches`` are the
    hidden states entering block ``start``; ``after_block(index, block, next_batches)`` is called once a block is
    done, back off the device and released (an onloaded block, :mod:`models.onload`: written out, then on
    ``meta``), with the next block's inputs (None without calibration data).

    ``stop_after``: the key of the statistic whose input tap comes last in the block's forward; with
    ``propagate="pruned"`` the statistics pass stops there (the block's outputs are computed after the change
    anyway): the same statistics, less of the forward (SparseGPT on SmolLM2: the down projection's product).
    A tap the stopped forward never reached fails the block as below.

    ``observe(block)``: hooks of the method's own for the statistics pass, where one statistic pairs several modules'
    tensors of the same forward (an MoE router's choices with its experts' outputs: :mod:`pruners.expert_drop`);
    it returns their handles, removed after the pass.

    ``writes=False``: a pass that does not change the blocks (a structured method's scoring pass): an onloaded block
    is released without being written out.
    """
    settings = settings or EngineSettings()
    device, batch_size, stats_dtype, progress = settings.device, settings.batch_size, settings.stats_dtype, settings.progress
    blocks = adapter.blocks()
    store = store_of(model)  # (onloaded models: each block read for its turn and written out after it)
    inputs = None
    if calib_ids is not None and start_batches is not None:  # resumed: the kept inputs of block ``start``
        restored = kept_batches(settings.activations, device, settings.offload_dir)
        for batch in start_batches:
            restored.append(batch.to(device) if isinstance(restored, list) else batch)
        if isinstance(start_batches, list):  # (the caller's list emptied: a memory-mapped file goes once copied)
            start_batches.clear()
        inputs = BlockInputs(restored, resume_kwargs(model, adapter, calib_ids, device, batch_size))
    elif calib_ids is not None:
        inputs = capture_block_inputs(model, adapter, calib_ids, device, batch_size, settings.activations,
                                      settings.offload_dir)
    for index in tqdm(range(start, len(blocks)), desc=desc, unit="block", disable=not progress, initial=start,
                      total=len(blocks)):
        block = blocks[index]
        store.fetch(index, block)
        block.to(device)
        stats, dense_outputs = {}, None
        if inputs is not None:
            handles = []
            taps = taps_of(block)
            stopped = propagate == "pruned" and stop_after in taps and taps[stop_after][0].where == "input"
            for key, (tap, width) in taps.items():
                stats[key] = statistic(width, device, stats_dtype)
                handles.append(_hook(block.get_submodule(tap.module), tap, stats[key], stop=stopped and key == stop_after))
            if observe is not None:
                handles += observe(block)
            try:
                dense_outputs = _statistics_pass(adapter, block, inputs, stopped, keep=propagate != "pruned")
            finally:
                for handle in handles:
                    handle.remove()
            for key, stat in stats.items():
                if stat.count == 0 and getattr(key, "routed", False):  # an expert the router sent no token
                    continue
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
        store.release(index, block, writes)  # (an onloaded block: written out, before it counts as done)
        if after_block is not None:
            after_block(index, block, inputs.batches if inputs is not None else None)


@torch.no_grad()
def prune_sequential(model, adapter: Adapter, pruner: Pruner, pattern: Pattern, calib_ids: torch.Tensor | None,
                     settings: EngineSettings | None = None, ratios: LayerRatios | None = None
                     ) -> dict[str, ModuleResult]:
    """Prune every block in order (layer-wise methods); returns per-module results keyed by full module
    name, each with its prune mask (``ModuleResult.mask``; :meth:`pruners.masks.MaskState.from_results`).

    ``ratios`` (:func:`pruners.allocation.allocate`): a ratio per linear (unstructured patterns; N:M keeps its
    n:m); linears it does not list stay dense. None: every prunable linear at ``pattern.ratio``."""
    settings = settings or EngineSettings()
    pruner.check(pattern)
    if pruner.needs_calibration and calib_ids is None:
        raise ValueError(f"pruner '{pruner.name}' needs calibration data")
    prefix = adapter.blocks_prefix()

    def taps_of(block):  # one statistic per group of linears sharing an input
        return {group: (group.tap, block.get_submodule(group.names[0]).in_features)
                for group in adapter.linear_groups(block)}

    # keep each done block; go on after the last one kept (engine.resume, pruners/resume.py)
    start, start_batches, results, after_block = resume_walk(model, adapter, settings)

    # (the linear groups come in forward order: the last one's tap ends the statistics pass)
    last = adapter.linear_groups(adapter.blocks()[0])[-1] if len(adapter.blocks()) else None
    blocks = walk_blocks(model, adapter, calib_ids if pruner.needs_calibration else None, taps_of, pruner.statistic,
                         settings, pruner.propagate, desc=f"{pruner.name} {pattern.describe()}", start=start,
                         start_batches=start_batches, after_block=after_block, stop_after=last)
    for index, block, stats in blocks:
        for group in adapter.linear_groups(block):
            for group_pattern, names in _by_ratio(group.names, pattern, ratios, f"{prefix}.{index}."):
                modules = {name: block.get_submodule(name) for name in names}
                stat = stats.get(group)
                if stat is not None and stat.count == 0:  # (a routed group no calibration token reached)
                    log.warning("block %d: %s saw no calibration token: pruned by magnitude per row", index,
                                ", ".join(names))
                    from .base import prune_uncalibrated

                    pruned = prune_uncalibrated(modules, group_pattern)
                else:
                    pruned = pruner.prune_group(modules, stat, group_pattern)
                for name, result in pruned.items():
                    results[f"{prefix}.{index}.{name}"] = result
    return results


def _by_ratio(names, pattern: Pattern, ratios, prefix: str) -> list[tuple[Pattern, list[str]]]:
    """The linears of one group split by their pattern: all at ``pattern`` without ``ratios``; otherwise the
    listed ones at their own ratio (in group order), the others left out."""
    if ratios is None:
        return [(pattern, list(names))]
    split: dict[float, list[str]] = {}
    for name in names:
        if prefix + name in ratios.ratios:
            split.setdefault(ratios.ratios[prefix + name], []).append(name)
    if pattern.kind != "unstructured":
        return [(pattern, [n for group in split.values() for n in group])] if split else []
    return [(replace(pattern, ratio=ratio), group) for ratio, group in split.items()]
