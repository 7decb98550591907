"""Per-layer sparsity allocation: which linears are pruned and at what ratio (docs/methods.md §3.4).

``sparsity.allocation`` chooses how the target ratio ``S`` is spread over the prunable linears before a
layer-wise method prunes them, block by block, at their own ratio:

- ``uniform``: every targeted linear at ``S`` (the papers' default);
- ``owl``: OWL (Yin et al., ICML'24): one ratio per block from its outlier ratio, mean ``S``
  (:func:`outlier_ratio`, :func:`owl_sparsities`), measured on the dense model first;
- ``global``: one threshold on the method's own score over every targeted linear of the dense model;
  each linear is then pruned at the share of its weights below it (:func:`global_ratios`);
- ``list``: ``sparsity.block_ratios``, one ratio per block as a paper prints it (:func:`list_ratios`), whose
  parameter-weighted mean must be ``sparsity.ratio`` (to 0.005).

``sparsity.targets`` / ``sparsity.ignore`` are glob patterns of module names relative to a block
(``self_attn.*``, ``mlp.down_proj``): a linear is pruned if it matches a target and no ignore pattern;
the others stay dense. The dense pass (:func:`allocate`) is the sequential engine's block walk with dense
propagation, as in the OWL reference, and nothing of the model changes during it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np
import torch

from .masks import Pattern
from .settings import EngineSettings
from .stats import ColumnSquares, wanda_score

KINDS = ("uniform", "owl", "global", "list")
LIST_TOLERANCE = 0.005  # list: |parameter-weighted mean of block_ratios - sparsity.ratio| allowed
FLOOR = 0.01  # the OWL reference: a block sparsity <= 0 becomes 0.01


@dataclass(frozen=True)
class Allocation:
    """The ``sparsity`` section's allocation keys (defaults: the OWL paper's LLaMA-7B setting)."""

    kind: str = "uniform"
    owl_lambda: float = 0.08  # lambda: block sparsities span at most 2 lambda (the reference's --Lamda)
    owl_m: float = 5.0  # M: an outlier exceeds M times the block's mean metric (the reference's --Hyper_m)
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    block_ratios: tuple[float, ...] = ()  # list: the ratio of each block, in order (a schedule a paper prints)

    @classmethod
    def from_config(cls, cfg) -> Allocation:
        """From a ``sparsity`` section; keys it lacks take the defaults. ValueError on a bad value."""
        get = cfg.get if hasattr(cfg, "get") else (lambda key, default=None: default)
        kind = get("allocation", cls.kind)
        if kind not in KINDS:
            raise ValueError(f"sparsity.allocation='{kind}' is not one of: {', '.join(KINDS)}")
        lam, m = get("owl_lambda", cls.owl_lambda), get("owl_m", cls.owl_m)
        if not 0 < float(lam) < 1:
            raise ValueError(f"sparsity.owl_lambda={lam} must be in (0, 1)")
        if not float(m) > 0:
            raise ValueError(f"sparsity.owl_m={m} must be positive")
        targets, ignore = get("targets", list(cls.targets)), get("ignore", list(cls.ignore))
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        ignore = (ignore,) if isinstance(ignore, str) else tuple(ignore)
        if not targets:
            raise ValueError("sparsity.targets is empty: nothing would be pruned")
        blocks = tuple(float(r) for r in (get("block_ratios", []) or []))
        if kind == "list":
            if not blocks:
                raise ValueError("sparsity.allocation=list needs sparsity.block_ratios: one ratio per block")
            for i, r in enumerate(blocks):
                if not 0.0 <= r < 1.0:
                    raise ValueError(f"sparsity.block_ratios[{i}]={r:g} is outside [0, 1)")
        elif blocks:
            raise ValueError(f"sparsity.block_ratios is read only with sparsity.allocation=list (got {kind})")
        return cls(str(kind), float(lam), float(m), targets, ignore, blocks)

    @property
    def is_default(self) -> bool:
        """Uniform over every prunable linear: the engine's plain path."""
        return self.kind == "uniform" and self.targets == ("*",) and not self.ignore

    @property
    def needs_calibration(self) -> bool:
        """OWL's outlier pass needs activations whatever the method (its metric is Wanda's)."""
        return self.kind == "owl"

    def selects(self, name: str) -> bool:
        """Whether the linear ``name`` (relative to its block) is pruned."""
        return any(fnmatchcase(name, t) for t in self.targets) and not any(fnmatchcase(name, i) for i in self.ignore)

    def check(self, pattern: Pattern) -> None:
        if self.kind != "uniform" and pattern.kind != "unstructured":
            raise ValueError(f"sparsity.allocation={self.kind} needs an unstructured pattern (got {pattern.describe()})")
        if not self.is_default and pattern.removes_units:
            raise ValueError("sparsity.targets / sparsity.ignore do not apply to structured pruning "
                             "(structured pruners choose their own units)")

    def describe(self) -> str:
        """Short label for reports: ``OWL λ=0.08 M=5``, ``global``; empty for the default."""
        parts = []
        if self.kind == "owl":
            parts.append(f"OWL λ={self.owl_lambda:g} M={self.owl_m:g}")
        elif self.kind == "global":
            parts.append("global")
        elif self.kind == "list":
            parts.append("list " + ",".join(f"{r:g}" for r in self.block_ratios))
        if self.targets != ("*",):
            parts.append("targets " + ",".join(self.targets))
        if self.ignore:
            parts.append("ignore " + ",".join(self.ignore))
        return "; ".join(parts)


@dataclass
class LayerRatios:
    """The allocation's result: a ratio per targeted linear (full module name); linears not listed stay dense."""

    kind: str
    ratios: dict[str, float]
    block_ratios: list[float | None] = field(default_factory=list)  # one per block (None: mixed / nothing pruned)
    outlier_ratios: list[float] | None = None  # OWL: each block's outlier ratio D_l, in percent

    def to_record(self, allocation: Allocation) -> dict:
        out = {"kind": self.kind, "targets": list(allocation.targets), "ignore": list(allocation.ignore),
               "block_ratios": [None if r is None else round(r, 8) for r in self.block_ratios]}
        if self.kind == "owl":
            out.update(owl_lambda=allocation.owl_lambda, owl_m=allocation.owl_m,
                       outlier_ratios=[round(d, 8) for d in self.outlier_ratios or []])
        return out


# --- the math (pure functions) ---------------------------------------------------------------------------------
def outlier_ratio(metric: torch.Tensor, m: float) -> float:
    """OWL's layer outlier ratio ``D = 100 * mean(A > M * mean(A))`` over the pooled metric ``A`` of a block
    (docs/methods.md §3.4, step 2)."""
    metric = metric.flatten()
    return float((metric > metric.mean() * m).sum().item()) / metric.numel() * 100


def owl_sparsities(outlier_ratios: Sequence[float], target: float, lam: float, floor: float = FLOOR) -> list[float]:
    """Block sparsities from outlier ratios (docs/methods.md §3.4, step 3).

    ``r = (D - min D) / (max D - min D) * 2 lambda``; density ``= r - mean(r) + (1 - S)``; sparsity
    ``= 1 - density``, so the mean is ``S`` and blocks with more outliers are pruned less. Only a floor
    clamp (``<= 0`` becomes ``floor``), as in the reference; all-equal ratios give ``S`` everywhere (the
    reference divides by zero there).
    """
    d = np.asarray(outlier_ratios, dtype=np.float64)
    if d.size == 0 or d.max() == d.min():
        return [float(target)] * int(d.size)
    r = (d - d.min()) * (1 / (d.max() - d.min()) * lam * 2)
    density = r - np.mean(r) + (1 - target)
    sparsity = 1 - density
    return [float(floor) if s <= 0 else float(s) for s in sparsity]


def list_ratios(block_ratios: Sequence[float], target: float, sizes: Sequence[int]) -> list[float]:
    """An explicit schedule (``sparsity.allocation=list``): ``block_ratios`` as given, one per block, checked to have
    one entry per block and a parameter-weighted mean (over the targeted weights of each block, ``sizes``) within
    :data:`LIST_TOLERANCE` of ``sparsity.ratio``, so that the run's label and target say what it did."""
    if len(block_ratios) != len(sizes):
        raise ValueError(f"sparsity.block_ratios has {len(block_ratios)} entries; the model has {len(sizes)} blocks")
    total = sum(sizes)
    mean = sum(r * s for r, s in zip(block_ratios, sizes, strict=True)) / total if total else 0.0
    if abs(mean - target) > LIST_TOLERANCE:
        raise ValueError(f"sparsity.block_ratios: their parameter-weighted mean is {mean:.4f}, not sparsity.ratio="
                         f"{target:g} (set sparsity.ratio={round(mean, 4):g}, or change the list)")
    return [float(r) for r in block_ratios]


def global_ratios(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, float]:
    """One threshold over every score (``int(total * ratio)`` lowest overall, ties by position): each module's
    ratio is the share of its entries below it (docs/methods.md §3.4, "global")."""
    from .masks import global_prune_masks

    masks = global_prune_masks(scores, ratio)
    return {name: float(mask.sum().item()) / mask.numel() for name, mask in masks.items()}


# --- the dense pass ----------------------------------------------------------------------------------------------
def targeted(adapter, allocation: Allocation) -> dict[int, list[str]]:
    """Per block index, the names (relative to the block) of the linears the allocation prunes."""
    out = {i: [n for n in adapter.prunable_linears(block) if allocation.selects(n)]
           for i, block in enumerate(adapter.blocks())}
    if not any(out.values()):
        names = sorted(adapter.prunable_linears(adapter.blocks()[0])) if adapter.blocks() else []
        raise ValueError(f"sparsity.targets={list(allocation.targets)} / sparsity.ignore={list(allocation.ignore)} "
                         f"select no prunable linear (a block has: {', '.join(names)})")
    return out


def check_against(adapter, allocation: Allocation, pattern: Pattern) -> None:
    """The allocation's keys against an architecture (an empty model on the meta device is enough): targets /
    ignore select something; a ``list`` schedule has one ratio per block and the right mean. ValueError."""
    chosen = targeted(adapter, allocation)
    if allocation.kind == "list":
        list_ratios(allocation.block_ratios, pattern.ratio, _targeted_sizes(adapter, chosen))


def _targeted_sizes(adapter, chosen: dict[int, list[str]]) -> list[int]:
    return [sum(adapter.prunable_linears(block)[n].weight.numel() for n in chosen[i])
            for i, block in enumerate(adapter.blocks())]


def allocate(model, adapter, pruner, pattern: Pattern, allocation: Allocation, calib_ids: torch.Tensor | None,
             settings: EngineSettings | None = None, reuse=None) -> LayerRatios | None:
    """The per-module ratios of ``allocation`` for ``pruner`` at ``pattern``; None for the default (uniform over
    every linear), so that the engine's plain path is taken. OWL and global walk the dense model once.
    ``reuse(kind, parts, compute)``: a cache for what does not depend on the pruning (OWL's outlier ratios, keyed
    by the parts given here plus the caller's: the model, the windows; runners/reuse.py)."""
    allocation.check(pattern)
    if allocation.is_default:
        return None
    prefix = adapter.blocks_prefix()
    chosen = targeted(adapter, allocation)

    def full(index: int, name: str) -> str:
        return f"{prefix}.{index}.{name}"

    if allocation.kind == "uniform":
        ratios = {full(i, n): pattern.ratio for i, names in chosen.items() for n in names}
        return LayerRatios("uniform", ratios, [pattern.ratio if names else None for names in chosen.values()])
    if allocation.kind == "list":
        per_block = list_ratios(allocation.block_ratios, pattern.ratio, _targeted_sizes(adapter, chosen))
        ratios = {full(i, n): per_block[i] for i, names in chosen.items() for n in names}
        return LayerRatios("list", ratios, [per_block[i] if names else None for i, names in chosen.items()])
    if allocation.kind == "owl":
        if calib_ids is None:
            raise ValueError("sparsity.allocation=owl needs calibration data")
        def outliers_now():
            return owl_outlier_ratios(model, adapter, calib_ids, allocation, chosen, settings)

        parts = {"owl_m": allocation.owl_m, "targets": chosen,
                 "stats_dtype": str((settings or EngineSettings()).stats_dtype)}
        outliers = reuse("owl_outliers", parts, outliers_now) if reuse is not None else outliers_now()
        outliers = [float(x) for x in outliers]
        per_block = owl_sparsities(outliers, pattern.ratio, allocation.owl_lambda)
        for index, s in enumerate(per_block):
            if s >= 1:
                raise ValueError(f"OWL gives block {index} sparsity {s:.4f} >= 1 at sparsity.ratio={pattern.ratio} "
                                 f"and sparsity.owl_lambda={allocation.owl_lambda}: lower one of them")
        ratios = {full(i, n): per_block[i] for i, names in chosen.items() for n in names}
        return LayerRatios("owl", ratios, [per_block[i] if names else None for i, names in chosen.items()], outliers)
    scores = method_scores(model, adapter, pruner, calib_ids, chosen, settings)
    ratios = global_ratios(scores, pattern.ratio)
    block_ratios = []
    for i, names in chosen.items():
        sizes = [scores[full(i, n)].numel() for n in names]
        block_ratios.append(sum(ratios[full(i, n)] * s for n, s in zip(names, sizes, strict=True)) / sum(sizes)
                            if names else None)
    return LayerRatios("global", ratios, block_ratios)


def _group_taps(adapter):
    def taps_of(block):
        return {group: (group.tap, block.get_submodule(group.names[0]).in_features)
                for group in adapter.linear_groups(block)}
    return taps_of


@torch.no_grad()
def owl_outlier_ratios(model, adapter, calib_ids: torch.Tensor, allocation: Allocation,
                       chosen: dict[int, list[str]], settings: EngineSettings | None = None) -> list[float]:
    """Per block, :func:`outlier_ratio` of the Wanda metric ``|W| * ||X_j||`` of its targeted linears, pooled
    (docs/methods.md §3.4, step 1): the calibration windows run through the dense model, block by block."""
    from .engine import walk_blocks

    out = []
    blocks = walk_blocks(model, adapter, calib_ids, _group_taps(adapter), ColumnSquares, settings,
                         propagate="dense", desc="OWL outlier ratios")
    for index, block, stats in blocks:
        metrics = []
        for group in adapter.linear_groups(block):
            for name in group.names:
                if name in chosen[index]:
                    weight = block.get_submodule(name).weight.data.float()
                    metrics.append(wanda_score(weight, _calibrated(stats[group]).norm).flatten().cpu())
        out.append(outlier_ratio(torch.cat(metrics), allocation.owl_m) if metrics else 0.0)
    return out


def _calibrated(stat):
    """``stat``, or, for an MoE expert no calibration token reached (count 0), column squares of ones: its weights
    are then ranked by magnitude, the rule it is pruned by (models/moe.py), not as all-zero scores."""
    if stat is None or stat.count > 0 or not isinstance(stat, ColumnSquares):
        return stat
    ones = ColumnSquares(stat.dim, stat.device, stat.dtype)
    ones.mean_sq.fill_(1.0)
    ones.count = 1
    return ones


@torch.no_grad()
def method_scores(model, adapter, pruner, calib_ids, chosen: dict[int, list[str]],
                  settings: EngineSettings | None = None) -> dict[str, torch.Tensor]:
    """The method's own score (:meth:`pruners.base.ScoreMaskPruner.score`) of every targeted linear of the dense
    model, on the CPU (4 bytes per prunable weight), keyed by full module name."""
    from .base import ScoreMaskPruner
    from .engine import walk_blocks

    if not isinstance(pruner, ScoreMaskPruner):
        raise ValueError(f"sparsity.allocation=global needs a method with a per-weight score (magnitude, wanda); "
                         f"'{pruner.name}' updates weights as it prunes")
    prefix = adapter.blocks_prefix()
    statistic = pruner.statistic
    ids = calib_ids if pruner.needs_calibration else None
    scores = {}
    blocks = walk_blocks(model, adapter, ids, _group_taps(adapter), statistic, settings,
                         propagate="dense", desc="global scores")
    for index, block, stats in blocks:
        for group in adapter.linear_groups(block):
            for name in group.names:
                if name in chosen[index]:
                    weight = block.get_submodule(name).weight.data.float()
                    stat = stats.get(group)
                    scores[f"{prefix}.{index}.{name}"] = pruner.score(weight, _calibrated(stat)).cpu()
    return scores
