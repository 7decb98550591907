"""The thin interface between a method and the sequential engine."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from .masks import Pattern
from .stats import Hessian, damped_inverse_cholesky


@dataclass
class ModuleResult:
    """What pruning one linear did (recorded per module)."""

    pruned: int
    total: int
    loss: float | None = None  # the method's own layer-wise loss estimate, where it has one
    unit_kind: str | None = None  # structured pruning: the kind of unit removed (recorded under its reader)
    kept_units: list[int] | None = None  # ... and the indices of the units kept


class Pruner:
    """A method: its statistic (per group of linears sharing an input) and its per-group pruning step.

    Subclasses are dataclasses whose fields are the method's config keys (``conf/pruner/<name>.yaml``).
    """

    name: ClassVar[str]
    statistic: ClassVar[type | None] = None  # None: no calibration data needed
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "nm")
    propagate: ClassVar[str] = "pruned"  # the next block is calibrated on the pruned block's outputs
    removes_weights: ClassVar[bool] = True  # False for the dense baseline: its result ignores the pattern
    tf32: ClassVar[bool] = False  # TF32 off, as in the SparseGPT reference

    @property
    def needs_calibration(self) -> bool:
        return self.statistic is not None

    @classmethod
    def config_keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def check(self, pattern: Pattern) -> None:
        """Raise ValueError if this method cannot produce ``pattern`` with these settings."""
        if pattern.kind not in self.patterns:
            raise ValueError(f"pruner '{self.name}' does not support sparsity kind '{pattern.kind}'")

    def prune_group(self, modules: dict[str, nn.Linear], stat, pattern: Pattern) -> dict[str, ModuleResult]:
        """Prune the linears of one group in place, using the group's statistic."""
        raise NotImplementedError

    def prune(self, model, adapter, pattern: Pattern, calib_ids, device="cpu", batch_size: int = 8,
              stats_dtype=torch.float32, progress: bool = True) -> dict[str, ModuleResult]:
        """Prune the whole model; layer-wise methods go block by block through the sequential engine."""
        from .engine import prune_sequential

        return prune_sequential(model, adapter, self, pattern, calib_ids, device, batch_size, stats_dtype, progress)


def apply_prune_mask(module: nn.Linear, weight: torch.Tensor, prune_mask: torch.Tensor) -> ModuleResult:
    """Write ``weight`` with ``prune_mask`` zeroed back into the module, in its dtype."""
    weight = weight.masked_fill(prune_mask, 0)
    module.weight.data.copy_(weight.to(module.weight.dtype))
    return ModuleResult(pruned=int(prune_mask.sum()), total=prune_mask.numel())


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


class InverseHessianPruner(Pruner):
    """A method that prunes each linear from the damped inverse Hessian of its group (SparseGPT, APT).

    The factorization ``H^-1 = U^T U`` is computed once per group of linears sharing an input, dead
    inputs are zeroed, and :meth:`prune_weight` does the method's mask selection and update.
    Subclasses declare a ``percdamp`` field.
    """

    statistic = Hessian
    percdamp: float

    def prune_weight(self, weight: torch.Tensor, U: torch.Tensor, pattern: Pattern):
        """Return (pruned weight, prune mask, the method's loss estimate)."""
        raise NotImplementedError

    def prune_group(self, modules, stat, pattern):
        U, dead = damped_inverse_cholesky(stat.matrix.float(), self.percdamp)
        results = {}
        for name, module in modules.items():
            weight = module.weight.data.float()
            weight[:, dead] = 0
            pruned, mask, loss = self.prune_weight(weight, U, pattern)
            module.weight.data.copy_(pruned.to(module.weight.dtype))
            results[name] = ModuleResult(pruned=int(mask.sum()), total=mask.numel(), loss=loss)
        return results
