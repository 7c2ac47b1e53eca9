"""Distances between two feature sets (METHODS 4, quality beside the copy rate).

- `kid(a, b)`: kernel distance (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased
  MMD^2 estimate with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
  `subsets` random subsets of `subset_size` rows of each set; returns (mean, std over the
  subsets). Unbiased at any n, so it can be compared across audits of a few hundred images.
- `fd(a, b)`: Frechet distance ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))
  (Heusel et al. 2017) of Gaussians fitted to the two sets. Biased upwards at small n (the
  bias shrinks like 1/n), so an FD is only comparable at the same n and in the same space.

Both run torchmetrics' FrechetInceptionDistance / KernelInceptionDistance with the features
injected through an identity "extractor", in float64: no hand-rolled matrix square root.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["default_subset_size", "fd", "kid"]


class _Given(torch.nn.Module):
    """The identity as torchmetrics' feature extractor: the inputs already are features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _as_features(a: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a, dtype=np.float64))
    if t.ndim != 2 or t.shape[0] < 2:
        raise ValueError(f"{name}: need a [n >= 2, d] feature matrix, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return t


def _pair(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = _as_features(a, "feats_a"), _as_features(b, "feats_b")
    if ta.shape[1] != tb.shape[1]:
        raise ValueError(f"feature dims differ: {ta.shape[1]} vs {tb.shape[1]}")
    return ta, tb


def fd(feats_a: Any, feats_b: Any) -> float:
    """Frechet distance between two feature sets [n_a, d], [n_b, d] (FID when the features are
    Inception-v3 pool3 features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = _pair(feats_a, feats_b)
    m = FrechetInceptionDistance(feature=_Given(a.shape[1]))
    m.update(a, real=True)
    m.update(b, real=False)
    return float(m.compute())


def default_subset_size(n_a: int, n_b: int, cap: int = 1000) -> int:
    """Half the smaller set, at most `cap` (1000, Binkowski et al.): subsets of the whole set
    would all be the same set and their spread would say nothing."""
    return max(2, min(cap, min(n_a, n_b) // 2))


def kid(feats_a: Any, feats_b: Any, *, subsets: int = 100, subset_size: int | None = None,
        degree: int = 3, gamma: float | None = None, coef: float = 1.0,
        seed: int = 0) -> tuple[float, float]:
    """Kernel distance: (mean, std) of the unbiased polynomial-kernel MMD^2 over `subsets`
    random subsets of `subset_size` rows (default `default_subset_size`). The std is the
    spread of a KID measured on `subset_size` images, i.e. its standard error at that size.
    Deterministic for a given `seed`."""
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = _pair(feats_a, feats_b)
    m_size = subset_size or default_subset_size(len(a), len(b))
    if m_size < 2 or m_size > min(len(a), len(b)):
        raise ValueError(f"subset_size {m_size} must be in [2, {min(len(a), len(b))}]")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer"
        m = KernelInceptionDistance(feature=_Given(a.shape[1]), subsets=int(subsets),
                                    subset_size=int(m_size), degree=int(degree),
                                    gamma=None if gamma is None else float(gamma),
                                    coef=float(coef))
    m.update(a, real=True)
    m.update(b, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        mean, std = m.compute()
    return float(mean), float(std)
