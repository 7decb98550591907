"""``pruner=sparsegpt_reference``: SparseGPT's own code (IST-DASLab/sparsegpt) on a PruneLab run's model and
calibration windows, beside ``pruner=sparsegpt`` in a benchmark preset (docs/methods.md §3.10).

Its sequential driver as its scripts run it: ``llama.py: llama_sequential`` (LLaMA-family adapters) or ``opt.py:
opt_sequential`` (OPT), one window at a time, its ``SparseGPT`` class per linear (one Hessian and one factorisation
per linear), with its command-line defaults (``--percdamp 0.01 --blocksize 128``, no quantisation, not true
sequential) and this run's sparsity. Shims (:mod:`pruners.reference`): our windows as its data loader, its
``args`` set as its ``__main__`` would, ``position_embeddings`` for its bare block calls under transformers 5.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar

from .base import ModuleResult, Pruner, register
from .masks import Pattern
from .reference import (
    ReferenceCheckout,
    cuda_calls_on_cpu,
    import_from_checkout,
    prune_masks,
    quiet,
    rotary_for_bare_calls,
)
from .settings import EngineSettings

REPOSITORY = "IST-DASLab/sparsegpt"
# the adapter family -> (its script module, the sequential driver in it)
DRIVERS = {"llama": ("llama", "llama_sequential"), "opt": ("opt", "opt_sequential")}


@register
@dataclass
class SparseGPTReference(ReferenceCheckout, Pruner):
    name = "sparsegpt_reference"
    needs_calibration = True
    scope = "model"
    repository, variable, required = REPOSITORY, "PRUNELAB_SPARSEGPT_REFERENCE", ("sparsegpt.py", "llama.py", "opt.py")
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "nm")
    families: ClassVar[tuple[str, ...]] = tuple(DRIVERS)
    path: str | None = None  # a checkout of IST-DASLab/sparsegpt; null: $PRUNELAB_SPARSEGPT_REFERENCE
    blocksize: int = 128
    percdamp: float = 0.01

    def check(self, pattern: Pattern) -> None:
        super().check(pattern)
        self.checkout_root()

    def prune_model(self, model, adapter, pattern: Pattern, calib_ids, settings: EngineSettings
                    ) -> dict[str, ModuleResult]:
        script, driver = DRIVERS[adapter.family]
        root = self.checkout_root()
        module = import_from_checkout(root, ("sparsegpt", "modelutils", "quant", script))[script]
        nm = pattern.kind == "nm"
        module.args = argparse.Namespace(
            nsamples=len(calib_ids), sparsity=pattern.ratio if not nm else 0.0, prunen=pattern.n if nm else 0,
            prunem=pattern.m if nm else 0, percdamp=self.percdamp, blocksize=self.blocksize, minlayer=-1,
            maxlayer=1000, prune_only="", invert=False, wbits=16, true_sequential=False, gmp=False)
        model.seqlen = calib_ids.shape[1]
        loader = [(window.unsqueeze(0), None) for window in calib_ids]
        with quiet(self.name), rotary_for_bare_calls(adapter), cuda_calls_on_cpu(settings.device):
            getattr(module, driver)(model, loader, settings.device)
        return prune_masks(adapter)
