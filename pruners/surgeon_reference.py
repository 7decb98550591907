"""``pruner=surgeon_reference``: the LLM Surgeon's own code (Qualcomm-AI-research/llm-surgeon), run on the model
and calibration windows of a PruneLab run, so that a benchmark preset can put it beside ``pruner=surgeon`` (same
inputs, same evaluation, prune time and perplexity as ratios; docs/methods.md §5.8).

Nothing of the reference is copied: ``pruner.path`` names a checkout of it, whose modules (``curvature``,
``sparsify``, ...) are imported from there. Each shot is the reference's ``surgeon.py`` shot loop: its ``KFAC``
(or ``Activations`` for L-OBD) over the calibration windows (batch 1, in order: the reference shuffles them, which
only changes the summation order), then its ``sparsify_model`` at ``t S / T``. Shims, outside its files:
``pynvml`` is stubbed when missing (imported for logging only), the device is ours (its ``surgeon.py`` hard-codes
CUDA), its console output goes to the log at debug level. Its code knows OPT and LLaMA only, and 2:4 only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from .base import ModuleResult, Pruner, register
from .masks import Pattern
from .reference import checkout_root, import_from_checkout, prune_masks
from .settings import EngineSettings
from .surgeon import script_defaults
from .taps import model_on_device

log = logging.getLogger("prunelab")
MODULES = ("attention", "utils", "curvature", "threshold", "modelutils", "pruner", "sparsify")


def load_reference(path: str | Path) -> dict[str, types.ModuleType]:
    """The reference's modules, imported from the checkout at ``path``."""
    return import_from_checkout(checkout_root(path, ("sparsify.py", "curvature.py"),
                                              "Qualcomm-AI-research/llm-surgeon"), MODULES)


class _Collate:
    """The reference reads a batch as ``batch.return_tensors[0]`` (its ``DefaultDataCollator`` quirk)."""

    def __init__(self, batch):
        self.return_tensors = batch


@register
@dataclass
class SurgeonReference(Pruner):
    """The reference implementation of the LLM Surgeon, K-OBD (``obd``) and L-OBD (``curvature=activations``)."""

    name = "surgeon_reference"
    needs_calibration = True
    needs_gradients = True
    scope = "model"
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "nm", "rowcol")
    path: str | None = None  # a checkout of Qualcomm-AI-research/llm-surgeon; null: $PRUNELAB_SURGEON_REFERENCE
    curvature: str = "kfac"  # kfac (Surgeon, K-OBD) | activations (L-OBD)
    obd: bool = False  # no weight update (K-OBD, L-OBD)
    shots: int = 5
    damp_g: float | None = None  # null: as pruner=surgeon (the scripts' flags for the pattern)
    damp_a: float = 0.01
    max_correlate: int | None = None
    addupdate: bool | None = None
    fisher_samples: int = 0  # its --fisher_samples: 0 = the true labels

    @property
    def checkout(self) -> str | None:
        return self.path or os.environ.get("PRUNELAB_SURGEON_REFERENCE") or None

    def check(self, pattern: Pattern) -> None:
        super().check(pattern)
        if not self.checkout:
            raise ValueError("pruner.path: set it (or $PRUNELAB_SURGEON_REFERENCE) to a checkout of "
                             "Qualcomm-AI-research/llm-surgeon (git clone "
                             "https://github.com/Qualcomm-AI-research/llm-surgeon)")
        if not (Path(self.checkout).expanduser() / "sparsify.py").is_file():
            raise ValueError(f"pruner.path={self.checkout} is not a checkout of Qualcomm-AI-research/llm-surgeon")
        if self.curvature not in ("kfac", "activations"):
            raise ValueError(f"pruner.curvature='{self.curvature}' is not one of: kfac, activations")
        if self.shots < 1:
            raise ValueError(f"pruner.shots={self.shots} must be >= 1")
        if pattern.kind == "nm" and (pattern.n, pattern.m) != (2, 4):
            raise ValueError(f"the reference code prunes 2:4 only, not {pattern.n}:{pattern.m}")

    def prune_model(self, model, adapter, pattern: Pattern, calib_ids, settings: EngineSettings
                    ) -> dict[str, ModuleResult]:
        ref = load_reference(self.checkout)
        flags = script_defaults(pattern, self.damp_g, self.max_correlate, self.addupdate)
        structures = {"unstructured": ["element"], "nm": ["2:4"], "rowcol": ["row", "column"]}[pattern.kind]
        windows = [w.tolist() for w in calib_ids]
        target = pattern.target_sparsity
        with model_on_device(model, settings.device):
            for shot in tqdm(range(1, self.shots + 1), desc=f"{self.name} {pattern.describe()}", unit="shot",
                             disable=not settings.progress):
                loader = torch.utils.data.DataLoader(windows, batch_size=1, shuffle=False, collate_fn=_Collate)
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    if self.curvature == "activations":
                        curvature = ref["curvature"].Activations(model, loader, nsamples=len(windows),
                                                                 dev=settings.device, curvature_dev="cpu")
                    else:
                        curvature = ref["curvature"].KFAC(model, loader, self.fisher_samples, 1, use_iad=True, nsamples=len(windows),
                                                          dev=settings.device, curvature_dev="cpu")
                    ref["sparsify"].sparsify_model(model, shot * target / self.shots, structures, curvature,
                                                   self.obd, 1.0, flags["max_correlate"], flags["damp_g"],
                                                   self.damp_a, False, False, False, flags["addupdate"], False,
                                                   False)
                    curvature.free()
                log.debug("%s shot %d:\n%s", self.name, shot, out.getvalue())
        return prune_masks(adapter)
