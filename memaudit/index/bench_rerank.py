"""`memaudit index bench-rerank`: a compressed index with exact re-ranking vs Flat (issue 9).

Synthetic vectors stand in for a large training set: `n` items in clusters (so the nearest
neighbours are cluster-mates at realistic similarities), indexed twice through the build's
own finalisation (`finalize_shards`: IVF-PQ trained on a sample, filled shard by shard,
vectors.npy kept): once `Flat` (the truth) and once with a compressed factory. Queries are
near-copies of training items at similarities spread across the copy threshold, and fresh
cluster members (near but not copies). For each way of answering, the real criterion (sscd
on unit vectors, nl2 on pixel-like vectors) is scored and compared with Flat:

- recall@1: the nearest group is Flat's nearest group;
- verdicts: is_copy at the criterion's fixed threshold equals Flat's;
- the largest score error.

"pq" is the compressed index alone (scores from PQ reconstructions: what the criteria did
before this change); "rerank R" re-scores the best R candidates with the exact vectors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np


def clustered(n: int, dim: int, clusters: int, rng: np.random.Generator, unit: bool,
              centers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster members c + s * noise (s drawn per cluster); unit-normalised for cosines.
    Returns (vectors [n, dim] float32, the cluster centres)."""
    if centers is None:
        centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    spread = np.random.default_rng(1).uniform(1.0, 2.0, len(centers)).astype(np.float32)
    c = rng.integers(len(centers), size=n)
    x = centers[c] + spread[c, None] * rng.standard_normal((n, dim)).astype(np.float32)
    if unit:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    else:  # pixel-like: squashed into [0, 1]
        x = 1.0 / (1.0 + np.exp(-0.5 * x))
    return x.astype(np.float32), centers


def near_copies(train: np.ndarray, n: int, rng: np.random.Generator, unit: bool
                ) -> np.ndarray:
    """Training items moved away from themselves: cosine uniform in [0.3, 0.95] (unit) or
    pixel noise of RMSE uniform in [0, 0.3] (pixel-like, clipped to [0, 1])."""
    src = train[rng.choice(len(train), n, replace=False)]
    if unit:
        cos = rng.uniform(0.3, 0.95, (n, 1)).astype(np.float32)
        u = rng.standard_normal(src.shape).astype(np.float32)
        u -= (u * src).sum(1, keepdims=True) * src
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        return (cos * src + np.sqrt(1 - cos ** 2) * u).astype(np.float32)
    eps = rng.uniform(0.0, 0.3, (n, 1)).astype(np.float32)
    return np.clip(src + eps * rng.standard_normal(src.shape).astype(np.float32), 0, 1)


def index_from_vectors(vectors: np.ndarray, out: Path, factory: str, metric: str,
                       embedder: str, rerank: int = 100, train_sample: int = 100_000,
                       shard_rows: int = 16_384) -> Path:
    """An index directory from raw vectors, through the build's shard files and finalisation
    (every vector its own group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memaudit.index.build import FORMAT_VERSION
    from memaudit.index.finalize import finalize_shards
    from memaudit.index.shards import shard_paths
    from memaudit.index.training_index import (
        MANIFEST_FILE,
        VECTORS_FILE,
        publish_dir,
        write_json_atomic,
    )

    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True)
    n, dim = vectors.shape
    nshards = -(-n // shard_rows)
    for k in range(nshards):
        rows = np.arange(k * shard_rows, min(n, (k + 1) * shard_rows))
        p = shard_paths(partial, k)
        np.save(p["emb"], vectors[rows])
        np.save(p["hash"], np.frombuffer(b"".join(
            hashlib.blake2b(int(r).to_bytes(8, "little"), digest_size=16).digest()
            for r in rows), np.uint8).reshape(-1, 16))
        keys = [f"v{r}" for r in rows]
        pq.write_table(pa.table({"key": keys, "caption": keys,
                                 "source_file": ["synthetic"] * len(rows),
                                 "source_row": pa.array(rows, pa.int64())}), p["items"])
        write_json_atomic(p["done"], {"shard": k, "items": len(rows), "skipped": [],
                                      "content_digest": hashlib.sha256(keys[0].encode())
                                      .hexdigest()})
    staging = partial / "final"
    staging.mkdir()
    stats = finalize_shards(partial, staging, nshards,
                            SimpleNamespace(dim=dim, metric=metric), factory, train_sample)
    manifest = {"format": "memaudit-index", "format_version": FORMAT_VERSION,
                "embedder": {"name": embedder, "config": {}}, "dim": dim, "metric": metric,
                "factory": factory, "rows": stats["rows"], "groups": stats["groups"],
                "exact_vectors": ({"file": VECTORS_FILE, "dtype": "float32",
                                   "rerank_candidates": rerank}
                                  if stats["exact_vectors"] else None),
                "calibration": None}
    write_json_atomic(staging / MANIFEST_FILE, manifest)
    publish_dir(staging, out)
    shutil.rmtree(partial)
    return out


def _compare(crit, truth, vectors: np.ndarray, truth_scores) -> dict[str, Any]:
    crit.groups.fast = False  # through the index's search, whatever its size
    t0 = time.perf_counter()
    s = crit.score_from_vectors(vectors)
    secs = time.perf_counter() - t0
    g_truth = truth.group_of_rows(truth_scores.neighbour)
    g = crit.index.group_of_rows(s.neighbour)
    copies = truth_scores.is_copy
    return {"recall_at_1": round(float(np.mean(g == g_truth)), 4),
            "recall_at_1_of_flat_copies": round(float(np.mean((g == g_truth)[copies])), 4),
            "verdict_agreement": round(float(np.mean(s.is_copy == copies)), 4),
            "missed_copies": int(np.sum(copies & ~s.is_copy)),
            "extra_copies": int(np.sum(s.is_copy & ~copies)),
            "max_abs_score_error": round(float(np.abs(s.score - truth_scores.score).max()), 4),
            "seconds": round(secs, 2)}


def bench_case(name: str, criterion: str, factory: str, nprobes: tuple[int, ...], n: int,
               dim: int, queries: int, reranks: tuple[int, ...], train_sample: int,
               work: Path, seed: int = 0) -> dict[str, Any]:
    """One criterion: Flat vs `factory` alone vs `factory` + re-ranking R candidates, at
    each IVF nprobe."""
    import faiss

    from memaudit.criteria import make_criterion
    from memaudit.index.training_index import TrainingIndex

    unit = criterion == "sscd"
    metric = "ip" if unit else "l2"
    embedder = "sscd" if unit else "pixels"
    rng = np.random.default_rng(seed)
    clusters = max(1, n // 100)
    train, centers = clustered(n, dim, clusters, rng, unit)
    fresh, _ = clustered(queries // 2, dim, clusters, rng, unit, centers)
    q = np.concatenate([near_copies(train, queries - queries // 2, rng, unit), fresh])
    t0 = time.perf_counter()
    flat_dir = index_from_vectors(train, work / f"{name}-flat", "Flat", metric, embedder)
    t_flat = time.perf_counter() - t0
    t0 = time.perf_counter()
    pq_dir = index_from_vectors(train, work / f"{name}-pq", factory, metric, embedder,
                                train_sample=train_sample)
    t_pq = time.perf_counter() - t0
    del train

    flat = TrainingIndex.open(flat_dir)
    truth_crit = make_criterion(criterion, flat)
    truth = truth_crit.score_from_vectors(q)
    out: dict[str, Any] = {
        "case": name, "criterion": criterion, "n": n, "dim": dim, "queries": len(q),
        "factory": factory, "train_sample": train_sample,
        "bytes_per_vector": {"flat": 4 * dim, "exact_vectors_npy": 4 * dim,
                             "compressed_code": int(faiss.extract_index_ivf(faiss.read_index(
                                 str(pq_dir / "index.faiss"))).code_size),
                             "ivf_id": 8},
        "build_seconds": {"flat": round(t_flat, 1), "compressed": round(t_pq, 1)},
        "flat_copy_rate": round(float(np.mean(truth.is_copy)), 4),
        "flat_score_quantiles": {str(p): round(float(np.quantile(truth.score, p)), 3)
                                 for p in (0.1, 0.25, 0.5, 0.75, 0.9)},
        "flat_within_5pct_of_threshold": round(float(np.mean(
            np.abs(truth.score - truth_crit.threshold) < 0.05 * truth_crit.threshold)), 4),
        "results": {}}
    idx = TrainingIndex.open(pq_dir)
    exact = idx.exact_vectors
    faiss.extract_index_ivf(idx.index).make_direct_map()
    for nprobe in nprobes:
        faiss.ParameterSpace().set_index_parameters(idx.index, f"nprobe={nprobe}")
        # the compressed index alone: candidates and scores from PQ codes (the old way)
        idx.exact_vectors = None
        out["results"][f"nprobe {nprobe}, pq"] = _compare(make_criterion(criterion, idx),
                                                         flat, q, truth)
        idx.exact_vectors = exact
        for r in reranks:
            idx.rerank_candidates = r
            out["results"][f"nprobe {nprobe}, rerank {r}"] = _compare(
                make_criterion(criterion, idx), flat, q, truth)
    return out


def run_bench_rerank(n: int = 100_000, queries: int = 2000, train_sample: int = 25_000,
                     work: Path | None = None) -> list[dict[str, Any]]:
    """Both cases (sscd: 512-d unit vectors, IVF-PQ64; nl2: 768-d pixel-like vectors,
    IVF-PQ96; nlist the power of two nearest 1.6 sqrt(n)); prints one JSON line each."""
    import warnings

    nlist = 2 ** max(0, round(np.log2(1.6 * np.sqrt(n))))
    probes = tuple(p for p in (16, 64, 256) if p <= nlist) or (nlist,)
    cases = [("sscd", "sscd", f"IVF{nlist},PQ64", probes, 512, (1, 10, 100)),
             ("nl2", "nl2", f"IVF{nlist},PQ96", probes, 768, (50, 100, 200))]
    results = []
    with tempfile.TemporaryDirectory(prefix="memaudit-rerank-") as tmp:
        for name, crit, factory, nprobes, dim, reranks in cases:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the "pq" row is lossy on purpose
                r = bench_case(name, crit, factory, nprobes, n, dim, queries, reranks,
                               train_sample, Path(work or tmp))
            print(json.dumps(r), flush=True)
            results.append(r)
    return results
