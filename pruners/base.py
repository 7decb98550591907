"""The thin interface between a method and its driver (docs/architecture.md §1; docs/methods.md §1).

A method declares what it needs as class attributes (``needs_calibration``, ``needs_gradients``,
``scope``, ``propagate``); the engine picks the driver (:func:`pruners.engine.drive`): the sequential block engine
(``scope = "block"``) or the method's own :meth:`Pruner.prune_model` (``scope = "model"``: whole-model
gradients, a global threshold, several shots), which builds on :mod:`pruners.taps` (gradient taps),
:class:`pruners.masks.MaskState` (persistent masks) and :class:`pruners.settings.EngineSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from .engine import drive
from .masks import PATTERN_KINDS, PackedMask, Pattern
from .settings import EngineSettings
from .stats import Hessian, damped_inverse_cholesky

SCOPES = ("block", "model")
PROPAGATIONS = ("pruned", "dense")

# the method registry: filled by the @register decorator in each method's own file (pruners/__init__.py imports
# every module of the package), so adding a method edits no shared file and changes no other method's run ids
PRUNERS: dict[str, type] = {}


def register(cls):
    """Class decorator: make a :class:`Pruner` subclass available as ``pruner=<cls.name>``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}: a registered pruner needs a class attribute name = '<config name>'")
    missing = _missing_members(cls)
    if missing:
        raise TypeError(f"pruner '{name}' ({cls.__name__}): {missing}")
    if name in PRUNERS and PRUNERS[name] is not cls:
        raise ValueError(f"pruner name '{name}' is registered twice ({PRUNERS[name].__name__}, {cls.__name__})")
    PRUNERS[name] = cls
    return cls


def _missing_members(cls) -> str | None:
    """What a registered method lacks, checked at import (docs/architecture.md §1): a known ``scope`` and
    ``propagate``, known pattern kinds, and the driver entry its scope needs (``prune_group`` for the block engine
    unless the method overrides ``prune``; ``prune_model`` for ``scope = "model"``)."""
    if cls.scope not in SCOPES:
        return f"scope '{cls.scope}' is not one of: {', '.join(SCOPES)}"
    if cls.propagate not in PROPAGATIONS:
        return f"propagate '{cls.propagate}' is not one of: {', '.join(PROPAGATIONS)}"
    unknown = [kind for kind in cls.patterns if kind not in PATTERN_KINDS]
    if unknown:
        return f"patterns {unknown} are not among: {', '.join(PATTERN_KINDS)}"
    if cls.needs_gradients and cls.scope != "model":
        return "needs_gradients needs scope 'model' (the block engine has no backward)"
    own_prune = cls.prune is not Pruner.prune
    if cls.scope == "model" and cls.prune_model is Pruner.prune_model and not own_prune:
        return "scope 'model' needs a prune_model method"
    if cls.scope == "block" and cls.prune_group is Pruner.prune_group and not own_prune:
        return "scope 'block' needs a prune_group method (or its own prune)"
    return None


@dataclass
class ModuleResult:
    """What pruning one linear did (recorded per module)."""

    pruned: int
    total: int
    loss: float | None = None  # the method's own layer-wise loss estimate, where it has one
    unit_kind: str | None = None  # structured pruning: the kind of unit removed (recorded under its reader)
    kept_units: list[int] | None = None  # ... and the indices of the units kept
    mask: PackedMask | None = None  # unstructured / N:M: the prune mask (True = removed), see MaskState
    uncalibrated: bool = False  # no calibration token reached it (an MoE expert): pruned by magnitude per row


class Pruner:
    """A method: its statistic (per group of linears sharing an input) and its per-group pruning step.

    Subclasses are dataclasses whose fields are the method's config keys (``conf/pruner/<name>.yaml``).
    """

    name: ClassVar[str]
    statistic: ClassVar[type | None] = None  # the per-group statistic the block engine accumulates (or None)
    needs_calibration: ClassVar[bool] = False  # calibration windows are loaded and passed only if True
    needs_gradients: ClassVar[bool] = False  # backward passes through the whole model (pruners.taps)
    scope: ClassVar[str] = "block"  # block: layer-wise, sequential engine | model: the method's prune_model
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "nm")
    propagate: ClassVar[str] = "pruned"  # the next block is calibrated on the pruned block's outputs | dense
    removes_weights: ClassVar[bool] = True  # False for the dense baseline: its result ignores the pattern
    tf32: ClassVar[bool] = False  # TF32 off, as in the SparseGPT reference
    families: ClassVar[tuple[str, ...] | None] = None  # the adapter families it can drive (None: all); validated
    max_windows: ClassVar[int | None] = None  # the most calibration windows it can hold (None: no limit); validated
    resumes: ClassVar[bool] = False  # its own driver keeps each done block (engine.resume; pruners/resume.py)
    walks_blocks: ClassVar[bool] = False  # its own driver reaches the blocks in order, one at a time (walk_blocks,
    # each_block): it can run onloaded

    @classmethod
    def config_keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def onloads(cls) -> bool:
        """Methods that need one block at a time and can run on an onloaded model (``engine.onload``,
        :mod:`models.onload`): the layer-wise ones, and others that only walk the blocks in order
        (``walks_blocks``: expert pruning, the structured methods' scoring and pruning passes)."""
        return (cls.scope == "block" and cls.prune is Pruner.prune) or cls.walks_blocks

    @classmethod
    def resumable(cls) -> bool:
        """Layer-wise methods that go block by block through :func:`pruners.engine.prune_sequential`, and those whose
        own driver keeps each done block or shot (``resumes``: the structured methods, GOA; the Surgeon, K-OBD and
        L-OBD after each shot): a prune killed after block (shot) k can go
        on from there (``engine.resume``, :mod:`pruners.resume`)."""
        return (cls.scope == "block" and cls.prune is Pruner.prune) or cls.resumes

    def extra_windows(self) -> int:
        """Calibration windows the method needs beyond ``calib.nsamples``, drawn after them from the same source
        and appended to ``calib_ids`` (GOA's recovery set); 0 for most methods."""
        return 0

    def check(self, pattern: Pattern) -> None:
        """Raise ValueError if this method cannot produce ``pattern`` with these settings."""
        if self.scope not in SCOPES:
            raise ValueError(f"pruner '{self.name}' has scope '{self.scope}', not one of: {', '.join(SCOPES)}")
        if self.propagate not in PROPAGATIONS:
            raise ValueError(f"pruner '{self.name}' has propagate '{self.propagate}', not one of: "
                             f"{', '.join(PROPAGATIONS)}")
        if self.needs_gradients and self.scope != "model":
            raise ValueError(f"pruner '{self.name}': gradients need scope 'model' (the block engine has no backward)")
        if pattern.kind not in self.patterns:
            raise ValueError(f"pruner '{self.name}' does not support sparsity kind '{pattern.kind}'")

    def prune_group(self, modules: dict[str, nn.Linear], stat, pattern: Pattern) -> dict[str, ModuleResult]:
        """Prune the linears of one group in place, using the group's statistic."""
        raise NotImplementedError

    def prune(self, model, adapter, pattern: Pattern, calib_ids, settings: EngineSettings | None = None,
              ratios=None) -> dict[str, ModuleResult]:
        """Prune the whole model in place and return per-module results; the engine picks the driver
        (:func:`pruners.engine.drive`: the sequential block engine, or :meth:`prune_model` for ``scope = "model"``).
        ``ratios``: per-linear ratios from :func:`pruners.allocation.allocate` (layer-wise methods only)."""
        return drive(self, model, adapter, pattern, calib_ids, settings, ratios)

    def prune_model(self, model, adapter, pattern: Pattern, calib_ids, settings: EngineSettings
                    ) -> dict[str, ModuleResult]:
        """Whole-model driver of a ``scope = "model"`` method: prune in place, return per-module results
        keyed by full module name, each with its ``mask`` (the shared parts: :mod:`pruners.taps` for
        gradients, :class:`pruners.masks.MaskState` to keep masks across shots, :func:`apply_prune_mask`)."""
        raise NotImplementedError(f"pruner '{self.name}' has scope 'model' but no prune_model")


def apply_prune_mask(module: nn.Linear, weight: torch.Tensor, prune_mask: torch.Tensor) -> ModuleResult:
    """Write ``weight`` with ``prune_mask`` zeroed back into the module, in its dtype."""
    weight = weight.masked_fill(prune_mask, 0)
    module.weight.data.copy_(weight.to(module.weight.dtype))
    return ModuleResult(pruned=int(prune_mask.sum()), total=prune_mask.numel(), mask=PackedMask.pack(prune_mask))


class ScoreMaskPruner(Pruner):
    """A method with no weight update: a score per weight, then the pattern's mask per comparison group.

    Subclasses declare a ``group`` field (``row`` | ``matrix``) and implement :meth:`score`.
    """

    group: str

    def score(self, weight: torch.Tensor, stat) -> torch.Tensor:
        raise NotImplementedError

    def check(self, pattern: Pattern) -> None:
        super().check(pattern)
        if self.group not in ("matrix", "row"):
            raise ValueError(f"pruner.group='{self.group}' is not one of: matrix, row")

    def prune_group(self, modules, stat, pattern):
        from .masks import select_prune_mask

        results = {}
        for name, module in modules.items():
            weight = module.weight.data.float()
            mask = select_prune_mask(self.score(weight, stat), pattern, self.group)
            results[name] = apply_prune_mask(module, weight, mask)
        return results


def prune_uncalibrated(modules: dict[str, nn.Linear], pattern: Pattern) -> dict[str, ModuleResult]:
    """Linears that saw no calibration token (an MoE expert the router never chose, models/moe.py): pruned by
    ``|W|`` per row at the pattern (Wanda's choice where every input norm is equal), no update; marked so."""
    from .masks import select_prune_mask

    results = {}
    for name, module in modules.items():
        weight = module.weight.data.float()
        result = apply_prune_mask(module, weight, select_prune_mask(weight.abs(), pattern, "row"))
        result.uncalibrated = True
        results[name] = result
    return results


class InverseHessianPruner(Pruner):
    """A method that prunes each linear from the damped inverse Hessian of its group (SparseGPT, APT).

    The factorization ``H^-1 = U^T U`` is computed once per group of linears sharing an input, dead
    inputs are zeroed, and :meth:`prune_weight` does the method's mask selection and update.
    Subclasses declare a ``percdamp`` field.
    """

    statistic = Hessian
    needs_calibration = True
    percdamp: float

    def prune_weight(self, weight: torch.Tensor, U: torch.Tensor, pattern: Pattern):
        """Return (pruned weight, prune mask, the method's loss estimate)."""
        raise NotImplementedError

    def prune_weights(self, weights: list[torch.Tensor], U: torch.Tensor, pattern: Pattern) -> list[tuple]:
        """:meth:`prune_weight` for each of a group's weights (a method may do them in one pass: SparseGPT)."""
        return [self.prune_weight(weight, U, pattern) for weight in weights]

    def prune_group(self, modules, stat, pattern):
        U, dead = damped_inverse_cholesky(stat.matrix.float(), self.percdamp)
        results = {}
        weights = []
        for module in modules.values():
            weight = module.weight.data.float()
            weight[:, dead] = 0
            weights.append(weight)
        for (name, module), (pruned, mask, loss) in zip(modules.items(), self.prune_weights(weights, U, pattern),
                                                        strict=True):
            module.weight.data.copy_(pruned.to(module.weight.dtype))
            results[name] = ModuleResult(pruned=int(mask.sum()), total=mask.numel(), loss=loss,
                                         mask=PackedMask.pack(mask))
        return results
