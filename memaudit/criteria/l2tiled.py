"""Tiled l2 (Carlini et al. 2023, "Extracting training data from diffusion models", the
Stable Diffusion criterion; METHODS.md 1.2, last item).

Both images (pixel vectors at the index's comparison size, RGB in [0, 1]) are split into
4 x 4 corresponding tiles; the distance is the largest tile RMSE; copy when <= 0.15. The
training image compared is the nearest neighbour by plain pixel l2.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memaudit.criteria.common import IndexCriterion


def pixel_shape(index: Any) -> tuple[int, int, int]:
    """(C, H, W) of the pixel embedder's flattened vectors (C-order of a [3, H, W] image)."""
    dim = int(index.manifest.get("dim") or index.index.d)
    candidates: list[Any] = [getattr(index.embedder, "size", None)]
    spec = index.manifest.get("embedder")
    for cfg in (index.manifest.get("embedder_config"),
                spec.get("config") if isinstance(spec, dict) else None):
        if isinstance(cfg, dict):
            candidates += [cfg.get("size"), cfg.get("image_size")]
    for size in candidates:
        if size is None:
            continue
        h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[-1]))
        if 3 * h * w == dim:
            return 3, h, w
    side = int(round((dim / 3) ** 0.5))
    if 3 * side * side != dim:
        raise ValueError(f"cannot tell the image shape of {dim}-d pixel vectors")
    return 3, side, side


def tiled_rmse(a: np.ndarray, b: np.ndarray, shape: tuple[int, int, int],
               grid: int = 4) -> np.ndarray:
    """max over grid x grid corresponding tiles of the tile RMSE, per row of a, b [n, d].

    Tiles follow numpy.array_split, so sizes that do not divide by `grid` still tile fully."""
    c, h, w = shape
    x = np.asarray(a, np.float64).reshape(-1, c, h, w)
    y = np.asarray(b, np.float64).reshape(-1, c, h, w)
    sq = (x - y) ** 2
    worst = np.zeros(len(x))
    for rows in np.array_split(np.arange(h), grid):
        for cols in np.array_split(np.arange(w), grid):
            tile = sq[:, :, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            worst = np.maximum(worst, np.sqrt(tile.mean(axis=(1, 2, 3))))
    return worst


class TiledL2Criterion(IndexCriterion):
    """Max tile RMSE to the pixel-nearest training image. Lower = more similar; copy <= 0.15."""

    name = "l2-tiled"
    higher_is_more_similar = False
    threshold = 0.15

    def __init__(self, index: Any, grid: int = 4, **kw: Any):
        super().__init__(index, **kw)
        self.grid = int(grid)
        self.shape = pixel_shape(index)

    def is_copy(self, score: np.ndarray, threshold: float | None = None) -> np.ndarray:
        t = self.threshold if threshold is None else threshold
        return np.asarray(score) <= t

    def score_vectors(self, vectors: np.ndarray, exclude: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(tiled distance [n], nearest group id by pixel l2 [n])."""
        if len(vectors) == 0:
            return np.zeros(0), np.zeros(0, np.int64)
        _, ids = self.groups.knn(vectors, 1, exclude=exclude)
        n0 = ids[:, 0]
        return tiled_rmse(vectors, self.groups.gather(n0), self.shape, self.grid), n0
