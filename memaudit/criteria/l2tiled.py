"""Tiled l2 (Carlini et al. 2023, "Extracting training data from diffusion models", the
Stable Diffusion criterion; METHODS.md 1.2, last item).

Both images (pixel vectors at the index's comparison size, RGB in [0, 1]) are split into
4 x 4 corresponding tiles; the distance is the largest tile RMSE; copy when <= 0.15. The
score is the minimum of that distance over the k nearest training images by plain pixel l2
(k = 50, nL2's S_k): the plain-l2 nearest is not always the tiled nearest (an image that
copies one neighbour except for one tile can be farther in plain l2 than a blurry
look-alike), so Carlini's "any training image within 0.15" needs the candidates, not just
n0. No differentiable form: AMG cannot be guided by it (`differentiable = False`).
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
    """Min over the k pixel-nearest training images of the max tile RMSE. Lower = more
    similar; copy <= 0.15."""

    name = "l2-tiled"
    higher_is_more_similar = False
    threshold = 0.15
    differentiable = False

    def __init__(self, index: Any, grid: int = 4, k: int = 50, **kw: Any):
        super().__init__(index, **kw)
        self.grid = int(grid)
        self.k = int(k)
        if self.grid < 1 or self.k < 1:
            from memaudit.common import UserError

            raise UserError(f"l2-tiled needs grid >= 1 and k >= 1, got {grid} and {k}")
        self.shape = pixel_shape(index)

    def is_copy(self, score: np.ndarray, threshold: float | None = None) -> np.ndarray:
        t = self.threshold if threshold is None else threshold
        return np.asarray(score) <= t

    def score_vectors(self, vectors: np.ndarray, exclude: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(min tiled distance over the k pixel-nearest groups [n], the group attaining it
        [n]); with `exclude`, one group per row is left out (calibration)."""
        if len(vectors) == 0:
            return np.zeros(0), np.zeros(0, np.int64)
        _, ids = self.groups.knn(vectors, self.k, exclude=exclude)
        n, k = ids.shape
        dim = int(np.prod(self.shape))
        best = np.empty(n)
        arg = np.empty(n, np.int64)
        step = max(1, 4_000_000 // max(1, k * dim))  # bound the [rows, k, d] block
        for a in range(0, n, step):
            cand = self.groups.gather(ids[a:a + step]).reshape(-1, dim)
            rows = np.repeat(np.asarray(vectors[a:a + step]), k, axis=0)
            d = tiled_rmse(rows, cand, self.shape, self.grid).reshape(-1, k)
            j = d.argmin(axis=1)  # ties: the plain-l2 nearer candidate
            best[a:a + step] = d[np.arange(len(j)), j]
            arg[a:a + step] = ids[a:a + step][np.arange(len(j)), j]
        return best, arg
