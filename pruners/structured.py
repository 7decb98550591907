"""Structured pruning shared by every method that removes whole units (Numerical Pruning, FLAP).

A unit is an attention head (a whole KV group under GQA, or a query head inside its group), an MLP
neuron or a Mamba inner channel; the adapter says which parameter slices it owns and which linear
(its *reader*: o_proj / out_proj, down_proj / fc2, Mamba's out_proj) reads its output. The flow:

1. a scoring pass over the calibration windows on the **dense** model (``walk_blocks`` with dense
   propagation), the method's statistic hooked on every reader's input, the method's per-unit score;
2. allocation: which units to keep, either **global** (every unit of every block sorted by score, the
   lowest removed until the removed parameters are closest to ``ratio`` of all unit-owned parameters;
   docs/methods.md §4.3 decision, FLAP's AL-AM count, §3.7) or **uniform** (``ratio`` of each block's units);
3. the method's compensation on each reader, then the adapter physically removes the units.

This module holds steps 1-2 and the glue; a method file holds its score and its compensation.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from models import Adapter, UnitGroup
from models.onload import each_block, store_of

from .base import ModuleResult, Pruner
from .engine import walk_blocks
from .masks import UNIT_KINDS, Pattern
from .resume import BlockProgress
from .settings import EngineSettings
from .stats import statistic_from_state, statistic_state

ALLOCATIONS = ("global", "uniform")
ATTENTION_UNITS = ("kv_group", "query_head")


def reader_taps(adapter: Adapter, block, groups: list[UnitGroup]) -> dict[str, tuple]:
    """``{unit kind: (Tap, width)}``: where each group's reader input is observed (the adapter's taps)."""
    taps = {name: group.tap for group in adapter.linear_groups(block) for name in group.names}
    return {g.kind: (taps[g.reader], block.get_submodule(g.reader).in_features) for g in groups}


def unit_mean(channel_scores: torch.Tensor, group: UnitGroup) -> torch.Tensor:
    """A unit's score is the mean of its reader channels' scores (heads average their channels, §4.3)."""
    return channel_scores[group.reader_columns().to(channel_scores.device)].mean(dim=1)


def global_keep(scores: dict, weights: dict, ratio: float, protected: dict | None = None) -> dict:
    """Keep masks from one sort of every unit: remove the lowest-scoring units until the removed weight
    is closest to ``ratio`` of the total (``weights[key]``: the weight of one unit of group ``key``, e.g.
    its parameter count; FLAP's ``argmin |cumsum - target|``). ``protected[key]`` masks units never removed."""
    keys = list(scores)
    flat = torch.cat([scores[k].double().cpu() for k in keys])
    unit_weight = torch.cat([torch.full((scores[k].numel(),), float(weights[k]), dtype=torch.float64) for k in keys])
    guard = torch.cat([(protected or {}).get(k, torch.zeros(scores[k].numel(), dtype=torch.bool)).cpu()
                       for k in keys])
    order = torch.argsort(flat.masked_fill(guard, float("inf")), stable=True)
    removable = order[~guard[order]]
    target = ratio * float(unit_weight.sum())
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(unit_weight[removable], 0)])
    n_remove = int(torch.argmin((cumulative - target).abs()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[removable[:n_remove]] = False
    return dict(zip(keys, keep.split([scores[k].numel() for k in keys]), strict=True))


ROUNDINGS = ("floor", "nearest")


def units_to_remove(ratio: float, count: int, rounding: str = "nearest") -> int:
    """Units of a ``count``-unit module a uniform ``ratio`` removes: ``int(ratio * count)`` (``floor``: the FLAP
    reference's UL-UM and Wanda-sp, Python float arithmetic as theirs) or ``round(ratio * count)`` (``nearest``)."""
    return int(ratio * count) if rounding == "floor" else round(ratio * count)


def uniform_keep(scores: dict, ratio: float, protected: dict | None = None, rounding: str = "nearest") -> dict:
    """Keep masks that remove :func:`units_to_remove` lowest-scoring units of every group (FLAP's UL-UM)."""
    out = {}
    for key, score in scores.items():
        guard = (protected or {}).get(key, torch.zeros(score.numel(), dtype=torch.bool))
        order = torch.argsort(score.double().cpu().masked_fill(guard, float("inf")), stable=True)
        n_remove = min(units_to_remove(ratio, score.numel(), rounding), int((~guard).sum()))
        keep = torch.ones(score.numel(), dtype=torch.bool)
        keep[order[:n_remove]] = False
        out[key] = keep
    return out


def check_block_range(blocks) -> None:
    """``pruner.blocks``: null (every block) or ``[start, stop)`` with ``0 <= start < stop`` (the GOA tables:
    ``[4, 30)`` on LLaMA-7B)."""
    if blocks is not None:
        b = list(blocks)
        if len(b) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in b) or not 0 <= b[0] < b[1]:
            raise ValueError(f"pruner.blocks={blocks} must be [start, stop) with 0 <= start < stop")


def in_block_range(blocks, index: int) -> bool:
    return blocks is None or blocks[0] <= index < blocks[1]


def top_units(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` highest-scoring units (the ones ``min_units`` protects)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[torch.argsort(score.double().cpu(), descending=True, stable=True)[:count]] = True
    return mask


class StructuredPruner(Pruner):
    """A method that scores units on the dense model, allocates, compensates and removes.

    Subclasses are dataclasses with at least ``allocation``, ``attention_unit`` and ``min_units`` fields,
    and implement :meth:`unit_scores` and :meth:`apply`.
    """

    patterns: ClassVar[tuple[str, ...]] = UNIT_KINDS
    needs_calibration: ClassVar[bool] = True
    propagate: ClassVar[str] = "dense"  # the scoring pass sees the dense model (allocation needs all blocks)
    walks_blocks: ClassVar[bool] = True  # its passes reach the blocks in order, one at a time: onloading works
    resumes: ClassVar[bool] = True  # its pruning pass keeps each done block, the scoring pass's plan before it
    keeps_statistics: ClassVar[bool] = True  # apply() gets the scoring pass's statistics
    allocations: ClassVar[tuple[str, ...]] = ALLOCATIONS
    allocation: str
    attention_unit: str
    min_units: int
    attention_only: ClassVar[bool] = False  # sparsity=heads: only attention units (set by start())

    def check(self, pattern: Pattern) -> None:
        super().check(pattern)
        if self.allocation not in self.allocations:
            raise ValueError(f"pruner.allocation='{self.allocation}' is not one of: {', '.join(self.allocations)}")
        if self.attention_unit not in ATTENTION_UNITS:
            raise ValueError(f"pruner.attention_unit='{self.attention_unit}' is not one of: {', '.join(ATTENTION_UNITS)}")
        if not isinstance(self.min_units, int) or self.min_units < 1:
            raise ValueError(f"pruner.min_units={self.min_units} must be an integer >= 1")
        check_block_range(getattr(self, "blocks", None))
        if getattr(self, "rounding", "nearest") not in ROUNDINGS:
            raise ValueError(f"pruner.rounding='{self.rounding}' is not one of: {', '.join(ROUNDINGS)}")

    def groups(self, adapter: Adapter, block) -> list[UnitGroup]:
        """The unit groups this run removes from ``block`` (query heads only where the family has them)."""
        return adapter.structure_groups(block, self.attention_unit == "query_head", self.attention_only)

    def prunes_block(self, index: int) -> bool:
        """Whether block ``index`` is pruned (all, unless the method has a ``blocks`` range key)."""
        return in_block_range(getattr(self, "blocks", None), index)

    # --- the method ------------------------------------------------------------------------------
    def unit_scores(self, block, group: UnitGroup, stat, pattern: Pattern) -> torch.Tensor:
        """Score per unit of ``group`` (higher = keep) from its reader's statistic."""
        raise NotImplementedError

    def allocate(self, scores: dict, params: dict, pattern: Pattern, protected: dict) -> dict:
        if self.allocation == "uniform":
            return uniform_keep(scores, pattern.ratio, protected, getattr(self, "rounding", "nearest"))
        return global_keep(scores, params, pattern.ratio, protected)

    def compensate_reader(self, reader, removed_cols: torch.Tensor, stat) -> float | None:
        """Update ``reader`` before its input columns ``removed_cols`` go (``stat``: its input statistic);
        return the method's loss estimate. None: no compensation."""
        return None

    def prune_block(self, adapter: Adapter, block, index: int, keep: dict, stats: dict, results: dict) -> None:
        """Compensate each reader from ``stats[kind]``, then remove the units ``keep`` does not mark."""
        prefix = adapter.blocks_prefix()
        for group in self.groups(adapter, block):
            mask = keep[(index, group.kind)]
            loss = None
            if not bool(mask.all()):
                removed = group.reader_columns()[~mask].reshape(-1)
                loss = self.compensate_reader(block.get_submodule(group.reader), removed, stats.get(group.kind))
            name, result = remove_kept(adapter, block, group, mask, prefix, index, loss)
            results[name] = result

    def apply(self, model, adapter: Adapter, keep: dict, stats: dict, calib_ids, settings: EngineSettings
              ) -> dict[str, ModuleResult]:
        """Compensate and remove every block: ``keep[(block index, kind)]`` masks; ``stats`` those kept from
        the scoring pass (methods that need fresh statistics override this)."""
        progress, onloaded, prefix = self.progress(adapter, settings), store_of(model).onloaded, adapter.blocks_prefix()
        start, _, results = progress.restore(adapter.blocks(), adapter) if progress is not None else (0, None, {})

        def keep_done(index: int, block) -> None:
            if progress is not None:
                done = {name: r for name, r in results.items() if name.startswith(f"{prefix}.{index}.")}
                progress.save(index, block, done, None, with_weights=not onloaded)

        # (an onloaded model: each block read, pruned and written out)
        for index, block in each_block(adapter, start, keep_done):
            if not self.prunes_block(index):
                continue
            block_stats = {kind: stat for (i, kind), stat in stats.items() if i == index}
            self.prune_block(adapter, block, index, keep, block_stats, results)
        return results

    # --- the driver --------------------------------------------------------------------------------
    def start(self, pattern: Pattern, calib_ids, settings: EngineSettings | None, ratios) -> EngineSettings:
        """The checks every structured driver makes before any work; returns the settings to use."""
        if ratios is not None:
            raise ValueError(f"pruner '{self.name}' allocates its own units: sparsity.allocation must be uniform")
        self.check(pattern)
        self.attention_only = pattern.attention_only
        if self.needs_calibration and calib_ids is None:
            raise ValueError(f"pruner '{self.name}' needs calibration data")
        return settings or EngineSettings()

    def progress(self, adapter: Adapter, settings: EngineSettings) -> BlockProgress | None:
        """The kept state of this run's prune (``engine.resume``; :mod:`pruners.resume`), or None."""
        if settings.resume_dir is None:
            return None
        return BlockProgress(settings.resume_dir, settings.resume_key, len(adapter.blocks()))

    def scoring_parts(self, settings: EngineSettings) -> dict:
        """What the scoring pass's statistics depend on besides the model, the windows and the engine (the sweep
        cache's key, ``settings.reuse``): the statistic, the units observed, the blocks. Not the ratio, the allocation
        nor the method's score, which are computed from them: every sweep point of a method shares one pass."""
        blocks = getattr(self, "blocks", None)
        return {"statistic": self.statistic.__name__, "attention_unit": self.attention_unit,
                "attention_only": self.attention_only, "blocks": list(blocks) if blocks is not None else None,
                "stats_dtype": str(settings.stats_dtype), "code_files": ["pruners/structured.py"]}

    @torch.no_grad()
    def prune(self, model, adapter: Adapter, pattern: Pattern, calib_ids, settings: EngineSettings | None = None,
              ratios=None) -> dict[str, ModuleResult]:
        settings = self.start(pattern, calib_ids, settings, ratios)
        progress = self.progress(adapter, settings)
        plan = progress.plan() if progress is not None else None
        if plan is not None:  # a resumed prune: the units and statistics decided before it was stopped
            keep = {_plan_key(k): mask for k, mask in plan["keep"].items()}
            kept_stats = {_plan_key(k): statistic_from_state(state) for k, state in plan["stats"].items()}
            return self.apply(model, adapter, keep, kept_stats, calib_ids, settings)
        scores, params, protected, kept_stats = {}, {}, {}, {}

        def score(index: int, block, stats: dict) -> None:
            for group in self.groups(adapter, block):
                key = (index, group.kind)
                scores[key] = self.unit_scores(block, group, stats.get(group.kind), pattern).cpu()
                params[key] = group.params_per_unit(block)
                protected[key] = top_units(scores[key], self.min_units)
                if self.keeps_statistics:
                    kept_stats[key] = _moved(stats[group.kind], "cpu")

        cache = settings.reuse if self.needs_calibration and calib_ids is not None else None
        parts = self.scoring_parts(settings) if cache is not None else {}
        found = cache.get(SCORING_PASS, parts) if cache is not None else None
        if found is not None:  # an earlier sweep point's scoring pass: the same statistics, no pass over the windows
            for index, block in enumerate(adapter.blocks()):
                if self.prunes_block(index):
                    home = next(block.parameters()).device
                    block.to(settings.device)
                    score(index, block, {kind: _moved(statistic_from_state(state), settings.device)
                                         for kind, state in found[str(index)].items()})
                    block.to(home)
        else:
            kept, size = ({}, 0) if cache is not None else (None, 0)
            blocks = walk_blocks(model, adapter, calib_ids if self.needs_calibration else None,
                                 lambda b: reader_taps(adapter, b, self.groups(adapter, b)),
                                 self.statistic, settings, "dense", desc=f"{self.name} scores", writes=False)
            for index, block, stats in blocks:
                if not self.prunes_block(index):
                    continue
                if kept is not None:  # (for the sweep cache: kept while they fit its bound)
                    kept[str(index)] = {kind: statistic_state(stat) for kind, stat in stats.items()}
                    size += sum(v.numel() * v.element_size() for st in kept[str(index)].values()
                                for v in st["tensors"].values())
                    if size > cache.max_bytes:
                        kept, cache.events[SCORING_PASS] = None, "too large"
                score(index, block, stats)
            if kept is not None:
                cache.put(SCORING_PASS, parts, kept)
        keep = self.allocate(scores, params, pattern, protected)
        keep = {key: adapter.repair_keep(adapter.blocks()[key[0]], adapter.unit_group(adapter.blocks()[key[0]], key[1]),
                                         mask, scores[key]) for key, mask in keep.items()}
        if progress is not None:
            progress.save_plan({"keep": {f"{i}/{kind}": mask for (i, kind), mask in keep.items()},
                                "stats": {f"{i}/{kind}": statistic_state(stat) for (i, kind), stat in kept_stats.items()}})
        return self.apply(model, adapter, keep, kept_stats, calib_ids, settings)


def _plan_key(text: str) -> tuple[int, str]:
    index, kind = text.split("/", 1)
    return int(index), kind


SCORING_PASS = "structured_statistics"  # the sweep cache's kind for a scoring pass (runners/reuse.py)


def remove_kept(adapter: Adapter, block, group: UnitGroup, keep: torch.Tensor, prefix: str, index: int,
                loss: float | None = None) -> tuple[str, ModuleResult]:
    """Remove the units ``keep`` does not mark; the result is recorded under the group's reader."""
    kept = keep.nonzero().flatten()
    adapter.remove_units(block, group.kind, kept)
    result = ModuleResult(pruned=int((~keep).sum()), total=keep.numel(), loss=loss, unit_kind=group.kind,
                          kept_units=kept.tolist())
    return f"{prefix}.{index}.{group.reader}", result


def _moved(stat, device):
    """``stat`` with its tensors on ``device``."""
    for name, value in vars(stat).items():
        if isinstance(value, torch.Tensor):
            setattr(stat, name, value.to(device))
    stat.device = device
    return stat
