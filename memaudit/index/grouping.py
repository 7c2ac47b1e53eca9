"""Exact-duplicate grouping of an index build's shards, out of core (issue 20).

Items whose pixel hashes (16 bytes, `DIR.partial/shard_K.hash.npy`) are equal form one group;
groups are numbered in order of first appearance, the first-seen item is the representative
(docs/index-format.md "Duplicates"). `group_shards` does this with DuckDB, whose hash
aggregation, window, join and sort spill to a temporary folder beyond its `memory_limit`, so
the driver's memory is bounded by the limit, not by the number of rows. It writes, beside the
shards (`DIR.partial/grouping/`):

- `rows.parquet`: `row_id, group_id, group_count, is_representative`, one row per kept item,
  in row order (the finalisation streams it shard by shard);
- `groups.parquet`: `group_id, first_row, group_count`, in group order;
- `members.parquet`: `group_id, row_id` of the items of groups with more than one item,
  ordered by group then row.

`group_duplicates` is the in-memory `np.unique` path (kept as the reference the tests hold
the DuckDB path to, and for small in-memory uses).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

GROUPING_DIR = "grouping"
HASH_SCHEMA = pa.schema([("row_id", pa.int64()), ("h1", pa.uint64()), ("h2", pa.uint64())])


def group_duplicates(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact-duplicate groups from per-item digests [n, 16] (uint8), numbered in order of
    first appearance: (group id per item, is-representative (first seen) per item,
    item count per group). In memory (`np.unique`: ~5x the hashes at its peak)."""
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


def _hash_batches(hash_files: list[Path]):
    """(row_id, h1, h2) record batches, one per shard file, row ids continuing across
    files; the 16-byte digest is read as two little-endian uint64 (equal iff equal)."""
    row0 = 0
    for f in hash_files:
        h = np.load(f)
        n = len(h)
        if n:
            words = np.ascontiguousarray(h, np.uint8).view("<u8").reshape(n, 2)
            yield pa.record_batch([pa.array(np.arange(row0, row0 + n, dtype=np.int64)),
                                   pa.array(words[:, 0]), pa.array(words[:, 1])],
                                  schema=HASH_SCHEMA)
        row0 += n


def group_shards(hash_files: list[Path], work: Path, memory_limit: int,
                 threads: int | None = None) -> dict[str, Any]:
    """Group the items of `hash_files` (in order) with DuckDB under `memory_limit` bytes,
    spilling to `work/tmp`; writes rows/groups/members.parquet into `work` (see the module
    docstring) and returns `{"rows": n, "groups": g, "files": {...}}`. A finished grouping
    (its `done.json`) is reused, so a finalisation killed after it does not redo it."""
    import duckdb

    done = work / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    if work.exists():
        shutil.rmtree(work)
    (work / "tmp").mkdir(parents=True)
    threads = max(1, min(threads or os.cpu_count() or 1, 8))
    files = {"rows": work / "rows.parquet", "groups": work / "groups.parquet",
             "members": work / "members.parquet"}
    con = duckdb.connect(str(work / "grouping.duckdb"), config={
        "memory_limit": f"{max(1, memory_limit // 2**20)}MiB",
        "temp_directory": str(work / "tmp"), "threads": threads,
        "preserve_insertion_order": False})
    try:
        con.execute("SET enable_progress_bar = false")
        reader = pa.RecordBatchReader.from_batches(HASH_SCHEMA, _hash_batches(hash_files))
        con.register("hash_stream", reader)
        con.execute("CREATE TABLE h AS SELECT * FROM hash_stream")
        con.unregister("hash_stream")
        con.execute("CREATE TABLE g AS SELECT h1, h2, min(row_id) AS first_row, "
                    "count(*) AS n FROM h GROUP BY h1, h2")
        con.execute("CREATE TABLE gi AS SELECT h1, h2, first_row, n, "
                    "row_number() OVER (ORDER BY first_row) - 1 AS group_id FROM g")
        con.execute("DROP TABLE g")
        con.execute(f"""COPY (SELECT group_id::BIGINT AS group_id, first_row,
                                     n::BIGINT AS group_count
                              FROM gi ORDER BY group_id)
                        TO '{files["groups"]}' (FORMAT parquet)""")
        con.execute(f"""COPY (SELECT h.row_id, gi.group_id::BIGINT AS group_id,
                                     gi.n::BIGINT AS group_count,
                                     h.row_id = gi.first_row AS is_representative
                              FROM h JOIN gi USING (h1, h2) ORDER BY h.row_id)
                        TO '{files["rows"]}' (FORMAT parquet)""")
        con.execute(f"""COPY (SELECT group_id, row_id FROM '{files["rows"]}'
                              WHERE group_count > 1 ORDER BY group_id, row_id)
                        TO '{files["members"]}' (FORMAT parquet)""")
        nrows, ngroups = con.execute("SELECT (SELECT count(*) FROM h), "
                                     "(SELECT count(*) FROM gi)").fetchone()
    finally:
        con.close()
    (work / "grouping.duckdb").unlink(missing_ok=True)
    shutil.rmtree(work / "tmp", ignore_errors=True)
    result = {"rows": int(nrows), "groups": int(ngroups),
              "files": {k: str(v) for k, v in files.items()}}
    tmp = done.with_name("done.json.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, done)
    return result


class RowGroups:
    """Streams `rows.parquet` in consecutive slices: `take(n)` -> (group_id, group_count,
    is_representative) arrays of the next n rows (a shard's items)."""

    def __init__(self, path: Path, batch_rows: int = 65536):
        import pyarrow.parquet as pq

        self._it = pq.ParquetFile(path).iter_batches(
            batch_size=batch_rows, columns=["group_id", "group_count", "is_representative"])
        self._buf: list[np.ndarray] = [np.zeros(0, np.int64), np.zeros(0, np.int64),
                                       np.zeros(0, bool)]

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        while len(self._buf[0]) < n:
            b = next(self._it)
            self._buf = [np.concatenate([self._buf[i], b.column(i).to_numpy(
                zero_copy_only=False)]) for i in range(3)]
        out = tuple(a[:n] for a in self._buf)
        self._buf = [a[n:] for a in self._buf]
        return out[0].astype(np.int64), out[1].astype(np.int64), out[2].astype(bool)
