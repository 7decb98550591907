"""FID, sFID, Inception Score, precision and recall on feature arrays (docs/imagegen.md §4), as the ADM evaluator
(openai/guided-diffusion ``evaluations/evaluator.py``, which LlamaGen uses) computes them; every statistic in float64.

The functions take features, not images: which network made them (Inception's pool_3 / mixed_6 for ImageNet, or the
bundled classifier for the tiny default) is the caller's, and is recorded beside every number.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows: samples; ``np.cov`` with N - 1) of ``[n, d]`` features."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``: the Fréchet distance of two Gaussians (FID on pool
    features, sFID on spatial ones). Where the product is singular, ``eps`` is added to both diagonals (as ADM does)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    diff = mu1 - mu2
    with warnings.catch_warnings():  # (a singular product: few samples for the dimension; handled below)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real  # (numerical noise of sqrtm on a PSD product)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))`` per split of ``split_size`` samples, averaged over the splits (ADM's default
    split size: 5000); ``probs`` ``[n, classes]``, rows summing to 1."""
    p = np.asarray(probs, dtype=np.float64)
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(marginal, 1e-30, None)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _kth_radii(features: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance of every sample to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = []
    for start in range(0, len(features), batch):
        d = torch.cdist(features[start : start + batch], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # (the first is the sample itself, at 0)
    return torch.cat(radii)


def _covered(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch: int) -> torch.Tensor:
    """Whether each query lies within the k-NN ball of some support sample."""
    inside = []
    for start in range(0, len(queries), batch):
        d = torch.cdist(queries[start : start + batch], support)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019; ADM's ManifoldEstimator, k = 3): precision = share of
    generated samples inside the real manifold (the union of k-NN balls of real samples), recall = share of real
    samples inside the generated manifold."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    precision = _covered(f, r, _kth_radii(r, k, batch), batch).double().mean().item()
    recall = _covered(r, f, _kth_radii(f, k, batch), batch).double().mean().item()
    return precision, recall
