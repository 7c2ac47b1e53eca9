"""Hugging Face `imagefolder` sets: images plus `metadata.jsonl` or `metadata.csv`.

Each metadata row has `file_name` (the image path relative to the metadata file's folder)
and a caption column: `--caption-col` (alias `--caption-column`), default `text` as
diffusers' training scripts use, else `caption` when the first row has it, else no caption
(""). Rows are read in metadata order; the key is `file_name`. A list-valued caption (several
captions per image) keeps all of them in one row, joined by a newline: the image counts once,
as the training scripts draw one of its captions per epoch. An image the metadata names that
is missing is skipped as `missing_file`; a `file_name` outside the folder as `bad_path`. The
metadata file is the unit rows are read back by (source_file, source_row = metadata row).
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memaudit.common import UserError
from memaudit.data.base import Layout, stat_digest
from memaudit.data.parquet import TrainingRow

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
CAPTION_DEFAULTS = ("text", "caption")


def metadata_file(path: Path) -> Path | None:
    """The metadata file of a folder (or the file itself)."""
    if path.is_file():
        return path if path.name in METADATA_NAMES else None
    found = [path / n for n in METADATA_NAMES if (path / n).is_file()]
    if len(found) > 1:
        raise UserError(f"{path}: both metadata.jsonl and metadata.csv; keep one")
    return found[0] if found else None


def read_metadata(path: Path) -> list[dict[str, Any]]:
    """The rows of a metadata.jsonl / metadata.csv (bad JSON, no file_name: one line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    if path.suffix == ".csv":
        rows: list[dict[str, Any]] = list(csv.DictReader(text.splitlines()))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {n}: not a JSON object")
            rows.append(row)
    for n, row in enumerate(rows):
        if not isinstance(row.get("file_name"), str) or not row["file_name"]:
            raise UserError(f"{path}: row {n} has no file_name")
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


@functools.lru_cache(maxsize=4)
def _cached_metadata(path: str, mtime_ns: int, size: int) -> list[dict[str, Any]]:
    return read_metadata(Path(path))


def _caption(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n".join(str(v) for v in value if v is not None)
    return str(value)


def _image(root: Path, file_name: str) -> tuple[Path | None, str | None]:
    """The image a file_name names; an absolute name or one climbing out with `..` is
    refused (symlinks inside the folder are followed: the Hugging Face cache uses them)."""
    norm = os.path.normpath(file_name)
    if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
        return None, "bad_path"
    return root / norm, None


class ImageFolderLayout(Layout):
    name = "imagefolder"

    def __init__(self, source: str | Path, opts: dict[str, Any] | None = None):
        super().__init__(source, opts)
        meta = metadata_file(Path(self.source))
        if meta is None:
            raise UserError(f"{self.source}: no metadata.jsonl or metadata.csv")
        self.metadata = meta.resolve()
        self.root = self.metadata.parent
        self._rows: list[dict[str, Any]] | None = None

    @classmethod
    def detect(cls, path: Path, opts: dict[str, Any]) -> bool:
        return metadata_file(path) is not None

    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = read_metadata(self.metadata)
        return self._rows

    def caption_column(self) -> str | None:
        first = self.rows()[0]
        col = self.opts.get("caption_col")
        if col:
            if col not in first:
                raise UserError(f"{self.metadata}: no caption column {col!r} (columns: "
                                f"{', '.join(first)})")
            return col
        return next((c for c in CAPTION_DEFAULTS if c in first), None)

    def units(self) -> list[Path]:
        return [self.metadata]

    def unit_rows(self, units: list[Path]) -> list[int]:
        return [len(self.rows())]

    def iter_unit(self, i: int, unit: Path, first: int, stop: int,
                  row0: int) -> Iterator[TrainingRow]:
        rows, col = self.rows(), self.caption_column()
        for r in range(first, stop):
            fn = rows[r]["file_name"]
            path, reason = _image(self.root, fn)
            data = None
            if path is not None:
                try:
                    data = path.read_bytes()
                except OSError:
                    reason = "missing_file"
            yield TrainingRow(key=fn, caption=_caption(rows[r].get(col) if col else None),
                              image_bytes=data, source_file=str(unit), source_row=r,
                              row=row0 + r, skip=reason)

    @staticmethod
    def read_images(unit: Path, rows: list[int]) -> dict[int, bytes]:
        st = Path(unit).stat()  # the report reads items one by one: parse each file once
        meta = _cached_metadata(str(unit), st.st_mtime_ns, st.st_size)
        root = Path(unit).resolve().parent
        out = {}
        for r in rows:
            if not 0 <= int(r) < len(meta):
                continue
            path, _ = _image(root, meta[int(r)]["file_name"])
            try:
                data = path.read_bytes() if path is not None else None
            except OSError:
                data = None
            if data:
                out[int(r)] = data
        return out

    def roots(self) -> list[Path]:
        return [self.root]

    def fingerprint(self) -> str | None:
        return stat_digest([_image(self.root, r["file_name"])[0] for r in self.rows()])
