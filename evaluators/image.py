"""Image evaluation of a class-conditional generator (docs/imagegen.md §4): sample, decode with the VQ tokenizer,
quantize to 8-bit pixels (as saved samples are), extract features, compare with the reference statistics.

Metrics (:mod:`evaluators.image_metrics`): ``fid`` (pool features), ``sfid`` (spatial features), ``is``,
``precision`` / ``recall`` (k = 3 against the reference batch), plus two class-conditional checks the offline default
can make because its feature network is a classifier of the same classes: ``class_accuracy`` (the classifier agrees
with the class asked for) and ``class_fid`` (mean over classes of the FID between a class's samples and its real
images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.blocks import on_device
from models.llamagen import class_labels, sample_batches, sampling_options

from .image_features import extract, load_reference
from .image_metrics import frechet_distance, inception_score, precision_recall, statistics


def to_pixels(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Decoder output (about [-1, 1]) -> 8-bit values ``uint8``, as LlamaGen's sample_c2i_ddp writes its samples:
    optionally resized (bicubic) to ``size`` first, then ``clamp(127.5 x + 128, 0, 255)`` truncated."""
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        images = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bicubic")
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)


def from_pixels(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1


@torch.no_grad()
def decode(vq, tokens: torch.Tensor, batch_size: int = 32, size: int | None = None) -> torch.Tensor:
    """8-bit pixels ``[n, c, H, W]`` of image tokens (resized to ``size``, see :func:`to_pixels`), ``batch_size`` images
    at a time (a 384 px VQ-16 decode holds ~75 MB of activations per image and tensor: LlamaGen decodes ~32)."""
    device = next(vq.parameters()).device
    return torch.cat([to_pixels(vq.decode_code(tokens[i : i + batch_size].to(device)).cpu(), size)
                      for i in range(0, len(tokens), batch_size)])


def metrics(pixels: torch.Tensor, labels: torch.Tensor, net, reference: dict) -> dict:
    """FID-family metrics of 8-bit ``pixels`` generated for ``labels`` against ``reference`` (see the module)."""
    feats = extract(net, pixels)  # (8-bit pixels: each batch to [-1, 1] as it is read)
    mu, sigma = statistics(feats["pool"])
    precision, recall = precision_recall(reference["pool_batch"], feats["pool"])
    out = {"fid": frechet_distance(mu, sigma, reference["pool_mu"], reference["pool_sigma"]),
           "precision": precision, "recall": recall}
    if "spatial" in feats:  # (an Inception reference: pool features only, evaluators/image_inception.py)
        smu, ssigma = statistics(feats["spatial"])
        out["sfid"] = frechet_distance(smu, ssigma, reference["spatial_mu"], reference["spatial_sigma"])
    if "probs" not in feats:
        return {k: round(float(v), 4) for k, v in out.items()}
    out["is"] = inception_score(feats["probs"][mixed_order(len(labels))])  # (IS splits: never one class per split)
    y = labels.numpy()
    out["class_accuracy"] = float((feats["probs"].argmax(1) == y).mean())
    per_class = [frechet_distance(*statistics(feats["pool"][y == c]), reference[f"class{c}_mu"],
                                  reference[f"class{c}_sigma"])
                 for c in np.unique(y) if f"class{c}_mu" in reference and (y == c).sum() > 1]
    if per_class:
        out["class_fid"] = float(np.mean(per_class))
    return {k: round(float(v), 4) for k, v in out.items()}


def mixed_order(n: int, seed: int = 0) -> torch.Tensor:
    """A fixed permutation of ``n`` samples. Balanced labels are generated class by class; the Inception Score is
    averaged over consecutive splits of 5,000 samples (ADM), so scoring or saving them in that order would put few
    classes in each split and cap its score: both use this order instead (FID, precision, recall are unaffected)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def grid(pixels: torch.Tensor, labels: torch.Tensor, per_class: int = 8):
    """A PIL image: one row per class, the first ``per_class`` samples of each."""
    from PIL import Image

    rows = []
    for c in torch.unique(labels):
        picks = pixels[labels == c][:per_class]
        if len(picks) < per_class:
            picks = torch.cat([picks, torch.zeros(per_class - len(picks), *picks.shape[1:], dtype=picks.dtype)])
        rows.append(torch.cat(list(picks), dim=-1))  # [c, H, per_class * W]
    image = torch.cat(rows, dim=-2)  # [c, classes * H, per_class * W]
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


GRID_FILE, NPZ_FILE = "samples.png", "samples.npz"


def reference_folder(section, config) -> Path:
    """``eval.image.reference`` where set, else the model's own ``config.image_reference`` (``bundled:<name>`` = a
    folder of ``models/tiny``)."""
    from models.loading import TINY_DIR

    where = section.get("reference") or getattr(config, "image_reference", None)
    if not where:
        raise ValueError("eval.image.reference: the model names no reference statistics (config.json "
                         "image_reference); give eval.image.reference=<folder>, or eval.image.features=none")
    folder = TINY_DIR / where.split(":", 1)[1] if where.startswith("bundled:") else Path(where).expanduser()
    if not folder.is_dir():
        raise ValueError(f"eval.image.reference={where}: no such folder ({folder})")
    return folder


def check_reference(section, config) -> None:
    """ValueError unless the reference folder exists and its feature network reads this model's images: channels
    and resolution (``eval_size`` where set, else the model's ``image_size``), before any sample is drawn."""
    import json

    from .image_features import META

    folder = reference_folder(section, config)
    meta = json.loads((folder / META).read_text()) if (folder / META).is_file() else {}
    if meta.get("network") == "inception":  # (its weights come from an optional package: say so before the prune)
        from .image_inception import weights_path

        try:
            weights_path()
        except FileNotFoundError as err:
            raise ValueError(f"eval.image.reference={folder}: {err}") from None
    size = section.get("eval_size") or getattr(config, "image_size", None)
    want = meta.get("resolution")
    if want and size and [size, size] != list(want):
        raise ValueError(f"eval.image.reference={folder}: its feature network reads {want[0]} x {want[1]} images, "
                         f"the samples are {size} x {size} (eval.image.eval_size / the model's image_size)")


def evaluate(section, loaded, device: str, out_dir: Path | None = None, progress: bool = True) -> dict:
    """``eval.image`` of a loaded generator: ``samples_per_class`` samples of every class with the section's sampling
    settings and seed, decoded to 8-bit pixels, scored against the reference (:func:`metrics`); every number tagged
    with the feature network, the sample count and the resolution; a PNG grid of ``grid_per_class`` samples per class
    written to ``out_dir`` (named in the result)."""
    model, vq = loaded.model, loaded.tokenizer.vq
    scored = section.get("features", "auto") != "none"
    if scored:
        folder = reference_folder(section, model.config)
        net, reference, meta = load_reference(folder)
    classes = model.config.num_classes
    per_class = int(section.get("samples_per_class", 100))
    mode, seed = str(section.get("labels", "balanced")), int(section.get("seed", 0))
    labels = class_labels(classes, classes * per_class, mode, seed)
    options = sampling_options(section, model.config)
    with on_device([model, vq], device):
        tokens = sample_batches(model, labels, int(section.get("batch_size", 64)), seed, progress, **options)
        pixels = decode(vq, tokens, size=section.get("eval_size"))
    if scored and meta.get("network") == "inception":  # (on the run's device; the small classifier stays on the CPU)
        net.to(device)
    out = metrics(pixels, labels, net, reference) if scored else {}
    out.update(samples=len(labels), labels=mode, seed=seed, sampling=options, resolution=list(pixels.shape[-2:]),
               features=meta.get("features", folder.name) if scored else None,
               reference=meta.get("dataset") if scored else None)
    shown = int(section.get("grid_per_class", 8))
    if out_dir is not None and (shown > 0 or section.get("save_npz")):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    if out_dir is not None and shown > 0:
        grid(pixels, labels, shown).save(Path(out_dir) / GRID_FILE)
        out["grid"] = GRID_FILE
    if out_dir is not None and section.get("save_npz"):  # the ADM evaluator's input: arr_0 [n, H, W, C] uint8
        order = mixed_order(len(labels))
        np.savez(Path(out_dir) / NPZ_FILE, arr_0=pixels[order].permute(0, 2, 3, 1).numpy(), labels=labels[order].numpy())
        out["npz"] = NPZ_FILE
    return out
