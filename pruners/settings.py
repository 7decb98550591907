"""Engine / driver settings shared by every method (docs/architecture.md §1, "The sequential engine").

One typed, frozen object instead of loose ``device, batch_size, stats_dtype, progress`` arguments, so
that a new driver setting reaches every method (layer-wise or whole-model) without touching signatures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch


class SweepCache(Protocol):
    """What a sweep's runs share (runners/reuse.py gives one, keyed by the model, the windows, the engine and the
    code on top of ``parts``): ``get`` a value or None, ``put`` one; ``max_bytes``: the bound (larger: not kept)."""

    max_bytes: float
    events: dict[str, str]  # kind -> hit | miss | too large (the run's record lists them)

    def get(self, kind: str, parts: dict): ...

    def put(self, kind: str, parts: dict, value) -> None: ...


@dataclass(frozen=True)
class EngineSettings:
    """How a method runs, not what it computes (never part of a method's config keys).

    ``device``: where blocks (or, for whole-model methods, the model) run; ``batch_size``: calibration
    windows per forward; ``stats_dtype``: dtype of the accumulated statistics (fp32 or fp64);
    ``progress``: show progress bars; ``grad_windows``: calibration windows per forward + backward pass of the
    gradient taps (:mod:`pruners.taps`; 0 = all in one pass; fewer bound the stored block inputs);
    ``offload_dir``: a folder for what the gradient methods keep off the device (block inputs, Kronecker factors),
    null = host memory; ``on_shot``: a multi-shot method calls ``on_shot(shot, shots)`` after each
    shot but the last, the model holding that shot's weights (the runner evaluates and records it:
    ``eval.shots_every``); ``resume_dir``: layer-wise methods keep each done block there (methods with shots: each
    shot) and a run started again goes on after the last one kept (:mod:`pruners.resume`; ``resume_key`` names the run: its prune id);
    ``reuse``: the sweep's cache of what does not depend on the pruning (a structured method's scoring pass);
    ``activations``: where the methods that walk the blocks keep the calibration hidden states between forwards:
    ``device`` | ``host`` | ``disk`` (files under ``offload_dir``; :class:`models.blocks.KeptBatches`).
    """

    device: str | torch.device = "cpu"
    batch_size: int = 8
    stats_dtype: torch.dtype = torch.float32
    progress: bool = True
    grad_windows: int = 0
    offload_dir: str | None = None
    resume_dir: str | None = None
    resume_key: str = ""
    on_shot: Callable[[int, int], None] | None = field(default=None, compare=False)
    reuse: SweepCache | None = field(default=None, compare=False)
    activations: str = "device"

    @classmethod
    def from_config(cls, engine_cfg, device, progress: bool = True) -> EngineSettings:
        """From the ``engine`` config group (``batch_size``, ``stats_dtype`` as ``float32`` | ``float64``,
        ``grad_windows``, ``offload_dir``, ``activations``)."""
        dtype = torch.float64 if str(engine_cfg.stats_dtype) == "float64" else torch.float32
        offload = engine_cfg.get("offload_dir")
        return cls(device=device, batch_size=int(engine_cfg.batch_size), stats_dtype=dtype, progress=bool(progress),
                   grad_windows=int(engine_cfg.get("grad_windows") or 0),
                   offload_dir=str(offload) if offload is not None else None,
                   activations=str(engine_cfg.get("activations") or "device"))
