"""`build_index`: training Parquet -> DIR/{index.faiss, items.parquet, manifest.json}.

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
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memaudit.common import UserError, package_versions, progress_bar
from memaudit.data.parquet import (
    decode_image,
    file_row_counts,
    image_size,
    iter_training_batches,
    resolve_sources,
)
from memaudit.index.output import check_index_out, remove_partial
from memaudit.index.training_index import (
    INDEX_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    TrainingIndex,
    publish_dir,
    write_json_atomic,
)

FORMAT_VERSION = 1
#: timings of the last build in this process (read by `memaudit index bench`): seconds the
#: model loop waited for decoded batches, and seconds spent in the model
last_build_stats: dict[str, float] = {}
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
        return faiss.index_factory(dim, factory, faiss_metric(metric))
    except RuntimeError as e:
        raise UserError(f"bad faiss factory string {factory!r} for dim {dim}: "
                        f"{str(e).strip().splitlines()[-1]}") from e


def common_image_size(source, image_col=None, caption_col=None, key_col=None) -> list[int] | None:
    """[H, W] when every readable training image has the same size, else None (headers only)."""
    seen: tuple[int, int] | None = None
    for batch in iter_training_batches(source, image_col, caption_col, key_col, 1024):
        for r in batch:
            s = image_size(r.image_bytes)
            if s is None:
                continue
            if seen is None:
                seen = s
            elif s != seen:
                return None
    return None if seen is None else [seen[1], seen[0]]


def _pixel_hash(t) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(tuple(t.shape)).encode())
    h.update(t.contiguous().numpy().tobytes())
    return h.digest()


def _prepare(embedder, rows) -> list[tuple[Any, Any, str | None, bytes, bytes]]:
    """Worker thread: decode + preprocess + hash one batch of rows."""
    out = []
    for r in rows:
        content = hashlib.sha256(r.image_bytes or b"").digest()
        img, reason = decode_image(r.image_bytes)
        t = None
        phash = b""
        if img is not None:
            try:
                t = embedder.preprocess(img)
                phash = _pixel_hash(t)
            except Exception:
                t, reason = None, "undecodable"
        out.append((r, t, reason, phash, content))
    return out


def prepared_batches(embedder, batches: Iterator[list], workers: int,
                     prefetch: int) -> Iterator[list]:
    """Read in a producer thread, decode/preprocess in `workers` threads, yield in order with
    up to `prefetch` batches ready ahead of the consumer (the model)."""
    q: queue.Queue[Future | BaseException | None] = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    with ThreadPoolExecutor(max_workers=max(1, workers),
                            thread_name_prefix="memaudit-decode") as ex:
        def produce() -> None:
            try:
                for b in batches:
                    if stop.is_set():
                        return
                    q.put(ex.submit(_prepare, embedder, b))
                q.put(None)
            except BaseException as e:  # surfaced in the consumer
                q.put(e)

        th = threading.Thread(target=produce, daemon=True, name="memaudit-read")
        th.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                res = item.result()
                last_build_stats["wait_s"] = (last_build_stats.get("wait_s", 0.0)
                                              + time.perf_counter() - t0)
                yield res
        finally:
            stop.set()
            while th.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            th.join()


class _Shard:
    def __init__(self, k: int):
        self.k = k
        self.items: list[tuple[str, str, str, int]] = []
        self.tensors: list = []  # preprocessed, waiting for a full model batch
        self.emb_parts: list[np.ndarray] = []
        self.shape_counts: dict[tuple[int, ...], int] = {}
        self.hashes: list[bytes] = []
        self.skipped: list[dict[str, Any]] = []
        self.digest = hashlib.sha256()

    def flush(self, embedder, batch_size: int) -> None:
        """Run the model on the waiting tensors."""
        if self.tensors:
            t0 = time.perf_counter()
            self.emb_parts.append(embedder.embed_list(self.tensors, batch_size))
            last_build_stats["model_s"] = (last_build_stats.get("model_s", 0.0)
                                           + time.perf_counter() - t0)
            self.tensors = []
            self.shape_counts = {}


def _shard_paths(partial: Path, k: int) -> dict[str, Path]:
    base = partial / f"shard_{k:06d}"
    return {"emb": base.with_suffix(".emb.npy"), "hash": base.with_suffix(".hash.npy"),
            "items": base.with_suffix(".items.parquet"), "done": base.with_suffix(".json")}


def _save_shard(partial: Path, shard: _Shard, embedder, batch_size: int) -> None:
    p = _shard_paths(partial, shard.k)
    shard.flush(embedder, batch_size)
    emb = (np.concatenate(shard.emb_parts) if shard.emb_parts
           else np.zeros((0, embedder.dim), np.float32))
    hashes = (np.frombuffer(b"".join(shard.hashes), dtype=np.uint8).reshape(-1, 16)
              if shard.hashes else np.zeros((0, 16), np.uint8))
    for name, arr in (("emb", emb), ("hash", hashes)):
        tmp = p[name].with_name(p[name].name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, p[name])
    cols = list(zip(*shard.items, strict=True)) if shard.items else [[], [], [], []]
    table = pa.table({"key": pa.array(cols[0], pa.string()),
                      "caption": pa.array(cols[1], pa.string()),
                      "source_file": pa.array(cols[2], pa.string()),
                      "source_row": pa.array(cols[3], pa.int64())})
    tmp = p["items"].with_name(p["items"].name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, p["items"])
    write_json_atomic(p["done"], {"shard": shard.k, "items": len(shard.items),
                                  "skipped": shard.skipped,
                                  "content_digest": shard.digest.hexdigest()})


def _embed_range(partial: Path, embedder, source, cols: dict, start: int, stop: int,
                 shard_rows: int, batch_size: int, workers: int, prefetch: int,
                 advance) -> None:
    """Process input rows [start, stop) (whole shards) and save each shard as it fills."""
    exit_after = os.environ.get(EXIT_AFTER_SHARD_ENV)
    batches = iter_training_batches(source, cols["image_col"], cols["caption_col"],
                                    cols["key_col"], batch_rows=batch_size,
                                    start_row=start, stop_row=stop)
    shard = _Shard(start // shard_rows)

    def finish(sh: _Shard) -> None:
        _save_shard(partial, sh, embedder, batch_size)
        if exit_after is not None and int(exit_after) == sh.k:
            os._exit(75)

    for prepared in prepared_batches(embedder, batches, workers, prefetch):
        for r, t, reason, phash, content in prepared:
            k = r.row // shard_rows
            if k != shard.k:
                finish(shard)
                shard = _Shard(k)
            shard.digest.update(r.key.encode() + b"\0" + r.caption.encode() + b"\0" + content)
            if t is None:
                shard.skipped.append({"key": r.key, "reason": reason, "row": r.row})
                continue
            shard.items.append((r.key, r.caption, r.source_file, r.source_row))
            shard.tensors.append(t)
            shard.hashes.append(phash)
            shape = tuple(t.shape)
            shard.shape_counts[shape] = shard.shape_counts.get(shape, 0) + 1
            # full model batches: one shape reached batch_size (aspect-keeping preprocessing
            # gives several shapes; wait for up to 4 batches' worth to group them)
            if (shard.shape_counts[shape] >= batch_size
                    or len(shard.tensors) >= 4 * batch_size):
                shard.flush(embedder, batch_size)
        advance(len(prepared))
    finish(shard)


def _settings_fingerprint(files: list[Path], counts: list[int], embedder, factory: str,
                          cols: dict, shard_rows: int) -> dict[str, Any]:
    return {
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
                train_sample: int = 100_000, calibration_opts: dict[str, Any] | None = None
                ) -> Path:
    """Build a training-set index (see the module docstring); returns the index directory."""
    from memaudit.embedders import EMBEDDERS, make_embedder

    t0 = time.time()
    last_build_stats.clear()
    if embedder not in EMBEDDERS:
        raise UserError(f"unknown embedder {embedder!r}; choose one of {', '.join(EMBEDDERS)}")
    if batch_size < 1 or shard_rows < 1:
        raise UserError("--batch-size and --shard-rows must be positive")
    out = Path(out)
    files = resolve_sources(source)
    check_index_out(out, source, files, overwrite)
    counts = file_row_counts(files)
    total = sum(counts)
    cols = {"image_col": image_col, "caption_col": caption_col, "key_col": key_col}
    opts = dict(embedder_opts or {})
    size_auto = False
    if embedder == "pixels" and opts.get("size") is None:
        opts["size"] = common_image_size(source, image_col, caption_col, key_col)
        size_auto = True
    emb = make_embedder(embedder, device=device, **opts)
    make_faiss_index(emb.dim, factory, emb.metric)  # a bad factory string fails before work

    partial = out.with_name(out.name + ".partial")
    settings = _settings_fingerprint(files, counts, emb, factory, cols, shard_rows)
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

    nshards = math.ceil(total / shard_rows)
    todo = [k for k in range(nshards) if not _shard_paths(partial, k)["done"].is_file()]
    workers = workers or min(4, os.cpu_count() or 1)
    done_rows = (nshards - len(todo)) * shard_rows
    with progress_bar(f"index {embedder}", total=total, unit="rows") as advance:
        advance(min(done_rows, total))
        # contiguous runs of unfinished shards
        runs: list[list[int]] = []
        for k in todo:
            if runs and runs[-1][-1] == k - 1:
                runs[-1].append(k)
            else:
                runs.append([k])
        for run in runs:
            _embed_range(partial, emb, source, cols, run[0] * shard_rows,
                         min(total, (run[-1] + 1) * shard_rows), shard_rows, batch_size,
                         workers, prefetch=2 * workers, advance=advance)

    kept = sum(json.loads(_shard_paths(partial, k)["done"].read_text())["items"]
               for k in range(nshards))
    if kept == 0:
        skipped: dict[str, int] = {}
        for k in range(nshards):
            for item in json.loads(_shard_paths(partial, k)["done"].read_text())["skipped"]:
                skipped[item["reason"]] = skipped.get(item["reason"], 0) + 1
        remove_partial(partial)
        why = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())) or "no rows"
        raise UserError(f"no usable image in {source} ({why}): no index written")
    staging = partial / "final"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    stats = _finalize(partial, staging, nshards, emb, factory, train_sample)
    manifest: dict[str, Any] = {
        "format": "memaudit-index",
        "format_version": FORMAT_VERSION,
        "embedder": {"name": emb.name, "config": emb.config()},
        "preprocessing": emb.preprocessing,
        "dim": emb.dim,
        "metric": emb.metric,
        "factory": factory,
        "dedup": "exact-pixel-hash",
        "dedup_note": "faiss holds one representative (first seen) per exact-duplicate group; "
                      "faiss id == group_id; nL2's S_k is over representatives (METHODS 1.2)",
        "input_rows": total,
        "rows": stats["rows"],
        "groups": stats["groups"],
        "skipped": stats["skipped"],
        "source": {"paths": [str(f.resolve()) for f in files], "rows_per_file": counts,
                   **cols},
        "content_hash": stats["content_hash"],
        "pixel_size_auto": size_auto if embedder == "pixels" else None,
        "shard_rows": shard_rows,
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
        p = _shard_paths(partial, k)
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
                vecs = np.load(_shard_paths(partial, k)["emb"], mmap_mode="r")[shard_reps[k]]
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
    writer = pq.ParquetWriter(staging / ITEMS_FILE, ITEM_SCHEMA)
    row0 = 0
    filled = 0
    try:
        for k in range(nshards):
            p = _shard_paths(partial, k)
            vecs = np.load(p["emb"], mmap_mode="r")
            rep = shard_reps[k]
            nrep = int(rep.sum())
            if nrep and direct is not None:
                direct[filled:filled + nrep] = vecs[rep]
                filled += nrep
            elif nrep:
                index.add(np.ascontiguousarray(vecs[rep], dtype=np.float32))
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
    faiss.write_index(index, str(staging / INDEX_FILE))
    return {
        "rows": row0,
        "groups": ngroups,
        "skipped": {"total": sum(skipped_by_reason.values()), "by_reason": skipped_by_reason,
                    "keys": skipped_keys},
        "content_hash": content.hexdigest(),
    }
