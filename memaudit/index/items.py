"""Item metadata by row id, never loaded whole (issue 20).

`ItemReader` reads rows of `items.parquet` by row id: it finds each row's row group from the
Parquet footer and reads only those row groups (only the columns asked for), keeping the
last few in a small cache. `GroupTable` answers per-group questions (representative row,
item count, the rows of a duplicate group) from two memory-mapped arrays written beside the
index, `groups.npy` (int64 [groups, 3]: representative row, count, start in members.npy or
-1) and `members.npy` (int64: the rows of every group with more than one item, by group then
row). An audit actor, `TrainingIndex` and the report thus touch only the rows and groups a
query returns; what they hold in memory does not grow with the training set
(docs/index-format.md "Directory layout", docs/scaling.md).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memaudit.common import UserError

GROUPS_FILE = "groups.npy"
MEMBERS_FILE = "members.npy"
#: rows per row group of items.parquet (a lookup reads one row group of the asked columns)
ITEM_ROW_GROUP = 65536


class ItemReader:
    """Rows of an items table by row id (row id == position). Over a Parquet file it reads
    only the row groups holding the asked rows; over an in-memory `pa.Table` it takes."""

    def __init__(self, source: Path | pa.Table, cache_groups: int = 4):
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, pa.Table] = OrderedDict()
        self.cache_groups = max(1, int(cache_groups))
        if isinstance(source, pa.Table):
            self.table: pa.Table | None = source
            self.path = None
            self.num_rows = source.num_rows
            self.column_names = list(source.column_names)
            self.schema = source.schema
            return
        self.table = None
        self.path = Path(source)
        try:
            self._pf = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"cannot read {self.path}: {str(e).splitlines()[0]}") from e
        md = self._pf.metadata
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        self._starts = np.cumsum([0, *sizes]).astype(np.int64)
        self.num_rows = int(self._starts[-1])
        self.column_names = list(self._pf.schema_arrow.names)
        self.schema = self._pf.schema_arrow

    def _group(self, g: int, columns: tuple[str, ...]) -> pa.Table:
        key = (g, columns)
        with self._lock:
            t = self._cache.get(key)
            if t is not None:
                self._cache.move_to_end(key)
                return t
        try:
            t = self._pf.read_row_group(g, columns=list(columns))
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"cannot read {self.path}: {str(e).splitlines()[0]}") from e
        with self._lock:
            self._cache[key] = t
            while len(self._cache) > self.cache_groups:
                self._cache.popitem(last=False)
        return t

    def take(self, rows: Sequence[int] | np.ndarray,
             columns: Sequence[str] | None = None) -> pa.Table:
        """The rows (in the order given, repeats allowed) as a table of `columns` (all by
        default). Row ids outside [0, num_rows) raise IndexError."""
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        cols = tuple(columns) if columns is not None else tuple(self.column_names)
        missing = [c for c in cols if c not in self.column_names]
        if missing:
            raise KeyError(f"items have no column(s) {', '.join(missing)}")
        if len(r) and (r.min() < 0 or r.max() >= self.num_rows):
            bad = int(r[(r < 0) | (r >= self.num_rows)][0])
            raise IndexError(f"row id {bad} out of range [0, {self.num_rows})")
        if self.table is not None:
            return self.table.select(list(cols)).take(pa.array(r))
        if not len(r):
            return self._pf.schema_arrow.empty_table().select(list(cols))
        which = np.searchsorted(self._starts, r, side="right") - 1
        parts, where = [], np.empty(len(r), np.int64)
        offset = 0
        for g in np.unique(which):
            sel = np.nonzero(which == g)[0]
            t = self._group(int(g), cols).take(pa.array(r[sel] - self._starts[g]))
            parts.append(t)
            where[sel] = offset + np.arange(len(sel))
            offset += len(sel)
        return pa.concat_tables(parts).take(pa.array(where))

    def row_groups(self, columns: Sequence[str]) -> Iterator[tuple[int, pa.Table]]:
        """(first row id, table of `columns`) of each row group in order, not cached: a pass
        over the whole list holds one row group at a time (an in-memory table: slices of
        ITEM_ROW_GROUP rows)."""
        cols = list(columns)
        if self.table is not None:
            for a in range(0, self.num_rows, ITEM_ROW_GROUP):
                yield a, self.table.select(cols).slice(a, ITEM_ROW_GROUP)
            return
        for g in range(len(self._starts) - 1):
            try:
                t = self._pf.read_row_group(g, columns=cols)
            except (pa.ArrowException, OSError) as e:
                raise UserError(f"cannot read {self.path}: {str(e).splitlines()[0]}") from e
            yield int(self._starts[g]), t

    def rows_of_keys(self, keys: Sequence[str]) -> np.ndarray:
        """Row id of the first row holding each key (-1 where none does), by a pass over the
        `key` column one row group at a time that stops once every key is found: memory is
        one row group, whatever the number of rows."""
        import pyarrow.compute as pc

        want = pa.array(list(keys), pa.string())
        out = np.full(len(want), -1, np.int64)
        if not len(want):
            return out
        todo = np.arange(len(want))
        for start, t in self.row_groups(["key"]):
            pos = pc.index_in(want.take(pa.array(todo)), value_set=t.column(0))
            pos = np.asarray(pos.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
            hit = pos >= 0
            out[todo[hit]] = start + pos[hit]
            todo = todo[~hit]
            if not len(todo):
                break
        return out

    def read_all(self) -> pa.Table:
        """The whole table (small indexes, tools and tests only: it grows with the rows)."""
        if self.table is not None:
            return self.table
        try:
            return pq.read_table(self.path, read_dictionary=["source_file"])
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"cannot read {self.path}: {str(e).splitlines()[0]}") from e


class GroupTable:
    """Per-group lookups: representative row, item count, member rows (module docstring).
    Memory-mapped from groups.npy/members.npy, or computed in memory from the items'
    `group_id` and `is_representative` columns for an index without them (builds and
    clip-retrieval imports from before issue 20)."""

    def __init__(self, table: np.ndarray, members: np.ndarray):
        self.table = table  # [ngroups, 3] int64: rep row, count, member start (-1)
        self.members = members

    @property
    def ngroups(self) -> int:
        return int(self.table.shape[0])

    @classmethod
    def open(cls, directory: Path, ngroups: int, nitems: int) -> GroupTable:
        f, m = directory / GROUPS_FILE, directory / MEMBERS_FILE
        try:
            table = np.load(f, mmap_mode="r", allow_pickle=False)
            members = np.load(m, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {f} / {m}: {str(e).splitlines()[0]}") from e
        if (table.dtype != np.int64 or table.shape != (ngroups, 3)
                or members.dtype != np.int64 or members.ndim != 1
                or len(members) > nitems):
            raise UserError(f"{f} holds {table.dtype} {table.shape}, expected int64 "
                            f"({ngroups}, 3) (or {m} is not int64 rows)")
        return cls(table, members)

    @classmethod
    def from_columns(cls, group_of_row: np.ndarray, is_rep: np.ndarray,
                     ngroups: int) -> GroupTable:
        g = np.asarray(group_of_row, np.int64)
        table = np.full((ngroups, 3), -1, np.int64)
        rep_rows = np.nonzero(np.asarray(is_rep, bool))[0]
        table[g[rep_rows], 0] = rep_rows
        table[:, 1] = np.bincount(g, minlength=ngroups)[:ngroups]
        dup = table[:, 1] > 1
        order = np.argsort(g, kind="stable")
        members = order[dup[g[order]]]
        starts = np.cumsum(np.where(dup, table[:, 1], 0)) - table[:, 1]
        table[dup, 2] = starts[dup]
        return cls(table, members.astype(np.int64))

    def rep_rows(self, group_ids: np.ndarray) -> np.ndarray:
        return self._col(group_ids, 0, -1)

    def counts(self, group_ids: np.ndarray) -> np.ndarray:
        return self._col(group_ids, 1, 0)

    def _col(self, group_ids, col: int, missing: int) -> np.ndarray:
        g = np.asarray(group_ids, dtype=np.int64)
        out = np.full(g.shape, missing, dtype=np.int64)
        ok = g >= 0
        if ok.any():
            flat = g[ok]
            uniq, inv = np.unique(flat, return_inverse=True)  # sorted reads from the map
            out[ok] = np.asarray(self.table[uniq, col])[inv.reshape(-1)]
        return out

    def rows_of(self, group_id: int) -> np.ndarray:
        """Row ids of every item of a group, in row order."""
        rep, count, start = (int(x) for x in self.table[int(group_id)])
        if count <= 1:
            return np.asarray([rep], np.int64)
        return np.array(self.members[start:start + count], np.int64)  # not the map itself


def _npy_header(f, shape: tuple[int, ...]) -> None:
    np.lib.format.write_array_header_1_0(
        f, {"descr": "<i8", "fortran_order": False, "shape": shape})


def write_group_table(groups_parquet: Path, members_parquet: Path, out: Path,
                      ngroups: int, batch_rows: int = 1 << 20) -> None:
    """groups.npy and members.npy from the grouping's Parquet files (memaudit.index.grouping),
    streamed in batches: memory is one batch, whatever the number of groups."""
    nmembers = pq.ParquetFile(members_parquet).metadata.num_rows
    with open(out / GROUPS_FILE, "wb") as f:
        _npy_header(f, (ngroups, 3))
        start = 0
        for b in pq.ParquetFile(groups_parquet).iter_batches(
                batch_size=batch_rows, columns=["first_row", "group_count"]):
            first = b.column(0).to_numpy().astype(np.int64)
            count = b.column(1).to_numpy().astype(np.int64)
            dup = count > 1
            starts = start + np.cumsum(np.where(dup, count, 0)) - count
            start += int(count[dup].sum())
            f.write(np.stack([first, count, np.where(dup, starts, -1)], 1)
                    .astype("<i8").tobytes())
    with open(out / MEMBERS_FILE, "wb") as f:
        _npy_header(f, (nmembers,))
        for b in pq.ParquetFile(members_parquet).iter_batches(batch_size=batch_rows,
                                                               columns=["row_id"]):
            f.write(b.column(0).to_numpy().astype("<i8").tobytes())
