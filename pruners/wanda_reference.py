"""``pruner=wanda_reference``: Wanda's own code (locuslab/wanda) on a PruneLab run's model and calibration windows,
beside ``pruner=wanda`` in a benchmark preset (docs/methods.md §3.10).

Its ``prune_wanda`` as ``main.py`` / ``main_opt.py`` call it (``lib/prune.py`` for LLaMA-family adapters,
``lib/prune_opt.py`` for OPT): one window at a time, per-row unstructured or N:M, not its ``--use_variant``. Shims
(:mod:`pruners.reference`): its ``get_loaders`` returns our windows, an empty ``hf_device_map`` (one device),
``position_embeddings`` for its bare block calls under transformers 5. Its calibration buffer holds 128 windows.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar

import torch

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
from .taps import model_on_device

REPOSITORY = "locuslab/wanda"
MODULES = {"llama": "lib.prune", "opt": "lib.prune_opt"}  # the adapter family -> its module


@register
@dataclass
class WandaReference(ReferenceCheckout, Pruner):
    name = "wanda_reference"
    needs_calibration = True
    scope = "model"
    repository, variable, required = REPOSITORY, "PRUNELAB_WANDA_REFERENCE", ("lib/prune.py", "lib/prune_opt.py")
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "nm")
    families: ClassVar[tuple[str, ...]] = tuple(MODULES)
    max_windows: ClassVar[int] = 128  # its calibration buffer
    path: str | None = None  # a checkout of locuslab/wanda; null: $PRUNELAB_WANDA_REFERENCE

    def check(self, pattern: Pattern) -> None:
        super().check(pattern)
        self.checkout_root()

    def prune_model(self, model, adapter, pattern: Pattern, calib_ids, settings: EngineSettings
                    ) -> dict[str, ModuleResult]:
        root = self.checkout_root()
        module = import_from_checkout(root, (MODULES[adapter.family],))[MODULES[adapter.family]]
        windows = [(window.unsqueeze(0), None) for window in calib_ids]
        module.get_loaders = lambda *args, **kwargs: (windows, None)
        nm = pattern.kind == "nm"
        args = argparse.Namespace(nsamples=len(calib_ids), seed=0, sparsity_ratio=pattern.ratio if not nm else 0.5,
                                  use_variant=False)
        model.seqlen = calib_ids.shape[1]
        model.hf_device_map = {}
        try:  # (the whole model on the device: its code expects device_map="auto" and moves nothing)
            with quiet(self.name), rotary_for_bare_calls(adapter), cuda_calls_on_cpu(settings.device), \
                    model_on_device(model, settings.device):
                module.prune_wanda(args, model, None, torch.device(settings.device),
                                   prune_n=pattern.n if nm else 0, prune_m=pattern.m if nm else 0)
        finally:
            del model.hf_device_map
        return prune_masks(adapter)
