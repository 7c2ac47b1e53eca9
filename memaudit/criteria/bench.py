"""Benchmark: detect-style scoring against a large Flat index, batched vs a per-image loop.

`python -m memaudit.criteria.bench [--n-images 1000 --n-vectors 100000]` scores n images'
vectors against a Flat index of n-vectors random group vectors with the library's batched
path (faiss search in batches + exact recompute + row lookups, what `detect_images` runs
after embedding) and with a per-image numpy loop (one matrix-vector product over the whole
set per image, argpartition, the same formula), checks that both give the same scores and
neighbours, and prints the times and the speed-up. Two settings:
  nl2  on 16x16 RGB pixel vectors (dim 768, k = 50, metric L2);
  sscd on 512-d L2-normalised descriptors (k = 1, inner product).
Embedding time is left out of both sides (it is the same model forward either way).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa


def synthetic_index(vectors: np.ndarray, embedder_name: str, metric: str) -> Any:
    """A `TrainingIndex` held in memory over the given group vectors (one item per group)."""
    import faiss

    from memaudit.index import TrainingIndex

    n, d = vectors.shape
    index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    index.add(np.ascontiguousarray(vectors, np.float32))
    ids = np.arange(n, dtype=np.int64)
    items = pa.table({"row_id": ids, "key": [f"k{i}" for i in range(n)],
                      "caption": [f"caption {i}" for i in range(n)],
                      "source_file": ["synthetic"] * n, "source_row": ids, "group_id": ids,
                      "group_count": np.ones(n, np.int64),
                      "is_representative": np.ones(n, bool)})
    config = {"size": [16, 16]} if embedder_name == "pixels" else {}
    manifest = {"embedder": {"name": embedder_name, "config": config}, "dim": d,
                "metric": metric, "factory": "Flat", "rows": n, "groups": n,
                "calibration": None}
    return TrainingIndex("synthetic", manifest, items, index)


def numpy_loop(vectors: np.ndarray, queries: np.ndarray, criterion: str, k: int = 50,
               alpha: float = 0.5) -> tuple[np.ndarray, np.ndarray, list]:
    """The per-image baseline: for each query, scores against every vector, top-k, formula,
    and the neighbour's key looked up from a Python list."""
    keys = [f"k{i}" for i in range(len(vectors))]
    sq = (vectors.astype(np.float32) ** 2).sum(1)
    dim = vectors.shape[1]
    scores, nn, out_keys = np.empty(len(queries)), np.empty(len(queries), np.int64), []
    for i, q in enumerate(queries):
        if criterion == "sscd":
            qn = q / np.linalg.norm(q)
            sims = vectors @ qn
            j = int(np.argmax(sims))
            scores[i] = float(sims[j])
        else:
            d2 = sq - 2 * (vectors @ q) + float(q @ q)
            top = np.argpartition(d2, k)[:k]
            l2 = np.sqrt(np.maximum(((vectors[top].astype(np.float64) - q) ** 2).sum(1), 0)
                         / dim)
            j = int(top[np.argmin(l2)])
            scores[i] = l2.min() / (alpha * l2.mean())
        nn[i] = j
        out_keys.append(keys[j])
    return scores, nn, out_keys


def run_bench(n_images: int = 1000, n_vectors: int = 100_000, criteria=("nl2", "sscd"),
              loop_images: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Time batched vs per-image scoring; returns one dict of figures per criterion.

    `loop_images` < n_images times the loop on the first images only and scales the time
    up linearly (stated in the output as `loop_extrapolated`)."""
    import faiss

    from memaudit.criteria import make_criterion
    from memaudit.criteria.common import describe_rows

    rng = np.random.default_rng(seed)
    results = []
    for name in criteria:
        if name == "sscd":
            dim, emb, metric = 512, "sscd", "ip"
            base = rng.standard_normal((n_vectors, dim)).astype(np.float32)
            base /= np.linalg.norm(base, axis=1, keepdims=True)
        else:
            dim, emb, metric = 3 * 16 * 16, "pixels", "l2"
            base = rng.random((n_vectors, dim), dtype=np.float32)
        # half the queries are noisy copies of indexed items, half fresh
        src = rng.integers(0, n_vectors, n_images)
        queries = base[src] + 0.05 * rng.standard_normal((n_images, dim)).astype(np.float32)
        fresh = rng.random(n_images) < 0.5
        queries[fresh] = (rng.random((int(fresh.sum()), dim), dtype=np.float32)
                          if metric == "l2" else
                          rng.standard_normal((int(fresh.sum()), dim)).astype(np.float32))
        index = synthetic_index(base, emb, metric)
        crit = make_criterion(name, index)
        crit.score_vectors(queries[:2])  # warm-up: lazy imports, group matrix
        numpy_loop(base, queries[:2], name)
        t0 = time.perf_counter()
        score, gid = crit.score_vectors(queries)[:2]
        rows = crit.rows_of(gid)
        info = describe_rows(index, rows)
        t_batched = time.perf_counter() - t0
        m = n_images if loop_images is None else min(loop_images, n_images)
        t0 = time.perf_counter()
        ref_score, ref_nn, ref_keys = numpy_loop(base, queries[:m], name)
        t_loop = (time.perf_counter() - t0) * n_images / m
        results.append({
            "criterion": name, "n_images": n_images, "n_vectors": n_vectors, "dim": dim,
            "batched_s": round(t_batched, 3), "loop_s": round(t_loop, 3),
            "loop_images_timed": m, "loop_extrapolated": m < n_images,
            "speedup": round(t_loop / t_batched, 1),
            "same_neighbours": bool(np.array_equal(rows[:m], ref_nn)
                                    and info["key"][:m] == ref_keys),
            "max_score_diff": float(np.abs(score[:m] - ref_score).max()),
            "faiss_threads": faiss.omp_get_max_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
        })
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=1000)
    p.add_argument("--n-vectors", type=int, default=100_000)
    p.add_argument("--criterion", action="append", choices=["nl2", "sscd"])
    p.add_argument("--loop-images", type=int, default=None)
    a = p.parse_args(argv)
    for r in run_bench(a.n_images, a.n_vectors, tuple(a.criterion or ("nl2", "sscd")),
                       a.loop_images):
        extra = (f" (extrapolated from {r['loop_images_timed']})"
                 if r["loop_extrapolated"] else "")
        print(f"{r['criterion']}: {r['n_images']} images vs {r['n_vectors']} x {r['dim']} Flat: "
              f"batched {r['batched_s']:.2f} s, per-image numpy loop {r['loop_s']:.2f} s{extra}"
              f", speed-up {r['speedup']:.1f}x; same neighbours: {r['same_neighbours']}, "
              f"max score diff {r['max_score_diff']:.2e}; faiss threads {r['faiss_threads']}")


if __name__ == "__main__":
    main()
