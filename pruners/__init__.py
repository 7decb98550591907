"""Pruning methods (one file each), the sequential engine, and the shared mask / statistics code."""

from __future__ import annotations

from .apt import APT
from .base import ModuleResult, Pruner
from .dense import Dense
from .engine import prune_sequential, walk_blocks
from .flap import FLAP
from .magnitude import Magnitude
from .masks import Pattern
from .numerical import Numerical
from .sparsegpt import SparseGPT
from .wanda import Wanda

PRUNERS: dict[str, type[Pruner]] = {cls.name: cls for cls in (Dense, Magnitude, Wanda, SparseGPT, APT, Numerical, FLAP)}


def build_pruner(cfg: dict) -> Pruner:
    """Instantiate a pruner from its config group (``name`` + the method's keys); ValueError on bad keys."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in PRUNERS:
        raise ValueError(f"pruner '{name}' is not one of: {', '.join(sorted(PRUNERS))}")
    cls = PRUNERS[name]
    unknown = sorted(set(cfg) - set(cls.config_keys()))
    if unknown:
        raise ValueError(f"pruner '{name}' has no option(s) {', '.join(unknown)} (options: {', '.join(cls.config_keys()) or 'none'})")
    return cls(**cfg)


__all__ = ["PRUNERS", "Pattern", "Pruner", "ModuleResult", "build_pruner", "prune_sequential", "walk_blocks"]
