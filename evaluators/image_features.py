"""The feature network of the offline image metrics (docs/imagegen.md §4): a small CNN classifier trained here on
Fashion-MNIST (``models/train_imagegen.py``), standing in for Inception-v3 on 28 x 28 grey images, and the reference
statistics of the held-out split it ships with (``models/tiny/fmnist-features``).

Its three outputs play Inception's roles in the ADM evaluator: ``pool`` (the 128-d penultimate layer: FID, precision,
recall; Inception: pool_3), ``spatial`` (the first 8 channels of the second convolution, 7 x 7 after pooling, 392-d:
sFID; Inception: the first 7 channels of mixed_6/conv) and the class probabilities (IS). Numbers computed with it are
tagged ``features: fmnist-classifier`` and are never an ImageNet FID.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .image_metrics import statistics

WEIGHTS, REFERENCE, META = "classifier.safetensors", "reference.npz", "reference.json"
REFERENCE_BATCH = 5000  # real features kept for precision / recall (ADM: a 10k reference batch)


class FeatureNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        """``x`` ``[b, 1, 28, 28]`` in [-1, 1] -> (pool ``[b, 128]``, spatial ``[b, 392]``, logits ``[b, classes]``)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        c2 = F.relu(self.conv2(h))
        spatial = F.avg_pool2d(c2[:, :8], 2).flatten(1)
        pool = F.relu(self.fc1(F.max_pool2d(c2, 2).flatten(1)))
        return pool, spatial, self.fc2(pool)


def as_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as float32: 8-bit pixels (``uint8``) as ``p / 127.5 - 1``, others as they are."""
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def extract(net: nn.Module, images: torch.Tensor, batch: int = 1000) -> dict[str, np.ndarray]:
    """``pool``, ``spatial`` features and class ``probs`` of ``images`` (float64 arrays), ``images`` in [-1, 1] or
    8-bit pixels (``uint8``, each batch converted as it is read); an Inception network
    (:class:`evaluators.image_inception.InceptionPool`): ``pool`` only."""
    from .image_inception import InceptionPool, pool_features

    if isinstance(net, InceptionPool):
        return {"pool": pool_features(net, images)}
    out: dict[str, list] = {"pool": [], "spatial": [], "probs": []}
    device = next(net.parameters()).device
    for start in range(0, len(images), batch):
        pool, spatial, logits = (t.cpu() for t in net(as_unit_range(images[start : start + batch]).to(device)))
        out["pool"].append(pool.double())
        out["spatial"].append(spatial.double())
        out["probs"].append(torch.softmax(logits.double(), dim=1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def save_reference(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, directory: Path, meta: dict) -> None:
    """The network's weights and the held-out set's statistics: mean / covariance of pool and spatial features,
    per class too, and the first :data:`REFERENCE_BATCH` pool features (precision / recall)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(directory / WEIGHTS))
    feats = extract(net, images)
    arrays = {}
    for kind in ("pool", "spatial"):
        arrays[f"{kind}_mu"], arrays[f"{kind}_sigma"] = statistics(feats[kind])
    y = labels.numpy()
    for c in np.unique(y):
        arrays[f"class{c}_mu"], arrays[f"class{c}_sigma"] = statistics(feats["pool"][y == c])
    arrays["pool_batch"] = feats["pool"][:REFERENCE_BATCH].astype(np.float32)
    np.savez_compressed(directory / REFERENCE, **arrays)
    (directory / META).write_text(json.dumps({**meta, "images": len(images), "classes": int(len(np.unique(y))),
                                              "resolution": list(images.shape[-2:]), "channels": int(images.shape[1]),
                                              "features": directory.name.replace("-features", "-classifier"),
                                              "reference_batch": REFERENCE_BATCH}, indent=1) + "\n")


def load_reference(directory: str | Path) -> tuple[nn.Module, dict[str, np.ndarray], dict]:
    """The feature network of a reference folder and its statistics: the bundled kind (a classifier's weights beside
    them) or an Inception one (``network: inception``: pool features only; :mod:`evaluators.image_inception`)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / META).read_text()) if (directory / META).is_file() else {}
    if meta.get("network") == "inception":
        from .image_inception import InceptionPool

        with np.load(directory / REFERENCE) as ref:
            arrays = {k: ref[k] for k in ref.files}
        return InceptionPool(), arrays, meta
    if not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"{directory}: no feature network ({WEIGHTS})")
    meta = json.loads((directory / META).read_text())
    net = FeatureNet(meta.get("classes", 10))
    net.load_state_dict(load_file(str(directory / WEIGHTS)))
    with np.load(directory / REFERENCE) as ref:
        arrays = {k: ref[k] for k in ref.files}
    return net.eval(), arrays, meta
