"""Filling a faiss index in pieces, with memory bounded whatever the number of vectors
(issue 20).

The finalisation hands the representatives' vectors over shard by shard (`IndexFiller.add`);
what stays in memory depends on the factory:

- `Flat`: `index.faiss` is written as it comes (faiss' own IndexFlat serialisation: the
  header of an empty index, the vectors appended, then the count patched in), so memory is
  one shard. Opened memory-mapped, as before.
- IVF factories (`IVFn,Flat`, `IVFn,PQm`, `IVFn_HNSWm,...`, behind an optional transform such
  as OPQ or PCA): the trained index (quantizer) is kept once; vectors are added to an empty
  copy of it in blocks of at most `block_bytes` of codes, each block's lists written to a
  file, and the blocks are merged list by list into faiss' on-disk inverted lists
  (`OnDiskInvertedLists`, the layout `faiss.contrib.ondisk.merge_ondisk` produces):
  `index.faiss` then holds the quantizer and `index.ivfdata` the lists, memory-mapped at
  search. The merge reads and writes plain files (faiss' own merge memory-maps every block
  and the output, whose pages then count in the process' memory up to the index's size).
  Peak: the quantizer, one shard and one block. The lists hold the same entries in the same
  order as one index filled in memory, so searches give the same results.
- any other factory (HNSW, PQ without IVF, a refinement) is filled in memory, as before.

Exact vectors (`vectors.npy`, compressed factories) are appended to the file the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from memaudit.common import UserError
from memaudit.engine.memory import format_bytes

IVFDATA_FILE = "index.ivfdata"


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence C-level stdout: faiss' on-disk inverted lists printf on every open and merge
    ("IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename..."), which would corrupt
    `index info --json`."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def read_index(path: Path):
    """Open index.faiss read-only: memory-mapped, or, when its inverted lists are in
    index.ivfdata beside it, with those lists memory-mapped from there (faiss cannot
    memory-map the quantizer of such an index; it is small)."""
    import faiss

    if (path.parent / IVFDATA_FILE).is_file():
        with quiet_stdout():
            return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR
                                    | faiss.IO_FLAG_READ_ONLY)
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)


def fill_mode(index) -> str:
    """"flat", "ivf" or "memory" (module docstring) for an empty, trained-or-not index."""
    import faiss

    top = faiss.downcast_index(index)
    if type(top) in (faiss.IndexFlat, faiss.IndexFlatL2, faiss.IndexFlatIP):
        return "flat"
    inner = top
    if isinstance(top, faiss.IndexPreTransform):
        inner = faiss.downcast_index(top.index)
    if isinstance(inner, faiss.IndexIVF) and not isinstance(inner, faiss.IndexIVFPQR):
        return "ivf"
    return "memory"


def bytes_per_vector(index) -> int:
    """Memory one added vector takes in an in-memory index (codes + id for IVF)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return int(ivf.code_size) + 8
    try:
        return int(index.sa_code_size())
    except RuntimeError:  # no standalone codec (HNSW...): its vectors at least
        return 4 * int(index.d)


def check_memory_fill(index, factory: str, rows: int, limit: int | None) -> None:
    """A factory filled in memory whose vectors alone exceed an explicit limit is refused
    before any work (rows: the input rows, an upper bound on the groups)."""
    if limit is None or fill_mode(index) != "memory":
        return
    need = rows * bytes_per_vector(index)
    if need > limit:
        raise UserError(f"faiss factory {factory!r} is filled in memory: {rows} rows need "
                        f"about {format_bytes(need)}, over --memory-limit "
                        f"{format_bytes(limit)}; use Flat or an IVF factory (filled on disk)")


class _FlatFile:
    """index.faiss of an IndexFlat written incrementally (faiss' serialisation format)."""

    def __init__(self, path: Path, dim: int, metric: int):
        import faiss

        empty = faiss.serialize_index(faiss.IndexFlat(dim, metric)).tobytes()
        # fourcc, d (int32), ntotal (int64) ... then the codes: count (uint64) + floats
        self._head, self._ntotal_at = empty[:-8], 8
        self.dim, self.n = dim, 0
        self._f = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self._f.write(self._head + b"\0" * 8)

    def add(self, x: np.ndarray) -> None:
        self._f.write(np.ascontiguousarray(x, "<f4").tobytes())
        self.n += len(x)

    def finish(self) -> None:
        self._f.seek(self._ntotal_at)
        self._f.write(struct.pack("<q", self.n))
        self._f.seek(len(self._head))
        self._f.write(struct.pack("<Q", self.n * self.dim))
        self._f.close()


class NpyAppender:
    """A float32 [n, dim] .npy file written block by block (never memory-mapped for
    writing, so the pages written do not count in this process' memory)."""

    def __init__(self, path: Path, n: int, dim: int):
        self._f = open(path, "wb")  # noqa: SIM115 - closed in finish()
        np.lib.format.write_array_header_1_0(
            self._f, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
        self.n, self.rows = n, 0

    def add(self, x: np.ndarray) -> None:
        self._f.write(np.ascontiguousarray(x, "<f4").tobytes())
        self.rows += len(x)

    def finish(self) -> None:
        self._f.close()
        if self.rows != self.n:
            raise RuntimeError(f"wrote {self.rows} vectors, expected {self.n}")


class IndexFiller:
    """Adds representatives shard by shard into `staging/index.faiss` (module docstring).
    `index` is the trained, empty index; `work` a scratch folder for the IVF blocks."""

    def __init__(self, index, staging: Path, work: Path, block_bytes: int):
        import faiss

        self.index, self.staging, self.work = index, staging, work
        self.mode = fill_mode(index)
        self.n = 0
        self.blocks: list[tuple[Path, np.ndarray]] = []  # block file, entries per list
        if self.mode == "flat":
            self._flat = _FlatFile(staging / "index.faiss", index.d, index.metric_type)
        elif self.mode == "ivf":
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            self._trained = faiss.serialize_index(index)  # the quantizer, once
            self._per_block = max(1, block_bytes // bytes_per_vector(index))
            self._block = None

    def add(self, x: np.ndarray) -> None:
        if not len(x):
            return
        x = np.ascontiguousarray(x, np.float32)
        if self.mode == "flat":
            self._flat.add(x)
        elif self.mode == "memory":
            self.index.add(x)
        else:
            import faiss

            for a in range(0, len(x), self._per_block):
                part = x[a:a + self._per_block]
                if self._block is None:
                    self._block = faiss.deserialize_index(self._trained)
                ids = np.arange(self.n, self.n + len(part), dtype=np.int64)
                self._block.add_with_ids(part, ids)
                self.n += len(part)
                if self._block.ntotal >= self._per_block:
                    self._flush()
            return
        self.n += len(x)

    def _flush(self) -> None:
        """Write the block's lists to `work/block_K.bin` (list by list: codes then ids) and
        keep their sizes; the block is freed."""
        import faiss

        blk, self._block = self._block, None
        if blk is None or not blk.ntotal:
            return
        il = faiss.extract_index_ivf(blk).invlists
        cs = il.code_size
        sizes = np.zeros(il.nlist, np.int64)
        f = self.work / f"block_{len(self.blocks):05d}.bin"
        with open(f, "wb") as out:
            for lst in range(il.nlist):
                n = il.list_size(lst)
                if n:
                    out.write(faiss.rev_swig_ptr(il.get_codes(lst), n * cs).tobytes())
                    out.write(faiss.rev_swig_ptr(il.get_ids(lst), n).tobytes())
                sizes[lst] = n
        self.blocks.append((f, sizes))

    def finish(self) -> None:
        """Write staging/index.faiss (and index.ivfdata for IVF)."""
        import faiss

        out = self.staging / "index.faiss"
        if self.mode == "flat":
            self._flat.finish()
            return
        if self.mode == "memory":
            faiss.write_index(self.index, str(out))
            return
        self._flush()
        final = faiss.deserialize_index(self._trained)
        ivf = faiss.extract_index_ivf(final)
        nlist, cs = ivf.nlist, ivf.code_size
        sizes = (np.sum([sz for _, sz in self.blocks], axis=0) if self.blocks
                 else np.zeros(nlist, np.int64)).astype(np.int64)
        ntotal = int(sizes.sum())
        if ntotal != self.n:
            raise RuntimeError(f"blocks hold {ntotal} vectors, expected {self.n}")
        data = self.staging / IVFDATA_FILE
        lists = faiss.OnDiskInvertedLists(nlist, cs, str(data))
        with quiet_stdout():  # it announces the resize on stdout
            lists.update_totsize(max(1, ntotal * (cs + 8)))
        sizes_u64 = np.ascontiguousarray(sizes, np.uint64)  # alive while faiss reads it
        lists.set_all_lists_sizes(faiss.swig_ptr(sizes_u64))
        self._merge(data, sizes, cs)
        ivf.replace_invlists(lists, True)
        lists.this.disown()
        final.ntotal = ivf.ntotal = ntotal
        faiss.write_index(final, str(out))
        del final
        shutil.rmtree(self.work)

    def _merge(self, data: Path, sizes: np.ndarray, cs: int) -> None:
        """Each list's entries from every block, in block order, into its place in
        index.ivfdata (codes, then ids: faiss' OnDiskInvertedLists layout). Plain reads and
        writes: nothing is memory-mapped, so this process' memory is one list."""
        starts = [np.concatenate([[0], np.cumsum(sz * (cs + 8))]) for _, sz in self.blocks]
        fds = [os.open(f, os.O_RDONLY) for f, _ in self.blocks]
        out = os.open(data, os.O_WRONLY)
        try:
            pos = 0
            for lst in range(len(sizes)):
                total = int(sizes[lst])
                if not total:
                    continue
                codes, ids = [], []
                for fd, (_, sz), st in zip(fds, self.blocks, starts, strict=True):
                    n = int(sz[lst])
                    if n:
                        buf = os.pread(fd, n * (cs + 8), int(st[lst]))
                        codes.append(buf[:n * cs])
                        ids.append(buf[n * cs:])
                os.pwrite(out, b"".join(codes) + b"".join(ids), pos)
                pos += total * (cs + 8)
        finally:
            for fd in [*fds, out]:
                os.close(fd)
