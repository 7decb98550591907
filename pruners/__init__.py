"""Pruning methods (one file each), the sequential engine, and the shared mask / statistics code.

Methods register themselves (``@register`` in their own file, :mod:`pruners.base`); importing this package
imports every module in it, so a new method is one new file (and its ``conf/pruner/<name>.yaml``): no list here
to edit, and no other method's run ids change (docs/adding-a-method.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import PRUNERS, ModuleResult, Pruner, register
from .engine import prune_sequential, walk_blocks
from .masks import Pattern

# scripts that no run imports (runners/record.py: SCRIPT_PREFIXES) are not methods
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith(("build_", "train_", "bench_")):
        importlib.import_module(f"{__name__}.{_module}")


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


__all__ = ["PRUNERS", "Pattern", "Pruner", "ModuleResult", "build_pruner", "prune_sequential", "register",
           "walk_blocks"]
