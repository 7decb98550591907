"""Running a method's public reference code on a PruneLab run's model and windows (``pruner=*_reference``), so that a
benchmark preset puts it beside ours: same inputs, same evaluation, same threads, prune time and perplexity as
ratios (docs/methods.md §3.10). Nothing of a reference is copied: ``pruner.path`` (or an environment variable) names a
checkout, whose modules are imported from there; the shims that let it run under the installed transformers are
here, outside its files."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch

log = logging.getLogger("prunelab")


class ReferenceCheckout:
    """Mixin of a ``pruner=*_reference`` wrapper: where its checkout is (``pruner.path``, else ``$<variable>``) and
    the check, before work, that it is one. Subclasses set ``repository``, ``variable`` and ``required``."""

    repository: ClassVar[str]
    variable: ClassVar[str]
    required: ClassVar[tuple[str, ...]]
    path: str | None

    @property
    def checkout(self) -> str | None:
        return self.path or os.environ.get(self.variable) or None

    def checkout_root(self) -> Path:
        if not self.checkout:
            raise ValueError(f"pruner.path: set it (or ${self.variable}) to a checkout of {self.repository} "
                             f"(git clone https://github.com/{self.repository})")
        return checkout_root(self.checkout, self.required, self.repository)


def checkout_root(path: str | Path, required: tuple[str, ...], repository: str, key: str = "pruner.path") -> Path:
    """The checkout at ``path``, or ValueError naming ``key`` where a file the reference must have is missing."""
    root = Path(path).expanduser().resolve()
    missing = [name for name in required if not (root / name).is_file()]
    if missing:
        raise ValueError(f"{key}={path} is not a checkout of {repository} (no {' / '.join(missing)} there)")
    return root


def import_from_checkout(root: Path, modules: tuple[str, ...]) -> dict[str, types.ModuleType]:
    """The reference's modules (flat names, or ``package.module``), imported from the checkout at ``root``: any
    module of the same top-level name imported earlier from elsewhere is dropped first; ``pynvml`` (imported for
    logging only by some references) is stubbed when missing."""
    if "pynvml" not in sys.modules and importlib.util.find_spec("pynvml") is None:
        sys.modules["pynvml"] = types.ModuleType("pynvml")
    tops = {name.split(".")[0] for name in modules}
    for name in list(sys.modules):
        module = sys.modules[name]
        if name.split(".")[0] in tops:
            where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", []) or []), "")
            if not str(where).startswith(str(root)):
                del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        return {name: importlib.import_module(name) for name in modules}
    finally:
        sys.path.remove(str(root))


def prune_masks(adapter) -> dict:
    """Per-linear results of a model a reference pruned in place: its zeros are its mask."""
    from .base import ModuleResult
    from .masks import PackedMask
    from .taps import prunable_modules

    results = {}
    for name, linear in prunable_modules(adapter).items():
        mask = linear.weight.detach() == 0
        results[name] = ModuleResult(int(mask.sum()), mask.numel(), mask=PackedMask.pack(mask.cpu()))
    return results


@contextlib.contextmanager
def quiet(name: str) -> Iterator[None]:
    """The reference's console output, to the log at debug level."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        yield
    log.debug("%s:\n%s", name, out.getvalue())


@contextlib.contextmanager
def cuda_calls_on_cpu(device) -> Iterator[None]:
    """On a CPU run, the references' ``torch.cuda.synchronize`` / ``empty_cache`` calls (timing and memory
    housekeeping) as no-ops: a CPU build of torch raises on them."""
    if str(device).startswith("cuda"):
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.empty_cache
    torch.cuda.synchronize = torch.cuda.empty_cache = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.empty_cache = saved


@contextlib.contextmanager
def rotary_for_bare_calls(adapter) -> Iterator[None]:
    """References written for transformers 4 call a LLaMA-style block as ``layer(x, attention_mask=...,
    position_ids=...)``; transformers 5 blocks need ``position_embeddings``: a forward pre-hook on every block
    computes them from the model's rotary module (positions 0..s-1, or the given ``position_ids``) when absent."""
    rotary = getattr(adapter.model.model, "rotary_emb", None)
    if rotary is None:
        yield
        return

    def supply(module, args, kwargs):
        if kwargs.get("position_embeddings") is not None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(hidden.shape[-2], device=hidden.device).unsqueeze(0)
        return args, {**kwargs, "position_embeddings": rotary(hidden, positions)}

    handles = [block.register_forward_pre_hook(supply, with_kwargs=True) for block in adapter.blocks()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
