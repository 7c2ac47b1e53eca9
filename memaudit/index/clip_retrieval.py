"""Import a clip-retrieval output folder as a `TrainingIndex` (DESIGN.md "Training set format").

Layout read (no dependency on clip-retrieval): `img_emb/img_emb_{N}.npy` (float16,
L2-normalised, one row per item) row-aligned with `metadata/metadata_{N}.parquet`
(`image_path`, optional `caption`, `url`, `key`); optionally autofaiss's
`index/image.index` (+ `index/image.json` or `index/infos.json` with `index_key` and
`index_param`). With an existing autofaiss index every item is its own group (its faiss ids
are item ids; "dedup": "none"); otherwise vectors are re-normalised in float32, exact
duplicate embeddings are grouped ("exact-embedding-hash") and a new index is built.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memaudit.common import UserError, package_versions, sha256_file
from memaudit.index.build import ITEM_SCHEMA, make_faiss_index
from memaudit.index.items import GROUPS_FILE, ITEM_ROW_GROUP, MEMBERS_FILE, GroupTable
from memaudit.index.training_index import (
    INDEX_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    publish_dir,
    write_json_atomic,
)


def _parts(src: Path) -> list[tuple[int, Path, Path]]:
    emb_dir, meta_dir = src / "img_emb", src / "metadata"
    if not emb_dir.is_dir() or not meta_dir.is_dir():
        raise UserError(f"{src} is not a clip-retrieval folder (needs img_emb/ and metadata/)")
    parts = []
    for f in emb_dir.glob("img_emb_*.npy"):
        m = re.fullmatch(r"img_emb_(\d+)\.npy", f.name)
        if not m:
            continue
        n = int(m.group(1))
        meta = meta_dir / f"metadata_{m.group(1)}.parquet"
        if not meta.is_file():
            raise UserError(f"{f} has no matching {meta}")
        parts.append((n, f, meta))
    if not parts:
        raise UserError(f"no img_emb/img_emb_N.npy files in {src}")
    return sorted(parts)


def import_clip_retrieval(src: str | Path, out: str | Path, clip_model: str = "ViT-B-32",
                          clip_pretrained: str | None = None, factory: str = "Flat",
                          use_existing_index: bool = True, overwrite: bool = False) -> Path:
    """Turn a clip-retrieval folder into an index directory; returns `out`. `overwrite`
    replaces only a memaudit index, never the source folder or a folder holding it."""
    from memaudit.index.output import check_index_out

    staging = Path(out).with_name(Path(out).name + ".partial")
    check_index_out(Path(out), src, [], overwrite)
    if staging.exists():
        raise UserError(f"{staging} exists (another import?); remove it first")
    try:
        return _import(Path(src), Path(out), staging, clip_model, clip_pretrained, factory,
                       use_existing_index, overwrite)
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging)
        raise


def _import(src: Path, out: Path, staging: Path, clip_model: str, clip_pretrained: str | None,
            factory: str, use_existing_index: bool, overwrite: bool) -> Path:
    import faiss

    parts = _parts(src)
    existing = src / "index" / "image.index"
    reuse = use_existing_index and existing.is_file()
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    content = hashlib.sha256()
    group_of: dict[bytes, int] = {}
    counts: list[int] = []
    groups_per_part: list[np.ndarray] = []
    reps_per_part: list[np.ndarray] = []
    dim = None
    total = 0
    for _, emb_file, meta_file in parts:
        content.update(bytes.fromhex(sha256_file(emb_file)))
        content.update(bytes.fromhex(sha256_file(meta_file)))
        emb = np.load(emb_file, mmap_mode="r")
        if emb.ndim != 2:
            raise UserError(f"{emb_file}: expected a 2-d array, got shape {emb.shape}")
        nmeta = pq.ParquetFile(meta_file).metadata.num_rows
        if nmeta != emb.shape[0]:
            raise UserError(f"{meta_file} has {nmeta} rows but {emb_file} has {emb.shape[0]}")
        if dim is None:
            dim = int(emb.shape[1])
        elif emb.shape[1] != dim:
            raise UserError(f"{emb_file}: dim {emb.shape[1]} != {dim}")
        g = np.empty(emb.shape[0], dtype=np.int64)
        rep = np.zeros(emb.shape[0], dtype=bool)
        if reuse:
            g[:] = np.arange(total, total + emb.shape[0])
            rep[:] = True
            counts.extend([1] * emb.shape[0])
        else:
            for i in range(emb.shape[0]):
                hb = hashlib.blake2b(np.ascontiguousarray(emb[i]).tobytes(),
                                     digest_size=16).digest()
                gid = group_of.get(hb)
                if gid is None:
                    gid = group_of[hb] = len(counts)
                    counts.append(0)
                    rep[i] = True
                counts[gid] += 1
                g[i] = gid
        groups_per_part.append(g)
        reps_per_part.append(rep)
        total += emb.shape[0]
    assert dim is not None
    count_arr = np.asarray(counts, dtype=np.int64)

    faiss_params = None
    if reuse:
        index = faiss.read_index(str(existing))
        if index.ntotal != total or index.d != dim:
            raise UserError(f"{existing} holds {index.ntotal} x {index.d} vectors, the "
                            f"embeddings are {total} x {dim}")
        shutil.copyfile(existing, staging / INDEX_FILE)
        info: dict[str, Any] = {}
        for name in ("image.json", "infos.json"):
            if (src / "index" / name).is_file():
                info = json.loads((src / "index" / name).read_text())
                break
        factory = info.get("index_key", "autofaiss")
        faiss_params = info.get("index_param")
    else:
        index = make_faiss_index(dim, factory, "ip")
        if not index.is_trained:
            first = np.asarray(np.load(parts[0][1], mmap_mode="r")[reps_per_part[0]],
                               dtype=np.float32)
            index.train(_normalise(first))
        for (_, emb_file, _), rep in zip(parts, reps_per_part, strict=True):
            vecs = np.load(emb_file, mmap_mode="r")
            if rep.any():
                index.add(_normalise(np.asarray(vecs[rep], dtype=np.float32)))
        faiss.write_index(index, str(staging / INDEX_FILE))

    writer = None
    row0 = 0
    schema = ITEM_SCHEMA.append(pa.field("url", pa.string()))
    try:
        writer = pq.ParquetWriter(staging / ITEMS_FILE, schema)
        for (n, _, meta_file), g, rep in zip(parts, groups_per_part, reps_per_part, strict=True):
            meta = pq.read_table(meta_file)
            rows = meta.num_rows
            names = meta.column_names

            def col(name: str, rows: int = rows, meta=meta, names=names):
                if name in names:
                    return [None if v is None else str(v) for v in meta.column(name).to_pylist()]
                return [None] * rows

            keys = col("key")
            paths = col("image_path")
            key = [k if k is not None else (p if p is not None else f"{n}:{i}")
                   for i, (k, p) in enumerate(zip(keys, paths, strict=True))]
            caption = [c or "" for c in col("caption")]
            writer.write_table(pa.table({
                "row_id": pa.array(np.arange(row0, row0 + rows, dtype=np.int64)),
                "key": pa.array(key, pa.string()),
                "caption": pa.array(caption, pa.string()),
                "source_file": pa.array([str(meta_file.resolve())] * rows, pa.string()),
                "source_row": pa.array(np.arange(rows, dtype=np.int64)),
                "group_id": pa.array(g),
                "group_count": pa.array(count_arr[g]),
                "is_representative": pa.array(rep),
                "url": pa.array(col("url"), pa.string()),
            }, schema=schema), row_group_size=ITEM_ROW_GROUP)
            row0 += rows
    finally:
        if writer is not None:
            writer.close()
    # the group table beside the items: opening never reads items.parquet whole (issue 20)
    table = GroupTable.from_columns(np.concatenate(groups_per_part),
                                    np.concatenate(reps_per_part), len(counts))
    np.save(staging / GROUPS_FILE, table.table)
    np.save(staging / MEMBERS_FILE, table.members)

    manifest = {
        "format": "memaudit-index",
        "format_version": 1,
        "embedder": {"name": "clip", "config": {"model": clip_model,
                                                "pretrained": clip_pretrained}},
        "preprocessing": f"clip-retrieval:{clip_model}",
        "dim": dim,
        "metric": "ip",
        "factory": factory,
        "faiss_params": faiss_params,
        "dedup": "none" if reuse else "exact-embedding-hash",
        "input_rows": total,
        "rows": row0,
        "groups": len(counts),
        "skipped": {"total": 0, "by_reason": {}, "keys": {}},
        "source": {"clip_retrieval": str(src.resolve()),
                   "parts": [str(p[1].resolve()) for p in parts],
                   "reused_index": str(existing.resolve()) if reuse else None},
        "content_hash": content.hexdigest(),
        "versions": package_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "calibration": None,
    }
    write_json_atomic(staging / MANIFEST_FILE, manifest)
    return publish_dir(staging, out)


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12), dtype=np.float32)
