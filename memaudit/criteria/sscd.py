"""SSCD copy detection (Pizzi et al. CVPR 2022; Somepalli et al. CVPR 2023 convention).

METHODS.md 1.1: cosine similarity (dot product of L2-normalised SSCD descriptors) with the
nearest training image; a generation is a copy when similarity > 0.5 (Somepalli et al.,
used by AMG, Wen, Jain). Also reported: > 0.4 (AMG "strong") and > 0.75 (SSCD's own 90%
precision point on DISC). `CosineCriterion` is shared with the CLIP criterion.
"""

from __future__ import annotations

import numpy as np
import torch

from memaudit.criteria.base import Scores
from memaudit.criteria.common import IndexCriterion


def _normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


class CosineCriterion(IndexCriterion):
    """Cosine with the nearest training item of an inner-product index (higher = copy)."""

    higher_is_more_similar = True

    def score_vectors(self, vectors: np.ndarray, exclude: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(cosine with the nearest group [n], its group id [n]) of descriptor vectors."""
        if len(vectors) == 0:
            return np.zeros(0), np.zeros(0, np.int64)
        v = _normalise(vectors)
        _, ids = self.groups.knn(v.astype(np.float32), 1, exclude=exclude)
        n0 = ids[:, 0]
        cos = (v * _normalise(self.groups.gather(n0))).sum(1)
        return cos, n0

    def similarity_tensor(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable cosine [B] of images [B,3,H,W] in [0,1] (through `embed_tensor`)
        with their nearest training group (found without gradient), and its group ids [B]."""
        v = self.index.embedder.embed_tensor(images)
        v = torch.nn.functional.normalize(v.reshape(v.shape[0], -1).float(), dim=1)
        if self.groups.fast:
            _, ids = self.groups.knn_torch(v, 1)
            mat, _ = self.groups.matrix(v.device)
            neigh = mat[ids[:, 0]]
        else:
            _, ids_np = self.groups.knn(v.detach().cpu().numpy(), 1)
            ids = torch.from_numpy(ids_np).to(v.device)
            neigh = torch.from_numpy(self.groups.gather(ids_np[:, 0])).to(v.device)
        neigh = torch.nn.functional.normalize(neigh, dim=1)
        return (v * neigh).sum(1), ids[:, 0]


class SSCDCriterion(CosineCriterion):
    """SSCD cosine (METHODS 1.1): copy > 0.5; > 0.4 and > 0.75 reported in `extra`."""

    name = "sscd"
    threshold = 0.5
    extra_thresholds = {"copy@0.4": 0.4, "copy@0.75": 0.75}


__all__ = ["CosineCriterion", "SSCDCriterion", "Scores"]
