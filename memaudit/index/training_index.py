"""`TrainingIndex`: an opened index directory (DESIGN.md "Core abstractions").

DIR/index.faiss holds one vector per exact-duplicate group (faiss id == group id);
DIR/items.parquet every kept training item (row_id, key, caption, source_file, source_row,
group_id, group_count, is_representative); DIR/manifest.json how it was built; with a
compressed factory (PQ, SQ...) DIR/vectors.npy the exact group vectors, memory-mapped, so
`search` re-ranks the compressed index's candidates by exact scores. See
docs/index-format.md.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from memaudit.common import UserError
from memaudit.index.fill import read_index
from memaudit.index.items import GROUPS_FILE, GroupTable, ItemReader
from memaudit.index.manifest import (  # noqa: F401 - re-exported (the index's files)
    INDEX_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    MAX_RERANK,
    VECTORS_FILE,
    _check_items,
    _field_problem,
    index_hash,
    is_index_dir,
    is_lossy_factory,
    publish_dir,
    read_manifest,
    write_json_atomic,
)


def read_rows(arr: np.memmap, rows: np.ndarray, gap: int = 8) -> np.ndarray:
    """Rows `rows` (sorted, unique) of a memory-mapped .npy file, read with `os.pread` (runs
    closer than `gap` rows in one read). Indexing the map instead faults in the pages
    around each random row and keeps them mapped, counted in the process' RSS: re-ranking
    one audit against a 10 M-row index mapped +620 MiB that way (docs/benchmarks.md
    "Scale"); here only the rows asked for enter the process."""
    rows = np.asarray(rows, np.int64)
    width = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
    out = np.empty((len(rows), *arr.shape[1:]), arr.dtype)
    if not len(rows):
        return out
    flat = out.reshape(len(rows), -1).view(np.uint8).reshape(len(rows), width)
    starts = np.r_[0, np.nonzero(np.diff(rows) > gap)[0] + 1]
    ends = np.r_[starts[1:], len(rows)]
    fd = os.open(arr.filename, os.O_RDONLY)
    try:
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            first, last = int(rows[a]), int(rows[b - 1])
            size = (last - first + 1) * width
            buf = os.pread(fd, size, arr.offset + first * width)
            if len(buf) != size:
                raise UserError(f"{arr.filename}: truncated (rows {first}-{last})")
            block = np.frombuffer(buf, np.uint8).reshape(-1, width)
            flat[a:b] = block[rows[a:b] - first]
    finally:
        os.close(fd)
    return out


class TrainingIndex:
    """A built (or imported) training-set index. Open with `TrainingIndex.open(dir)`."""

    def __init__(self, path: Path, manifest: dict[str, Any], items: pa.Table | ItemReader,
                 index, weights: str | None = None, groups: GroupTable | None = None):
        self.path = Path(path)
        self.manifest = manifest
        self._items = items if isinstance(items, ItemReader) else ItemReader(items)
        self._items_table: pa.Table | None = None
        self.index = index
        #: the embedder weights file the user named (never the manifest's: it is code)
        self.weights = None if weights is None else str(weights)
        self._embedder = None
        if groups is None:  # no group table on disk: computed from two item columns
            t = self._items.read_all()
            groups = GroupTable.from_columns(
                t.column("group_id").to_numpy(),
                t.column("is_representative").to_numpy(zero_copy_only=False), self.ntotal)
        self.groups = groups
        #: exact group vectors [ngroups, dim] (memory-mapped vectors.npy) or None
        self.exact_vectors: np.ndarray | None = None
        self.rerank_candidates = 0

    @classmethod
    def open(cls, path: str | Path, weights: str | Path | None = None) -> TrainingIndex:
        """Open DIR; `weights` is the embedder's weights file the user names (SSCD, a CLIP
        checkpoint), checked against the manifest's SHA-256 when the embedder is built."""
        import faiss

        p = Path(path)
        if not p.is_dir():
            raise UserError(f"index directory not found: {p}")
        for name in (MANIFEST_FILE, ITEMS_FILE, INDEX_FILE):
            if not (p / name).is_file():
                raise UserError(f"{p} is not a memaudit index (missing {name})")
        manifest = read_manifest(p / MANIFEST_FILE)
        items = ItemReader(p / ITEMS_FILE)
        missing = {"row_id", "key", "caption", "group_id", "is_representative"} - set(
            items.column_names)
        if missing:
            raise UserError(f"{p / ITEMS_FILE} lacks column(s) {', '.join(sorted(missing))}")
        try:  # memory-mapped: processes on one node (Ray actors) share one copy in RAM; an
            # IVF index's lists are in index.ivfdata beside it (memaudit.index.fill)
            index = read_index(p / INDEX_FILE)
        except RuntimeError as e:
            raise UserError(f"cannot read {p / INDEX_FILE}: {str(e).splitlines()[0]}") from e
        if index.d != manifest["dim"]:
            raise UserError(f"{p}: index.faiss has dim {index.d}, the manifest says "
                            f"{manifest['dim']}")
        _check_items(p / ITEMS_FILE, items, manifest, int(index.ntotal))
        groups = None
        if (p / GROUPS_FILE).is_file():
            groups = GroupTable.open(p, int(index.ntotal), items.num_rows)
        params = manifest.get("faiss_params")
        if params:  # e.g. "nprobe=16" (autofaiss index_param)
            try:
                faiss.ParameterSpace().set_index_parameters(index, params)
            except RuntimeError as e:
                raise UserError(f"bad faiss_params {params!r} in the manifest") from e
        idx = cls(p, manifest, items, index, weights=weights, groups=groups)
        exact = manifest.get("exact_vectors")
        if exact:
            idx._open_exact_vectors(exact)
        return idx

    def _open_exact_vectors(self, spec: dict[str, Any]) -> None:
        """Memory-map DIR/vectors.npy (never another file a manifest names) and check it."""
        f = self.path / VECTORS_FILE
        if not isinstance(spec, dict) or spec.get("file") != VECTORS_FILE:
            raise UserError(f"{self.path / MANIFEST_FILE}: exact_vectors must name "
                            f"{VECTORS_FILE}")
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {f}: {str(e).splitlines()[0]}") from e
        if arr.dtype != np.float32 or arr.shape != (self.ntotal, self.dim):
            raise UserError(f"{f} holds {arr.dtype} {arr.shape}, expected float32 "
                            f"({self.ntotal}, {self.dim})")
        k = spec.get("rerank_candidates", 100)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_RERANK:
            raise UserError(f"{self.path / MANIFEST_FILE}: exact_vectors.rerank_candidates "
                            f"must be a positive integer (at most {MAX_RERANK}), got {k!r}")
        self.exact_vectors = arr
        self.rerank_candidates = k

    # -- basic properties ------------------------------------------------------------------
    @property
    def metric(self) -> str:
        """"ip" (scores are inner products = cosines) or "l2" (squared euclidean)."""
        return self.manifest["metric"]

    @property
    def ntotal(self) -> int:
        """Number of vectors = number of duplicate groups."""
        return int(self.index.ntotal)

    @property
    def nitems(self) -> int:
        return self._items.num_rows

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def embedder(self):
        """The embedder, rebuilt from the manifest; a weights file is only ever the one the
        user named (`weights`), checked against the recorded SHA-256
        (`memaudit.embedders.embedder_from_manifest`)."""
        if self._embedder is None:
            self.set_embedder(self.make_embedder())
        return self._embedder

    def make_embedder(self, device: str | None = None):
        """A new embedder for this index (on `device`), see `embedder`."""
        from memaudit.embedders import embedder_from_manifest

        return embedder_from_manifest(self.manifest["embedder"], weights=self.weights,
                                      device=device, where=f"index {self.path}")

    def set_embedder(self, embedder) -> None:
        """Use an already built embedder (e.g. on another device)."""
        if embedder.dim != self.dim:
            raise UserError(f"embedder dim {embedder.dim} != index dim {self.dim}")
        self._embedder = embedder

    # -- search ----------------------------------------------------------------------------
    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest groups: (scores [n, k], group_ids [n, k]); scores are inner products
        (cosine) or squared L2 distances as faiss gives them; -1 ids when fewer than k."""
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UserError(f"query vectors have shape {x.shape}, index dim is {self.dim}")
        k = max(1, int(k))
        if self.exact_vectors is None:
            scores, ids = self.index.search(x, k)
            return scores, ids.astype(np.int64)
        _, cand = self.index.search(x, max(k, self.rerank_candidates))
        return self._rerank(x, cand.astype(np.int64), k)

    def _rerank(self, x: np.ndarray, cand: np.ndarray, k: int,
                max_floats: int = 8_000_000) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the candidates (from the exact vectors), best k per row; ties go
        to the lower group id; missing candidates (-1) last, with faiss' sentinel score."""
        n, kc = cand.shape
        ip = self.metric == "ip"
        worst = np.float32(-np.finfo(np.float32).max if ip else np.finfo(np.float32).max)
        scores = np.full((n, kc), worst, np.float32)
        step = max(1, max_floats // max(1, kc * self.dim))
        for a in range(0, n, step):
            c = cand[a:a + step]
            ok = c >= 0
            vecs = self.vectors(np.where(ok, c, 0)).astype(np.float64)  # [rows, kc, d]
            q = x[a:a + step, None, :].astype(np.float64)
            s = (vecs * q).sum(-1) if ip else ((vecs - q) ** 2).sum(-1)
            scores[a:a + step] = np.where(ok, s, worst)
        key = -scores.astype(np.float64) if ip else scores.astype(np.float64)
        order = np.lexsort((np.where(cand >= 0, cand, np.iinfo(np.int64).max), key),
                           axis=-1)[:, :k]
        return (np.take_along_axis(scores, order, 1), np.take_along_axis(cand, order, 1))

    def vectors(self, group_ids) -> np.ndarray:
        """Exact vectors of the given groups, float32 [..., dim] (from vectors.npy when the
        factory compresses, else from the faiss index)."""
        ids = np.asarray(group_ids, dtype=np.int64)
        flat = ids.reshape(-1)
        if self.exact_vectors is not None:
            uniq, inv = np.unique(flat, return_inverse=True)  # sorted reads
            out = read_rows(self.exact_vectors, uniq)[inv.reshape(-1)]
        else:
            try:
                out = self.index.reconstruct_batch(flat)
            except RuntimeError:
                out = np.asarray(self.group_vectors(), np.float32)[flat]
        return np.asarray(out, np.float32).reshape(*ids.shape, self.dim)

    def group_vectors(self) -> np.ndarray:
        """All group vectors [ngroups, dim] (exact, except for a compressed factory without
        vectors.npy, where they are the index's reconstructions)."""
        if self.exact_vectors is not None:
            return np.array(self.exact_vectors, np.float32)
        try:
            return self.index.reconstruct_n(0, self.ntotal)
        except RuntimeError:
            import faiss

            try:
                faiss.extract_index_ivf(self.index).make_direct_map()
                return self.index.reconstruct_n(0, self.ntotal)
            except RuntimeError as e:
                raise UserError(f"index {self.manifest.get('factory')} cannot reconstruct "
                                "its vectors") from e

    # -- items and groups ----------------------------------------------------------------
    @property
    def items(self) -> pa.Table:
        """The whole items table. It grows with the training set: the library itself reads
        rows by id (`take_items`, `item`); this is for tools and tests on small indexes."""
        if self._items_table is None:
            self._items_table = self._items.read_all()
        return self._items_table

    def take_items(self, row_ids, columns=None) -> pa.Table:
        """Rows of items.parquet by row id, in the order given (only their row groups are
        read, memaudit.index.items)."""
        return self._items.take(row_ids, columns)

    def representative_rows(self, group_ids) -> np.ndarray:
        """Row id (in items.parquet) of each group's representative; -1 stays -1."""
        return self.groups.rep_rows(group_ids)

    def group_of_rows(self, row_ids) -> np.ndarray:
        r = np.asarray(row_ids, dtype=np.int64)
        g = self._items.take(r.reshape(-1), ["group_id"]).column(0).to_numpy()
        return np.array(g, np.int64).reshape(r.shape)  # a writable copy

    def group_counts(self, group_ids) -> np.ndarray:
        """Number of items in each group (0 for -1)."""
        return self.groups.counts(group_ids)

    def group_rows(self, group_id: int) -> np.ndarray:
        """Row ids of every item of a group, in row order."""
        return self.groups.rows_of(int(group_id))

    def group_caption(self, group_id: int) -> str:
        """Most frequent caption in the group (ties: the one seen first); METHODS 3.2 Gdup."""
        rows = self.group_rows(int(group_id))
        caps = self._items.take(rows, ["caption"]).column(0).to_pylist()
        return Counter(caps).most_common(1)[0][0] if caps else ""

    def item(self, row_id: int) -> dict[str, Any]:
        """One row of items.parquet as a dict."""
        if not 0 <= int(row_id) < self.nitems:
            raise IndexError(f"row id {row_id} out of range [0, {self.nitems})")
        return self._items.take([int(row_id)]).to_pylist()[0]

    def rows_of_keys(self, keys) -> np.ndarray:
        """Row id of each key in items.parquet (-1 where absent; the first row of a repeated
        key): one pass over the key column, a row group at a time (`ItemReader`)."""
        return self._items.rows_of_keys(keys)

    def keys(self, row_ids) -> list[str]:
        return self._items.take(np.asarray(row_ids, dtype=np.int64), ["key"]).column(0
                                                                                ).to_pylist()

    def save_manifest(self) -> None:
        write_json_atomic(self.path / MANIFEST_FILE, self.manifest)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "path": str(self.path),
            "embedder": m["embedder"]["name"],
            "preprocessing": m.get("preprocessing"),
            "dim": m.get("dim"),
            "metric": m.get("metric"),
            "factory": m.get("factory"),
            "items": m.get("rows"),
            "groups": m.get("groups"),
            "dedup": m.get("dedup"),
            "skipped": (m.get("skipped") or {}).get("by_reason", {}),
            "content_hash": m.get("content_hash"),
            "created": m.get("created"),
            "calibration": {
                name: {f: round(float(v), 4) for f, v in (entry.get("fpr") or {}).items()}
                for name, entry in (m.get("calibration") or {}).items()
                if isinstance(entry, dict) and isinstance(entry.get("fpr"), dict)
            } if m.get("calibration") else None,
        }
