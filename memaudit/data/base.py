"""The training-set layout contract: one class per way training images are stored.

Every layout yields the Parquet reader's rows (`TrainingRow`: key, caption, encoded image
bytes, source file and row; docs/index-format.md "Input"). Rows are numbered globally in a
fixed order and live in *units*, the files they are read from and read back by (a Parquet
file, a tar shard, a `metadata.jsonl`, one image file), each with a row count known before
any image is read. A build can therefore start at any global row (resume, shards, Ray) and
skip the units before it without opening them, whatever the layout.

A row a layout cannot use (no caption file, image missing, tar cut inside the sample) comes
with `image_bytes=None` and `skip` set to the reason, so the index build counts it, lists its
key and moves on, as it does for an undecodable image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from memaudit.data.parquet import TrainingRow

#: option names a layout may read (the index build's column and layout options)
OPTION_KEYS = ("image_col", "caption_col", "key_col", "layout", "instance_prompt",
               "class_prompt")


class Layout:
    """One training set in one layout. Subclasses set `name` and implement `detect`,
    `units`, `unit_rows` and `iter_unit` (or `iter_batches`), and `read_images`."""

    name: ClassVar[str] = ""

    def __init__(self, source: str | Path, opts: dict[str, Any] | None = None):
        self.source = str(source)
        self.opts = {k: v for k, v in (opts or {}).items() if v is not None}

    @classmethod
    def detect(cls, path: Path, opts: dict[str, Any]) -> bool:
        """Whether `path` (an existing file or folder) holds this layout."""
        raise NotImplementedError

    def units(self) -> list[Path]:
        """The files rows are read from, in row order (absolute paths)."""
        raise NotImplementedError

    def unit_rows(self, units: list[Path]) -> list[int]:
        """Rows in each unit, without reading images."""
        raise NotImplementedError

    def iter_unit(self, i: int, unit: Path, first: int, stop: int,
                  row0: int) -> Iterator[TrainingRow]:
        """Rows [first, stop) of unit number i (`row0`: global number of its row 0)."""
        raise NotImplementedError

    @staticmethod
    def read_images(unit: Path, rows: list[int]) -> dict[int, bytes]:
        """Encoded image bytes of some rows of one unit (rows without an image left out)."""
        raise NotImplementedError

    def roots(self) -> list[Path]:
        """Folders the rows come from (an index is never written inside one)."""
        p = Path(self.source)
        return [p] if p.is_dir() else []

    def fingerprint(self) -> str | None:
        """Digest of what the rows depend on besides the units' sizes and mtimes (caption
        files, a config); None when nothing else (a resumed build compares it)."""
        return None

    def describe(self) -> dict[str, Any]:
        """What the index manifest records about the layout (`source.layout`...)."""
        return {"layout": self.name}

    def iter_batches(self, batch_rows: int = 256, start_row: int = 0,
                     stop_row: int | None = None, files: list[Path] | None = None,
                     counts: list[int] | None = None) -> Iterator[list[TrainingRow]]:
        """Lists of at most `batch_rows` rows for global rows [start_row, stop_row); units
        wholly before `start_row` are not opened."""
        files = self.units() if files is None else files
        counts = self.unit_rows(files) if counts is None else counts
        batch: list[TrainingRow] = []
        offset = 0
        for i, (unit, n) in enumerate(zip(files, counts, strict=True)):
            if stop_row is not None and offset >= stop_row:
                break
            if offset + n > start_row and n:
                first = max(0, start_row - offset)
                stop = n if stop_row is None else min(n, stop_row - offset)
                for row in self.iter_unit(i, unit, first, stop, offset):
                    batch.append(row)
                    if len(batch) >= batch_rows:
                        yield batch
                        batch = []
            offset += n
        if batch:
            yield batch


def stat_digest(paths: list[Path | None]) -> str:
    """SHA-256 over each path's name, size and mtime (None / missing: a marker)."""
    h = hashlib.sha256()
    for p in paths:
        if p is None:
            h.update(b"-\0")
            continue
        try:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        except OSError:
            h.update(f"{p}\0missing\0".encode())
    return h.hexdigest()
