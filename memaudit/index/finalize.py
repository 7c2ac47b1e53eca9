"""The end of an index build: from the shard files under `DIR.partial/` to the index files
in a staging folder, in memory bounded by a limit (issues 2 and 20).

1. exact-duplicate groups over all shards (`memaudit.index.grouping`: DuckDB, out of core),
   written to `DIR.partial/grouping/` and, as `groups.npy`/`members.npy`, into the index;
2. IVF/PQ training on a deterministic sample (seed 0, up to `train_sample` representatives),
   gathered shard by shard;
3. one pass over the shards: the representatives into the faiss index
   (`memaudit.index.fill`: Flat written as it comes, IVF in blocks merged on disk), the exact
   vectors for compressed factories, and `items.parquet` in row groups of
   `memaudit.index.items.ITEM_ROW_GROUP` rows.

Every step streams shard by shard; `stage_budgets(memory_limit)` sizes DuckDB, the training
sample check and the IVF blocks (docs/scaling.md "Memory of each stage").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memaudit.common import UserError
from memaudit.engine.memory import format_bytes, stage, stage_budgets
from memaudit.index.fill import IndexFiller, NpyAppender
from memaudit.index.grouping import GROUPING_DIR, RowGroups, group_shards
from memaudit.index.items import ITEM_ROW_GROUP, write_group_table
from memaudit.index.shards import shard_paths
from memaudit.index.training_index import ITEMS_FILE, VECTORS_FILE, is_lossy_factory

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
#: columns with min/max statistics in items.parquet's footer (not the long strings)
_STATS_COLUMNS = ["row_id", "source_row", "group_id", "group_count"]


class _ItemsWriter:
    """items.parquet in row groups of ITEM_ROW_GROUP rows whatever the shard size."""

    def __init__(self, path: Path):
        self._w = pq.ParquetWriter(path, ITEM_SCHEMA, write_statistics=_STATS_COLUMNS)
        self._pending: list[pa.Table] = []
        self._rows = 0

    def add(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._rows += table.num_rows
        while self._rows >= ITEM_ROW_GROUP:
            t = pa.concat_tables(self._pending)
            self._w.write_table(t.slice(0, ITEM_ROW_GROUP), row_group_size=ITEM_ROW_GROUP)
            rest = t.slice(ITEM_ROW_GROUP)
            self._pending, self._rows = [rest], rest.num_rows

    def close(self, ok: bool = True) -> None:
        if ok and self._rows:
            self._w.write_table(pa.concat_tables(self._pending), row_group_size=ITEM_ROW_GROUP)
        self._w.close()


def _train(index, partial: Path, nshards: int, rows_file: Path, sizes: list[int],
           ngroups: int, train_sample: int, factory: str, budget: int,
           limit: int | None) -> None:
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(ngroups, size=min(train_sample, ngroups), replace=False))
    need = len(pick) * index.d * 4
    if limit is not None and need > budget:
        raise UserError(f"the IVF training sample ({len(pick)} vectors of dim {index.d}, "
                        f"{format_bytes(need)}) is over its share of --memory-limit "
                        f"{format_bytes(limit)}: lower train_sample")
    parts, seen = [], 0
    rows = RowGroups(rows_file)
    for k in range(nshards):
        rep = rows.take(sizes[k])[2]
        nrep = int(rep.sum())
        sel = pick[(pick >= seen) & (pick < seen + nrep)] - seen
        if len(sel):
            vecs = np.load(shard_paths(partial, k)["emb"], mmap_mode="r")
            idx = np.nonzero(rep)[0][sel]
            parts.append(np.asarray(vecs[idx], dtype=np.float32))
            del vecs
        seen += nrep
    train = np.ascontiguousarray(np.concatenate(parts))
    try:
        index.train(train)
    except RuntimeError as e:
        raise UserError(f"cannot train faiss {factory!r} on {len(train)} vectors: "
                        f"{str(e).strip().splitlines()[-1]}") from e


def finalize_shards(partial: Path, staging: Path, nshards: int, emb, factory: str,
                    train_sample: int, memory_limit: int | None = None) -> dict[str, Any]:
    """Group duplicates, build the faiss index over representatives, write items.parquet
    and the group table into `staging` (module docstring); returns the manifest's counts."""
    from memaudit.index.build import make_faiss_index

    budgets = stage_budgets(memory_limit)
    skipped_by_reason: dict[str, int] = {}
    skipped_keys: dict[str, list[str]] = {}
    content = hashlib.sha256()
    sizes: list[int] = []
    for k in range(nshards):
        info = json.loads(shard_paths(partial, k)["done"].read_text())
        content.update(bytes.fromhex(info["content_digest"]))
        for s in info["skipped"]:
            skipped_by_reason[s["reason"]] = skipped_by_reason.get(s["reason"], 0) + 1
            skipped_keys.setdefault(s["reason"], []).append(s["key"])
        sizes.append(int(info["items"]))

    with stage("grouping"):
        grouped = group_shards([shard_paths(partial, k)["hash"] for k in range(nshards)],
                               partial / GROUPING_DIR, budgets["grouping"])
        if grouped["rows"] != sum(sizes):
            raise RuntimeError(f"grouping saw {grouped['rows']} rows, shards hold "
                               f"{sum(sizes)}")
        ngroups = grouped["groups"]
        files = {k: Path(v) for k, v in grouped["files"].items()}
        write_group_table(files["groups"], files["members"], staging, ngroups)

    index = make_faiss_index(emb.dim, factory, emb.metric)
    if not index.is_trained:
        if ngroups == 0:
            raise UserError("no decodable images: cannot train the faiss index")
        with stage("training"):
            _train(index, partial, nshards, files["rows"], sizes, ngroups, train_sample,
                   factory, budgets["train"], memory_limit)
    with stage("filling"):
        return _fill(partial, staging, nshards, emb, factory, index, files["rows"], sizes,
                     ngroups, budgets["fill_block"], content, skipped_by_reason,
                     skipped_keys)


def _fill(partial: Path, staging: Path, nshards: int, emb, factory: str, index,
          rows_file: Path, sizes: list[int], ngroups: int, block_bytes: int, content,
          skipped_by_reason: dict[str, int], skipped_keys: dict[str, list[str]]
          ) -> dict[str, Any]:
    filler = IndexFiller(index, staging, partial / "fill", block_bytes)
    exact = (NpyAppender(staging / VECTORS_FILE, ngroups, emb.dim)
             if is_lossy_factory(factory) else None)
    writer = _ItemsWriter(staging / ITEMS_FILE)
    rows = RowGroups(rows_file)
    row0, ok = 0, False
    try:
        for k in range(nshards):
            p = shard_paths(partial, k)
            g, count, rep = rows.take(sizes[k])
            if rep.any():
                vecs = np.load(p["emb"], mmap_mode="r")
                reps = np.asarray(vecs[rep], dtype=np.float32)
                del vecs
                filler.add(reps)
                if exact is not None:
                    exact.add(reps)
                del reps
            items = pq.read_table(p["items"])
            n = items.num_rows
            writer.add(pa.table({
                "row_id": pa.array(np.arange(row0, row0 + n, dtype=np.int64)),
                "key": items.column("key"),
                "caption": items.column("caption"),
                "source_file": items.column("source_file"),
                "source_row": items.column("source_row"),
                "group_id": pa.array(g),
                "group_count": pa.array(count),
                "is_representative": pa.array(rep),
            }, schema=ITEM_SCHEMA))
            row0 += n
        ok = True
    finally:
        writer.close(ok)
    if filler.n != ngroups:
        raise RuntimeError(f"added {filler.n} representatives, expected {ngroups}")
    filler.finish()
    if exact is not None:
        exact.finish()
    return {
        "exact_vectors": is_lossy_factory(factory),
        "rows": row0,
        "groups": ngroups,
        "skipped": {"total": sum(skipped_by_reason.values()), "by_reason": skipped_by_reason,
                    "keys": skipped_keys},
        "content_hash": content.hexdigest(),
        "fill": filler.mode,
    }
