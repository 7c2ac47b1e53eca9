"""`build_index`: a training set (any layout) -> DIR/{index.faiss, items.parquet, manifest.json}.

Streaming and resumable (DESIGN.md "Core abstractions", issue 2): input rows are cut into
shards of `shard_rows`; each shard's embeddings, pixel hashes and item rows are saved under
`DIR.partial/` as it completes, so a killed build started again redoes only the unfinished
shard and ends byte-identical to an uninterrupted one. The final directory appears only by
rename. Decoding and preprocessing run in worker threads ahead of the model.

Exact duplicates (same decoded pixels at index resolution, i.e. the same preprocessed
tensor) form one group; the faiss index holds the first-seen representative of each group
(faiss id == group id), so nL2's S_k is over representatives (METHODS 1.2).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memaudit.common import UserError, package_versions, progress_bar
from memaudit.data.parquet import image_size
from memaudit.data.training_set import iter_training_batches, open_training_set
from memaudit.index.output import check_index_out, remove_partial
from memaudit.index.shards import ShardFactory, ShardSpec, last_build_stats, shard_paths
from memaudit.index.training_index import (
    INDEX_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    VECTORS_FILE,
    TrainingIndex,
    is_lossy_factory,
    publish_dir,
    write_json_atomic,
)

FORMAT_VERSION = 1
#: test hook: os._exit right after this shard number has been saved
EXIT_AFTER_SHARD_ENV = "MEMAUDIT_INDEX_EXIT_AFTER_SHARD"

ITEM_SCHEMA = pa.schema([
    ("row_id", pa.int64()),
    ("key", pa.string()),
    ("caption", pa.string()),
    ("source_file", pa.string()),
    ("source_row", pa.int64()),
    ("group_id", pa.int64()),
    ("group_count", pa.int64()),
    ("is_representative", pa.bool_()),
])


def faiss_metric(metric: str) -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def make_faiss_index(dim: int, factory: str, metric: str):
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss_metric(metric))
    except RuntimeError as e:
        raise UserError(f"bad faiss factory string {factory!r} for dim {dim}: "
                        f"{str(e).strip().splitlines()[-1]}") from e
    # PQ codes are trained "polysemous" by default: a centroid reordering that only Hamming
    # pre-filtering uses (never done here) and that took 250 s of 265 s training IVF256,PQ64
    # on 5,000 vectors (2-core machine); distances are the same without it
    inner = faiss.downcast_index(faiss.try_extract_index_ivf(index) or index)
    if getattr(inner, "do_polysemous_training", False):
        inner.do_polysemous_training = False
    return index


def set_faiss_params(index, params: str) -> None:
    """Apply search-time parameters such as "nprobe=16" (faiss ParameterSpace syntax)."""
    import faiss

    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as e:
        raise UserError(f"bad faiss parameters {params!r}: "
                        f"{str(e).strip().splitlines()[-1]}") from e


def common_image_size(source, image_col=None, caption_col=None, key_col=None,
                      **layout_opts) -> list[int] | None:
    """[H, W] when every readable training image has the same size, else None (headers only)."""
    seen: tuple[int, int] | None = None
    for batch in iter_training_batches(source, image_col, caption_col, key_col, 1024,
                                       **layout_opts):
        for r in batch:
            s = image_size(r.image_bytes)
            if s is None:
                continue
            if seen is None:
                seen = s
            elif s != seen:
                return None
    return None if seen is None else [seen[1], seen[0]]


def _settings_fingerprint(files: list[Path], counts: list[int], embedder, factory: str,
                          cols: dict, shard_rows: int, layout=None) -> dict[str, Any]:
    extra = layout.fingerprint() if layout is not None else None
    return {**({"layout": extra} if extra else {}),
        "files": [{"path": str(f.resolve()), "rows": n, "bytes": f.stat().st_size,
                   "mtime_ns": f.stat().st_mtime_ns} for f, n in zip(files, counts, strict=True)],
        "embedder": {"name": embedder.name, "config": embedder.config()},
        "preprocessing": embedder.preprocessing,
        "factory": factory,
        "columns": cols,
        "shard_rows": shard_rows,
    }


def build_index(source: str | Path, embedder: str, out: str | Path, factory: str = "Flat",
                device: str | None = None, batch_size: int = 64, image_col: str | None = None,
                caption_col: str | None = None, key_col: str | None = None,
                embedder_opts: dict[str, Any] | None = None, shard_rows: int = 4096,
                calibrate: bool = True, workers: int | None = None, overwrite: bool = False,
                train_sample: int = 100_000, calibration_opts: dict[str, Any] | None = None,
                engine: Any = "local", address: str | None = None, actors: int | None = None,
                faiss_params: str | None = None, rerank: int = 100,
                layout: str | None = None, instance_prompt: str | None = None,
                class_prompt: str | None = None) -> Path:
    """Build a training-set index (see the module docstring); returns the index directory.

    `engine` ("local", "ray" or an engine object, see memaudit.engine) decides only where
    the shards are computed; `address` and `actors` are Ray's. Compressed factories (PQ, SQ)
    also keep the exact vectors for re-ranking the `rerank` best candidates. `source` is a
    training set in any layout (memaudit.data.training_set; `layout`, `instance_prompt`,
    `class_prompt` and the column options choose and read it)."""
    from memaudit.embedders import EMBEDDERS, make_embedder
    from memaudit.engine import make_engine

    t0 = time.time()
    last_build_stats.clear()
    if embedder not in EMBEDDERS:
        raise UserError(f"unknown embedder {embedder!r}; choose one of {', '.join(EMBEDDERS)}")
    if batch_size < 1 or shard_rows < 1:
        raise UserError("--batch-size and --shard-rows must be positive")
    out = Path(out)
    if rerank < 1:
        raise UserError("--rerank must be at least 1")
    cols = {"image_col": image_col, "caption_col": caption_col, "key_col": key_col}
    cols.update({k: v for k, v in (("layout", layout), ("instance_prompt", instance_prompt),
                                   ("class_prompt", class_prompt)) if v is not None})
    data = open_training_set(source, **cols)
    files = [f.resolve() for f in data.units()]  # workers may run elsewhere
    check_index_out(out, source, [*files, *data.roots()], overwrite)
    counts = data.unit_rows(files)
    total = sum(counts)
    opts = dict(embedder_opts or {})
    size_auto = False
    if embedder == "pixels" and opts.get("size") is None:
        opts["size"] = common_image_size(source, **{**cols, "layout": data.name})
        size_auto = True
    eng = make_engine(engine, address, actors, device) if isinstance(engine, str) else engine
    local = eng.name == "local"
    # the driver's embedder: the local worker, or (Ray) its config and dim, kept off the GPU
    emb = make_embedder(embedder, device=device if local else "cpu", **opts)
    probe = make_faiss_index(emb.dim, factory, emb.metric)  # bad strings fail before work
    if faiss_params:
        set_faiss_params(probe, faiss_params)

    partial = out.with_name(out.name + ".partial")
    settings = _settings_fingerprint(files, counts, emb, factory, cols, shard_rows, data)
    state_file = partial / "state.json"
    if partial.exists():
        try:
            old = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != settings:  # another build's shards: start over, never mix them
            remove_partial(partial)
    if not partial.exists():
        partial.mkdir(parents=True)
        write_json_atomic(state_file, settings)

    spec = ShardSpec(partial=partial.absolute(), source=str(source), files=files,
                     counts=counts, cols={**cols, "layout": data.name},  # not detected again
                     shard_rows=shard_rows, total=total,
                     batch_size=batch_size,
                     workers=workers or (min(4, os.cpu_count() or 1) if local else None))
    nshards = spec.nshards
    todo = [k for k in range(nshards) if not shard_paths(partial, k)["done"].is_file()]
    done_rows = (nshards - len(todo)) * shard_rows
    exit_after = os.environ.get(EXIT_AFTER_SHARD_ENV)
    try:
        with progress_bar(f"index {embedder}", total=total, unit="rows") as advance:
            advance(min(done_rows, total))
            work = ShardFactory(spec, emb.name, emb.config(), embedder=emb if local else None,
                                advance=advance if local else None)
            for res in eng.map(work, todo):  # in shard order, whichever engine
                if not local:
                    advance(res["rows"])
                if exit_after is not None and int(exit_after) == res["shard"]:
                    os._exit(75)
        engine_info = eng.describe()
    finally:
        if isinstance(engine, str):
            eng.close()

    kept = sum(json.loads(shard_paths(partial, k)["done"].read_text())["items"]
               for k in range(nshards))
    if kept == 0:
        skipped: dict[str, int] = {}
        for k in range(nshards):
            for item in json.loads(shard_paths(partial, k)["done"].read_text())["skipped"]:
                skipped[item["reason"]] = skipped.get(item["reason"], 0) + 1
        remove_partial(partial)
        why = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())) or "no rows"
        raise UserError(f"no usable image in {source} ({why}): no index written")
    staging = partial / "final"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    stats = _finalize(partial, staging, nshards, emb, factory, train_sample)
    exact = None
    if stats["exact_vectors"]:
        exact = {"file": VECTORS_FILE, "dtype": "float32", "rerank_candidates": int(rerank)}
    manifest: dict[str, Any] = {
        "format": "memaudit-index",
        "format_version": FORMAT_VERSION,
        "embedder": {"name": emb.name, "config": emb.config()},
        "preprocessing": emb.preprocessing,
        "dim": emb.dim,
        "metric": emb.metric,
        "factory": factory,
        **({"faiss_params": faiss_params} if faiss_params else {}),
        "exact_vectors": exact,
        "dedup": "exact-pixel-hash",
        "dedup_note": "faiss holds one representative (first seen) per exact-duplicate group; "
                      "faiss id == group_id; nL2's S_k is over representatives (METHODS 1.2)",
        "input_rows": total,
        "rows": stats["rows"],
        "groups": stats["groups"],
        "skipped": stats["skipped"],
        "source": {"paths": [str(f.resolve()) for f in files], "rows_per_file": counts,
                   **cols, **data.describe()},
        "content_hash": stats["content_hash"],
        "pixel_size_auto": size_auto if embedder == "pixels" else None,
        "shard_rows": shard_rows,
        "engine": engine_info,
        "versions": package_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": None,
        "calibration": None,
    }
    write_json_atomic(staging / MANIFEST_FILE, manifest)
    if calibrate:
        run_calibration(staging, emb, **(calibration_opts or {}))
        manifest = json.loads((staging / MANIFEST_FILE).read_text())
    manifest["build_seconds"] = round(time.time() - t0, 3)
    write_json_atomic(staging / MANIFEST_FILE, manifest)

    publish_dir(staging, out)
    shutil.rmtree(partial)
    return out


def run_calibration(index_dir: Path, embedder=None, **opts: Any) -> dict[str, Any] | None:
    """Call the criteria area's `calibrate_index` and store its result in the manifest.

    When `memaudit.criteria.calibrate` is not installed the manifest records
    `"calibration": null` with a note."""
    idx = TrainingIndex.open(index_dir)
    if embedder is not None:
        idx.set_embedder(embedder)
    try:
        from memaudit.criteria.calibrate import calibrate_index
    except ImportError:
        idx.manifest["calibration"] = None
        idx.manifest["calibration_note"] = ("memaudit.criteria.calibrate not available; run "
                                            "`memaudit index calibrate DIR`")
        idx.save_manifest()
        return None
    result = calibrate_index(idx, **opts)
    idx.manifest["calibration"] = result
    idx.manifest.pop("calibration_note", None)
    idx.save_manifest()
    return result


def group_duplicates(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact-duplicate groups from per-item digests [n, 16] (uint8), numbered in order of
    first appearance: (group id per item, is-representative (first seen) per item,
    item count per group)."""
    n = len(hashes)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.int64)
    keys = np.ascontiguousarray(hashes, dtype=np.uint8).view(f"V{hashes.shape[1]}").ravel()
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True,
                                          return_counts=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    groups = rank[inverse.ravel()].astype(np.int64)
    rep = np.zeros(n, dtype=bool)
    rep[first] = True
    return groups, rep, counts[order].astype(np.int64)


def _finalize(partial: Path, staging: Path, nshards: int, emb, factory: str,
              train_sample: int) -> dict[str, Any]:
    """Group duplicates, build the faiss index over representatives, write items.parquet."""
    import faiss

    skipped_by_reason: dict[str, int] = {}
    skipped_keys: dict[str, list[str]] = {}
    content = hashlib.sha256()
    hash_parts: list[np.ndarray] = []
    for k in range(nshards):
        p = shard_paths(partial, k)
        info = json.loads(p["done"].read_text())
        content.update(bytes.fromhex(info["content_digest"]))
        for s in info["skipped"]:
            skipped_by_reason[s["reason"]] = skipped_by_reason.get(s["reason"], 0) + 1
            skipped_keys.setdefault(s["reason"], []).append(s["key"])
        hash_parts.append(np.load(p["hash"]))
    sizes = [len(h) for h in hash_parts]
    groups, rep_all, count_arr = group_duplicates(
        np.concatenate(hash_parts) if hash_parts else np.zeros((0, 16), np.uint8))
    del hash_parts
    bounds = np.cumsum([0, *sizes])
    shard_groups = [groups[bounds[i]:bounds[i + 1]] for i in range(nshards)]
    shard_reps = [rep_all[bounds[i]:bounds[i + 1]] for i in range(nshards)]
    ngroups = len(count_arr)

    index = make_faiss_index(emb.dim, factory, emb.metric)
    if not index.is_trained:
        if ngroups == 0:
            raise UserError("no decodable images: cannot train the faiss index")
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(ngroups, size=min(train_sample, ngroups), replace=False))
        parts, seen = [], 0
        for k in range(nshards):
            nrep = int(shard_reps[k].sum())
            sel = pick[(pick >= seen) & (pick < seen + nrep)] - seen
            if len(sel):
                vecs = np.load(shard_paths(partial, k)["emb"], mmap_mode="r")[shard_reps[k]]
                parts.append(np.asarray(vecs[sel], dtype=np.float32))
            seen += nrep
        train = np.ascontiguousarray(np.concatenate(parts))
        try:
            index.train(train)
        except RuntimeError as e:
            raise UserError(f"cannot train faiss {factory!r} on {len(train)} vectors: "
                            f"{str(e).strip().splitlines()[-1]}") from e
    # Flat: allocate the vector storage once and fill it shard by shard (repeated add()
    # would grow it by doubling, a transient of up to 3x the vectors' size)
    flat = faiss.downcast_index(index)
    direct = None
    if isinstance(flat, faiss.IndexFlat) and ngroups:
        flat.codes.resize(ngroups * flat.code_size)
        direct = faiss.rev_swig_ptr(flat.codes.data(), ngroups * flat.code_size)
        direct = direct.view(np.float32).reshape(ngroups, emb.dim)
    # compressed factories: the exact vectors too, for re-ranking (docs/index-format.md)
    exact = (np.lib.format.open_memmap(staging / VECTORS_FILE, mode="w+", dtype=np.float32,
                                       shape=(ngroups, emb.dim))
             if is_lossy_factory(factory) else None)
    writer = pq.ParquetWriter(staging / ITEMS_FILE, ITEM_SCHEMA)
    row0 = 0
    filled = 0
    try:
        for k in range(nshards):
            p = shard_paths(partial, k)
            vecs = np.load(p["emb"], mmap_mode="r")
            rep = shard_reps[k]
            nrep = int(rep.sum())
            if nrep and direct is not None:
                direct[filled:filled + nrep] = vecs[rep]
            elif nrep:
                index.add(np.ascontiguousarray(vecs[rep], dtype=np.float32))
            if nrep and exact is not None:
                exact[filled:filled + nrep] = vecs[rep]
            filled += nrep
            items = pq.read_table(p["items"])
            n = items.num_rows
            g = shard_groups[k]
            table = pa.table({
                "row_id": pa.array(np.arange(row0, row0 + n, dtype=np.int64)),
                "key": items.column("key"),
                "caption": items.column("caption"),
                "source_file": items.column("source_file"),
                "source_row": items.column("source_row"),
                "group_id": pa.array(g),
                "group_count": pa.array(count_arr[g] if n else np.zeros(0, np.int64)),
                "is_representative": pa.array(rep),
            }, schema=ITEM_SCHEMA)
            writer.write_table(table)
            row0 += n
    finally:
        writer.close()
    if direct is not None:
        del direct
        flat.ntotal = ngroups  # same C++ object as `index` (which keeps ownership)
    if exact is not None:
        exact.flush()
        del exact
    faiss.write_index(index, str(staging / INDEX_FILE))
    return {
        "exact_vectors": is_lossy_factory(factory),
        "rows": row0,
        "groups": ngroups,
        "skipped": {"total": sum(skipped_by_reason.values()), "by_reason": skipped_by_reason,
                    "keys": skipped_keys},
        "content_hash": content.hexdigest(),
    }
