"""`build_index`: a training set (any layout) -> DIR/{index.faiss, items.parquet, manifest.json}.

Streaming and resumable (DESIGN.md "Core abstractions", issue 2): input rows are cut into
shards of `shard_rows`; each shard's embeddings, pixel hashes and item rows are saved under
`DIR.partial/` as it completes, so a killed build started again redoes only the unfinished
shard and ends byte-identical to an uninterrupted one. The final directory appears only by
rename. Decoding and preprocessing run in worker threads ahead of the model.

Exact duplicates (same decoded pixels at index resolution, i.e. the same preprocessed
tensor) form one group; the faiss index holds the first-seen representative of each group
(faiss id == group id), so nL2's S_k is over representatives (METHODS 1.2). The
finalisation (grouping with DuckDB, faiss filled in pieces) is `memaudit.index.finalize`;
`memory_limit` bounds every stage (issue 20).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memaudit.common import UserError, package_versions, progress_bar
from memaudit.data.parquet import image_size
from memaudit.data.training_set import iter_training_batches, open_training_set
from memaudit.engine.memory import (
    format_bytes,
    last_stages,
    parse_memory,
    stage,
    stage_budgets,
)
from memaudit.index.finalize import ITEM_SCHEMA, finalize_shards
from memaudit.index.grouping import group_duplicates
from memaudit.index.output import check_index_out, remove_partial
from memaudit.index.shards import ShardFactory, ShardSpec, last_build_stats, shard_paths
from memaudit.index.training_index import (
    MANIFEST_FILE,
    MAX_RERANK,
    VECTORS_FILE,
    TrainingIndex,
    is_lossy_factory,
    publish_dir,
    write_json_atomic,
)

__all__ = ["ITEM_SCHEMA", "build_index", "group_duplicates", "make_faiss_index",
           "run_calibration"]

FORMAT_VERSION = 1
#: test hook: os._exit right after this shard number has been saved
EXIT_AFTER_SHARD_ENV = "MEMAUDIT_INDEX_EXIT_AFTER_SHARD"
#: benchmark hook: keep DIR.partial's shards as DIR.shards (memaudit.index.bench_scale)
KEEP_SHARDS_ENV = "MEMAUDIT_INDEX_KEEP_SHARDS"

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
    if isinstance(faiss.downcast_index(index), faiss.IndexIDMap | faiss.IndexIDMap2):
        raise UserError(f"bad faiss factory string {factory!r}: memaudit numbers the vectors "
                        "itself (faiss id = duplicate group), drop the IDMap prefix")
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


def check_memory(limit: int | None, index, factory: str, rows: int, shard_rows: int,
                 dim: int, train_sample: int) -> None:
    """Refuse, before any work, settings whose known memory exceeds an explicit limit: one
    shard's embeddings on a worker, the IVF training sample, or a factory that is filled in
    memory (rows: the input rows, an upper bound on the groups)."""
    from memaudit.index.fill import check_memory_fill

    if limit is None:
        return
    budgets = stage_budgets(limit)
    shard = 2 * shard_rows * dim * 4  # the embeddings + the tensors waiting for the model
    if shard > budgets["shard"]:
        raise UserError(f"--shard-rows {shard_rows} at dim {dim} needs about "
                        f"{format_bytes(shard)} per worker, over its share of --memory-limit "
                        f"{format_bytes(limit)}: lower --shard-rows")
    sample = min(train_sample, rows) * dim * 4
    if not index.is_trained and sample > budgets["train"]:
        raise UserError(f"the IVF training sample ({min(train_sample, rows)} vectors of dim "
                        f"{dim}, {format_bytes(sample)}) is over its share of --memory-limit "
                        f"{format_bytes(limit)}: lower train_sample")
    check_memory_fill(index, factory, rows, limit)


def build_index(source: str | Path, embedder: str, out: str | Path, factory: str = "Flat",
                device: str | None = None, batch_size: int = 64, image_col: str | None = None,
                caption_col: str | None = None, key_col: str | None = None,
                embedder_opts: dict[str, Any] | None = None, shard_rows: int = 4096,
                calibrate: bool = True, workers: int | None = None, overwrite: bool = False,
                train_sample: int = 100_000, calibration_opts: dict[str, Any] | None = None,
                engine: Any = "local", address: str | None = None, actors: int | None = None,
                faiss_params: str | None = None, rerank: int | None = None,
                layout: str | None = None, instance_prompt: str | None = None,
                class_prompt: str | None = None,
                memory_limit: str | int | None = None,
                jpeg_device: str | None = None) -> Path:
    """Build a training-set index (see the module docstring); returns the index directory.

    `engine` ("local", "ray" or an engine object, see memaudit.engine) decides only where
    the shards are computed; `address` and `actors` are Ray's. Compressed factories (PQ, SQ)
    also keep the exact vectors for re-ranking the `rerank` best candidates (default 100;
    refused on exact factories, which have nothing to re-rank). `source` is a training set
    in any layout (memaudit.data.training_set; `layout`, `instance_prompt`, `class_prompt`
    and the column options choose and read it). `memory_limit` ("4GB", bytes) caps each
    stage's peak in one process (memaudit.engine.memory). `jpeg_device`: where JPEG rows are
    decoded (memaudit/embedders/jpeg.py; default: on the GPU when the embedder runs there
    and can, else PIL)."""
    from memaudit.embedders import EMBEDDERS, make_embedder
    from memaudit.engine import make_engine

    t0 = time.time()
    last_build_stats.clear()
    last_stages.clear()
    limit = parse_memory(memory_limit)
    if embedder not in EMBEDDERS:
        raise UserError(f"unknown embedder {embedder!r}; choose one of {', '.join(EMBEDDERS)}")
    if batch_size < 1 or shard_rows < 1:
        raise UserError("--batch-size and --shard-rows must be positive")
    out = Path(out)
    if rerank is not None and not is_lossy_factory(factory):
        raise UserError(f"--rerank applies to compressed factories (PQ, SQ); {factory!r} "
                        "stores exact vectors, so its scores need no re-ranking")
    rerank = 100 if rerank is None else rerank
    if not 1 <= rerank <= MAX_RERANK:
        raise UserError(f"--rerank must be at least 1 and at most {MAX_RERANK}, got {rerank}")
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
    check_memory(limit, probe, factory, total, shard_rows, emb.dim, train_sample)

    partial = out.with_name(out.name + ".partial")
    from memaudit.embedders.jpeg import resolve_jpeg_device

    # resolved once here and handed to every worker as is: local builds by their embedder's
    # device; on Ray only when the user names a device (auto stays with PIL there)
    auto = str(jpeg_device or "auto").lower() == "auto"
    jpeg = resolve_jpeg_device("off" if auto and not local else jpeg_device, emb)
    settings = _settings_fingerprint(files, counts, emb, factory, cols, shard_rows, data)
    if jpeg:  # shards decoded by another decoder are not mixed in
        settings["jpeg_decoder"] = f"torchvision:{jpeg}"
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
                     workers=workers or (min(4, os.cpu_count() or 1) if local else None),
                     extra={"jpeg_device": jpeg} if jpeg else {})
    nshards = spec.nshards
    todo = [k for k in range(nshards) if not shard_paths(partial, k)["done"].is_file()]
    done_rows = (nshards - len(todo)) * shard_rows
    exit_after = os.environ.get(EXIT_AFTER_SHARD_ENV)
    try:
        with stage("shards"), progress_bar(f"index {embedder}", total=total,
                                           unit="rows") as advance:
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
    stats = finalize_shards(partial, staging, nshards, emb, factory, train_sample, limit)
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
        **({"jpeg_decoder": f"torchvision:{jpeg}"} if jpeg else {}),
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
        with stage("calibration"):
            run_calibration(staging, emb, **(calibration_opts or {}))
        manifest = json.loads((staging / MANIFEST_FILE).read_text())
    manifest["build_seconds"] = round(time.time() - t0, 3)
    write_json_atomic(staging / MANIFEST_FILE, manifest)

    publish_dir(staging, out)
    if os.environ.get(KEEP_SHARDS_ENV):  # benchmark hook: the shards stay for a reference
        os.replace(partial, out.with_name(out.name + ".shards"))
    else:
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
