"""nL2, the normalised pixel distance (Carlini et al. 2023; Chen et al. CVPR 2024, AMG Eq. 8).

METHODS.md 1.2:
  l2(a, b) = RMSE of two images in [0, 1] at the index's comparison size (RGB), i.e.
             sqrt(||a - b||^2 / dim) on the pixel embedder's flattened vectors;
  nL2(x)   = l2(x, n0) / (alpha * mean_{z in S_k(x)} l2(x, z)),   alpha = 0.5, k = 50,
  S_k(x) the k nearest training images of x *including* n0, taken over one representative
  per exact-duplicate group (the index holds one vector per group). Copy when nL2 < 1.4;
  nL2 < 1.6 is reported too. When the index has fewer than k groups, all are used and
  `k_effective` records it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from memaudit.criteria.common import IndexCriterion


def rmse_from_sqdist(d2: np.ndarray, dim: int) -> np.ndarray:
    """RMSE from squared L2 distances between vectors of `dim` values."""
    return np.sqrt(np.maximum(np.asarray(d2, np.float64), 0.0) / dim)


def nl2_from_l2(l2: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """AMG Eq. 8 from the RMSEs to the k nearest groups, [n, k] (any order; n0 = the min).

    0 / 0 (every neighbour identical to x) counts as 0: the image is a copy."""
    l2 = np.asarray(l2, np.float64)
    num = l2.min(axis=1)
    den = alpha * l2.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return out


class NL2Criterion(IndexCriterion):
    """nL2 against a pixels index (METHODS 1.2). Lower = more similar; copy when < 1.4."""

    name = "nl2"
    higher_is_more_similar = False
    threshold = 1.4
    extra_thresholds = {"copy@1.6": 1.6}

    def __init__(self, index: Any, alpha: float = 0.5, k: int = 50, **kw: Any):
        super().__init__(index, **kw)
        self.alpha = float(alpha)
        self.k = int(k)
        #: k actually used (min(k, groups)); fewer groups than k -> all groups are used.
        self.k_effective = min(self.k, self.groups.ntotal)

    def score_vectors(self, vectors: np.ndarray, exclude: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(nL2 [n], nearest group id [n], RMSE to the k neighbours [n, k]) of pixel vectors.

        Neighbours come from the index search; distances are then recomputed exactly from the
        group vectors, so faiss' float error never decides a verdict."""
        n = len(vectors)
        if n == 0:
            return np.zeros(0), np.zeros(0, np.int64), np.zeros((0, self.k_effective))
        _, ids = self.groups.knn(vectors, self.k, exclude=exclude)
        k = ids.shape[1]
        l2 = np.empty(ids.shape, np.float64)
        step = max(1, 4_000_000 // max(1, k * self.dim))  # bound the [rows, k, d] block
        for a in range(0, n, step):
            neigh = self.groups.gather(ids[a:a + step])  # [rows, k, d]
            diff = neigh.astype(np.float64) - np.asarray(vectors[a:a + step], np.float64)[:, None]
            l2[a:a + step] = np.sqrt((diff * diff).sum(-1) / self.dim)
        nl2 = nl2_from_l2(l2, self.alpha)
        n0 = ids[np.arange(n), l2.argmin(axis=1)]
        return nl2, n0, l2

    def nl2_tensor(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable nL2 [B] of images [B,3,H,W] in [0,1] and the nearest group ids [B].

        The k neighbours are found without gradient, then the distances to those fixed
        neighbours are recomputed with gradient (METHODS 3.2, AMG Gsim)."""
        v = self.index.embedder.embed_tensor(x01)
        v = v.reshape(v.shape[0], -1).float()
        k = self.k_effective
        if self.groups.fast:
            _, ids = self.groups.knn_torch(v, k)
            mat, _ = self.groups.matrix(v.device)
            neigh = mat[ids]  # [B, k, d]
        else:
            _, ids_np = self.groups.knn(v.detach().cpu().numpy(), k)
            ids = torch.from_numpy(ids_np).to(v.device)
            neigh = torch.from_numpy(self.groups.gather(ids_np)).to(v.device)
        d2 = ((v[:, None, :] - neigh) ** 2).sum(-1) / self.dim
        l2 = torch.sqrt(d2 + 1e-12)
        num, arg = l2.min(dim=1)
        nl2 = num / (self.alpha * l2.mean(dim=1))
        return nl2, ids.gather(1, arg[:, None])[:, 0]

    def similarity_tensor(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sigma = -nL2 (higher = more similar), differentiable, and nearest group ids [B]."""
        nl2, gids = self.nl2_tensor(images)
        return -nl2, gids
