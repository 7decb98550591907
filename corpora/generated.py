"""Calibration sequences an image generator samples itself (``calib=generated``; docs/imagegen.md §3).

The Numerical Pruning paper calibrates LlamaGen on generated images (128 per class) rather than on real ones. A
window is ``[class, t_0, ..., t_{seqlen-2}]``: what the model reads while it generates (the last token it samples is
never read back), sampled by the dense model with the ``calib.generate`` settings and ``calib.seed``.
"""

from __future__ import annotations

import torch

from models.blocks import on_device
from models.llamagen import class_labels, sample_batches, sampling_options

from . import Windows, tokens_digest


def generated_windows(model, nsamples: int, seqlen: int, seed: int, section, progress: bool = True,
                      device: str = "cpu") -> Windows:
    """``nsamples`` windows of ``seqlen`` positions sampled from ``model`` on ``device`` (moved back afterwards;
    ``section``: ``calib.generate``)."""
    cfg = model.config
    if not 2 <= seqlen <= 1 + cfg.block_size:
        raise ValueError(f"calib.seqlen={seqlen}: a generated window has 2 to {1 + cfg.block_size} positions "
                         f"(class + image tokens)")
    mode = str(section.get("labels", "balanced"))
    labels = class_labels(cfg.num_classes, nsamples, mode, seed)
    options = sampling_options(section, cfg)
    was_training = model.training
    model.eval()
    try:
        with on_device(model, device):
            tokens = sample_batches(model, labels, int(section.get("batch_size", 64)), seed, progress,
                                    desc="calibration samples", **options)
    finally:
        model.train(was_training)
    ids = torch.cat([labels[:, None], tokens[:, : seqlen - 1]], dim=1)
    provenance = {"source": "generated", "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "labels": mode,
                  "classes": cfg.num_classes, "sampling": options, "tokens_sha256": tokens_digest(ids)}
    return Windows(ids, provenance)
