"""The `Criterion` interface: a copy test against a training index (METHODS.md section 1).

`score` works on images (PIL or float tensors in [0, 1], [B, 3, H, W]) and returns, per
image, the criterion's score, the nearest training item and the verdicts. Scores keep their
natural direction (SSCD/CLIP cosine: higher = more similar, copy when > threshold; nL2 and
tiled l2: lower = more similar, copy when < threshold). `similarity` is always
"higher = more similar" (nL2 -> -nL2), which is what AMG's sigma_t uses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Scores:
    score: np.ndarray  # [n] the criterion's own score (cosine, nL2, tiled RMSE)
    neighbour: np.ndarray  # [n] int64 row id of the nearest training item in items.parquet
    is_copy: np.ndarray  # [n] bool, fixed threshold
    is_copy_calibrated: np.ndarray | None = None  # [n] bool, index-calibrated 1% FPR threshold
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. verdicts at 0.4 / 0.75


class Criterion(ABC):
    name: str
    higher_is_more_similar: bool  # cosine True; nL2 / l2-tiled False
    threshold: float  # the fixed copy threshold (METHODS 1)
    calibrated_threshold: float | None = None  # from the index manifest (1% FPR)
    differentiable: bool = True  # has `similarity_tensor` (can guide AMG, METHODS 3.2)

    @abstractmethod
    def score(self, images) -> Scores:
        """Score a batch of images against the index."""

    def is_copy(self, score: np.ndarray, threshold: float | None = None) -> np.ndarray:
        t = self.threshold if threshold is None else threshold
        return score > t if self.higher_is_more_similar else score < t

    def similarity_tensor(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable similarity (higher = more similar) of [B,3,H,W] images in [0,1] to
        their nearest training item, and the neighbour's duplicate-GROUP ids [B] (faiss ids;
        `index.group_caption(gid)` / `index.representative_rows(gids)` map them). Used by AMG
        (sigma_t)."""
        raise NotImplementedError(f"criterion {self.name} has no differentiable similarity")
