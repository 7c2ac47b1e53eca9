"""Shared machinery of the copy criteria (METHODS.md section 1).

Everything here works against the `TrainingIndex` contract (memaudit.index): `.manifest`,
`.items`, `.index` (faiss, one vector per exact-duplicate group, faiss id == group id),
`.embedder` (`embed(pil) -> np`, `embed_tensor(x01) -> torch`), `search`, `group_vectors`,
`representative_rows`, `group_caption`.

- `embed_images`: PIL images or a [B,3,H,W] tensor in [0,1] -> float32 vectors.
- `GroupVectors`: nearest-group search and exact gathering of group vectors. Small indexes
  (ngroups * dim <= `TORCH_FAST_MAX`) keep every group vector as one torch matrix and search
  with a matmul (what AMG calls every sampling step); larger ones go through faiss.
- `IndexCriterion`: the base of all criteria: thresholds from the manifest, neighbour
  lookups (key, caption, duplicate count) for reports.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from memaudit.common import UserError, require_finite
from memaudit.criteria.base import Criterion
from memaudit.index.training_index import is_lossy_factory

#: Above this many floats (ngroups * dim) the group vectors are not copied into torch.
TORCH_FAST_MAX = 16_000_000
#: At most this many (query, group) scores per torch search block: queries are split so
#: that a search holds a few [rows, ngroups] matrices of ~16 MB, whatever the groups.
TORCH_BLOCK = 4_000_000

#: Which criteria an index built with a given embedder supports (METHODS 1).
SUPPORTED: dict[str, tuple[str, ...]] = {
    "pixels": ("nl2", "l2-tiled"),
    "sscd": ("sscd",),
    "clip": ("clip",),
}

#: The false-positive rate whose calibrated threshold drives `is_copy_calibrated`.
DEFAULT_FPR = "0.01"


def fpr_key(fpr: float | str) -> str:
    """Canonical manifest key of a false-positive rate: 0.01 -> "0.01", 1e-3 -> "0.001"."""
    return format(float(fpr), "g")


def embedder_name(index: Any) -> str:
    name = index.manifest.get("embedder")
    if isinstance(name, dict):  # tolerate {"name": ...}
        name = name.get("name")
    if name is None:
        name = getattr(index.embedder, "name", None)
    return str(name)


def supported_criteria(index: Any) -> tuple[str, ...]:
    """The criteria this index can answer (pixels: nl2, l2-tiled; sscd: sscd; clip: clip)."""
    return SUPPORTED.get(embedder_name(index), ())


def check_supported(index: Any, name: str) -> None:
    ok = supported_criteria(index)
    if name not in ok:
        raise UserError(
            f"criterion {name!r} needs a different index: this one was built with the "
            f"{embedder_name(index)!r} embedder, which supports {', '.join(ok) or 'nothing'}"
        )


def calibrated_threshold(index: Any, name: str, fpr: float | str = DEFAULT_FPR) -> float | None:
    """The calibrated threshold of criterion `name` at `fpr` from manifest["calibration"]."""
    cal = index.manifest.get("calibration") or {}
    entry = cal.get(name) or {}
    value = (entry.get("fpr") or {}).get(fpr_key(fpr))
    return None if value is None else float(value)


def embed_images(index: Any, images: Any) -> np.ndarray:
    """Vectors of PIL images (list) or a float tensor [B,3,H,W] in [0,1], float32 [B, d]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"expected images [B,3,H,W] in [0,1], got shape {tuple(images.shape)}")
        with torch.no_grad():
            out = index.embedder.embed_tensor(images.float())
        return out.detach().cpu().numpy().astype(np.float32, copy=False)
    images = list(images)
    if not images:
        return np.zeros((0, int(index.manifest.get("dim", 0))), np.float32)
    return np.ascontiguousarray(np.asarray(index.embedder.embed(images), dtype=np.float32))


class GroupVectors:
    """Nearest-neighbour search over the group vectors of an index, plus exact gathering.

    `knn(v, k)` returns (scores [n,k], group ids [n,k]) like faiss: squared L2 ascending for
    metric "l2", inner product descending for "ip". With `exclude` (one group id per row) that
    group is left out of the answer (leave-one-out calibration, METHODS 1.2).
    """

    def __init__(self, index: Any, fast_max: int = TORCH_FAST_MAX):
        self.index = index
        self.metric = str(index.manifest.get("metric", getattr(index, "metric", "l2")))
        self.ntotal = int(index.index.ntotal)
        self.dim = int(index.index.d)
        self.fast = self.ntotal * self.dim <= fast_max
        self._matrix: torch.Tensor | None = None
        self._sqnorm: torch.Tensor | None = None
        self._device_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- the torch matrix (small indexes) --
    def matrix(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._device_cache:
            if self._matrix is None:
                vecs = np.asarray(self.index.group_vectors(), dtype=np.float32)
                self._matrix = torch.from_numpy(np.ascontiguousarray(vecs))
                self._sqnorm = (self._matrix.double() ** 2).sum(1).float()
            assert self._sqnorm is not None
            self._device_cache[key] = (self._matrix.to(device), self._sqnorm.to(device))
        return self._device_cache[key]

    def gather(self, group_ids: np.ndarray) -> np.ndarray:
        """Exact vectors of the given groups, float32 [..., d]."""
        ids = np.asarray(group_ids, dtype=np.int64)
        if self.fast:
            mat, _ = self.matrix("cpu")
            return mat[torch.from_numpy(ids.reshape(-1))].numpy().reshape(*ids.shape, self.dim)
        if hasattr(self.index, "vectors"):  # TrainingIndex: exact even for PQ (vectors.npy)
            return np.asarray(self.index.vectors(ids), np.float32)
        try:
            flat = self.index.index.reconstruct_batch(ids.reshape(-1))
        except RuntimeError:
            flat = np.asarray(self.index.group_vectors(), np.float32)[ids.reshape(-1)]
        return np.asarray(flat, np.float32).reshape(*ids.shape, self.dim)

    def knn_torch(self, v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Search in torch on v's device (no gradient). Returns (scores, group ids) [n,k].
        Queries go in blocks of TORCH_BLOCK // ngroups rows (memory bounded by a constant)."""
        rows = max(1, TORCH_BLOCK // max(1, self.ntotal))
        if len(v) > rows:
            parts = [self.knn_torch(v[a:a + rows], k) for a in range(0, len(v), rows)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        mat, sq = self.matrix(v.device)
        with torch.no_grad():
            v = v.detach().float()
            prod = v @ mat.T
            if self.metric == "ip":
                return torch.topk(prod, k, dim=1, largest=True, sorted=True)
            d2 = (v * v).sum(1, keepdim=True) - 2 * prod + sq[None, :]
            vals, ids = torch.topk(d2, k, dim=1, largest=False, sorted=True)
            return vals.clamp_min(0), ids

    def knn(self, vectors: np.ndarray, k: int, exclude: np.ndarray | None = None,
            batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """k nearest groups of each row of `vectors` (numpy), optionally excluding one group
        per row. k is capped at the number of groups available."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        avail = self.ntotal - (1 if exclude is not None else 0)
        k = min(k, avail)
        if k <= 0:
            raise UserError("the index has too few duplicate groups for this criterion")
        kk = k + (1 if exclude is not None else 0)
        scores_all, ids_all = [], []
        for start in range(0, len(vectors), batch):
            chunk = vectors[start:start + batch]
            if self.fast:
                s, i = self.knn_torch(torch.from_numpy(chunk), kk)
                s, i = s.numpy(), i.numpy().astype(np.int64)
            else:
                s, i = self.index.search(chunk, kk)
                s, i = np.asarray(s, np.float32), np.asarray(i, np.int64)
            scores_all.append(s)
            ids_all.append(i)
        scores = np.concatenate(scores_all) if scores_all else np.zeros((0, kk), np.float32)
        ids = np.concatenate(ids_all) if ids_all else np.zeros((0, kk), np.int64)
        if exclude is None:
            return scores, ids
        return _drop_group(scores, ids, np.asarray(exclude, np.int64), k)


def _drop_group(scores: np.ndarray, ids: np.ndarray, exclude: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove, per row, the excluded group id from a (k+1)-neighbour answer; keep k."""
    keep = (ids != exclude[:, None]) & (ids >= 0)
    # stable: take the first k kept entries of every row
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1))


class IndexCriterion(Criterion):
    """A criterion over a `TrainingIndex`: thresholds from the manifest, neighbour lookups."""

    extra_thresholds: dict[str, float] = {}

    def __init__(self, index: Any, threshold: float | None = None,
                 calibrated_threshold: float | None = None, fpr: float | str = DEFAULT_FPR):
        check_supported(index, self.name)
        self.index = index
        if threshold is not None:
            self.threshold = float(threshold)
        self.fpr = fpr_key(fpr)
        self.calibrated_threshold = (
            float(calibrated_threshold) if calibrated_threshold is not None
            else calibrated_threshold_or_none(index, self.name, self.fpr)
        )
        self.groups = GroupVectors(index)
        self.dim = self.groups.dim
        factory = str(index.manifest.get("factory") or "Flat")
        #: True when scores would come from compressed vectors (a PQ/SQ index without its
        #: exact vectors.npy, e.g. an imported one); built indexes keep the exact vectors
        #: and re-rank, so candidates are scored exactly (docs/index-format.md).
        self.lossy = (is_lossy_factory(factory)
                      and getattr(index, "exact_vectors", None) is None)
        if self.lossy:
            warnings.warn(f"{self.name} on a {factory} index without exact vectors compares "
                          "images with compressed vectors; rebuild it with `memaudit index "
                          "build` (which keeps vectors.npy) for exact scores", stacklevel=3)

    # -- verdict helpers --
    def verdicts(self, score: np.ndarray, rows: np.ndarray,
                 extra: dict[str, np.ndarray] | None = None):
        from memaudit.criteria.base import Scores

        calibrated = (None if self.calibrated_threshold is None
                      else self.is_copy(score, self.calibrated_threshold))
        extra = dict(extra or {})
        for label, t in self.extra_thresholds.items():
            extra[label] = self.is_copy(score, t)
        return Scores(score=score.astype(np.float64), neighbour=rows.astype(np.int64),
                      is_copy=self.is_copy(score), is_copy_calibrated=calibrated, extra=extra)

    def score_vectors(self, vectors: np.ndarray, exclude: np.ndarray | None = None) -> tuple:
        """(score [n], nearest group id [n], ...) of already-embedded vectors."""
        raise NotImplementedError

    def score_from_vectors(self, vectors: np.ndarray):
        """`score` for vectors already embedded by the index's embedder. A non-finite vector
        is never scored (a NaN image would otherwise be an exact copy of some item)."""
        vectors = np.asarray(vectors, np.float32)
        require_finite(vectors, f"criterion {self.name}: an image's embedding")
        res = self.score_vectors(vectors)
        return self.verdicts(res[0], self.rows_of(res[1]))

    def score(self, images: Any):
        """Score PIL images (list) or a [B,3,H,W] tensor in [0,1] against the index; a
        NaN or infinite image is a `NonFiniteError`, never a score."""
        if isinstance(images, torch.Tensor):
            require_finite(images, f"criterion {self.name}: an image to score")
        return self.score_from_vectors(self._embed(images))

    def rows_of(self, group_ids: np.ndarray) -> np.ndarray:
        """Representative row id (items.parquet) of each group id."""
        ids = np.asarray(group_ids, np.int64).reshape(-1)
        if ids.size == 0:
            return ids
        return np.asarray(self.index.representative_rows(ids), np.int64).reshape(-1)

    def describe_rows(self, rows: Sequence[int]) -> dict[str, list]:
        """key, caption and duplicate count of items (by row id), for reports."""
        return describe_rows(self.index, rows)

    def neighbour_key(self, row: int) -> str:
        return str(self.index.item(int(row)).get("key"))

    def neighbour_caption(self, row: int) -> str | None:
        return self.index.item(int(row)).get("caption")

    def neighbour_group_count(self, row: int) -> int:
        return int(self.index.item(int(row)).get("group_count", 1))

    def _embed(self, images: Any) -> np.ndarray:
        return embed_images(self.index, images)


def calibrated_threshold_or_none(index: Any, name: str, fpr: str) -> float | None:
    return calibrated_threshold(index, name, fpr)


def describe_rows(index: Any, rows: Sequence[int]) -> dict[str, list]:
    """key, caption and group_count of items by row id (only those rows are read)."""
    rows = [int(r) for r in rows]
    t = index.take_items(rows)
    return {c: t.column(c).to_pylist() if c in t.column_names else [None] * len(rows)
            for c in ("key", "caption", "group_count")}
