"""Training sets in every layout they come in: the registry and the readers everyone uses.

`open_training_set(source, **opts)` picks the layout from what the path holds (or `layout=`)
and returns a `memaudit.data.base.Layout`; `iter_training_batches`, `iter_training_rows`,
`resolve_sources` and `read_image_rows` are the layout-independent readers the index build,
`canary train`, the audit, the report and the quality sample call. Adding a layout is a file
in memaudit/data/ and one registry line below. docs/index-format.md "Input" gives the rules.

Detection, first match wins: a `.toml` file with `[[datasets]]` (kohya-ss); a folder with an
`instance_prompt` option (DreamBooth); a folder (or file) with `metadata.jsonl` /
`metadata.csv` (Hugging Face imagefolder); a `.tar` file, a folder with `*.tar` below, a glob
of tars (webdataset); a `.parquet` file, a glob, a folder whose Parquet files have an image
column (Parquet); a folder with image files (image folder with sidecar captions). A folder
whose Parquet files have no image column and no images, and any other file, are read as
Parquet (its reader's error names what is wrong).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from memaudit.common import UserError
from memaudit.data import parquet
from memaudit.data.base import OPTION_KEYS, Layout
from memaudit.data.dreambooth import DreamBoothLayout
from memaudit.data.folder import FolderLayout
from memaudit.data.imagefolder import METADATA_NAMES, ImageFolderLayout
from memaudit.data.images import ImageFilesLayout, is_image
from memaudit.data.kohya import KohyaLayout
from memaudit.data.parquet import TrainingRow
from memaudit.data.webdataset import WebDatasetLayout


class ParquetLayout(Layout):
    """Parquet files (memaudit.data.parquet; img2dataset's and Hugging Face's layout)."""

    name = "parquet"

    @classmethod
    def detect(cls, path: Path, opts: dict[str, Any]) -> bool:
        if path.is_file():
            return path.suffix == ".parquet"
        files = sorted(path.rglob("*.parquet"))
        if not files:
            return False
        if opts.get("image_col"):
            return True
        try:
            names = pq.read_schema(files[0]).names
        except Exception:  # noqa: BLE001 - unreadable: the Parquet reader names the error
            return True
        return any(c in names for c in parquet.IMAGE_COLUMNS)

    def units(self) -> list[Path]:
        return parquet.resolve_sources(self.source)

    def unit_rows(self, units: list[Path]) -> list[int]:
        return parquet.file_row_counts(units)

    def iter_batches(self, batch_rows: int = 256, start_row: int = 0,
                     stop_row: int | None = None, files: list[Path] | None = None,
                     counts: list[int] | None = None) -> Iterator[list[TrainingRow]]:
        o = self.opts
        return parquet.iter_training_batches(
            self.source, o.get("image_col"), o.get("caption_col"), o.get("key_col"),
            batch_rows=batch_rows, start_row=start_row, stop_row=stop_row, files=files,
            counts=counts)

    @staticmethod
    def read_images(unit: Path, rows: list[int], image_col: str | None = None):
        return parquet.read_image_rows(unit, rows, image_col)


#: every layout, in detection order (the first whose `detect` accepts the path is used)
LAYOUTS: dict[str, type[Layout]] = {
    "kohya": KohyaLayout,
    "dreambooth": DreamBoothLayout,
    "imagefolder": ImageFolderLayout,
    "webdataset": WebDatasetLayout,
    "parquet": ParquetLayout,
    "folder": FolderLayout,
}


def layout_options(opts: dict[str, Any] | None) -> dict[str, Any]:
    """The layout options among build options (None values dropped)."""
    return {k: v for k, v in (opts or {}).items() if k in OPTION_KEYS and v is not None}


def detect_layout(source: str | Path, opts: dict[str, Any] | None = None) -> type[Layout]:
    """The layout class for `source` (see the module docstring)."""
    opts = layout_options(opts)
    name = opts.get("layout")
    if name:
        if name not in LAYOUTS:
            raise UserError(f"unknown training-set layout {name!r}; known: "
                            f"{', '.join(LAYOUTS)}")
        return LAYOUTS[name]
    text = str(source)
    if any(ch in text for ch in "*?["):
        return WebDatasetLayout if text.endswith(".tar") else ParquetLayout
    p = Path(text)
    if not p.exists():
        raise UserError(f"training set not found: {text}")
    for cls in LAYOUTS.values():
        if cls.detect(p, opts):
            return cls
    if p.is_file() or any(p.rglob("*.parquet")):
        return ParquetLayout  # its reader names what is wrong (columns, not Parquet)
    raise UserError(f"no training data found in {text} (looked for Parquet files, tar "
                    "shards, metadata.jsonl / metadata.csv, image files)")


def open_training_set(source: str | Path, **opts: Any) -> Layout:
    """The training set at `source` in its layout; `opts`: image_col, caption_col, key_col,
    layout, instance_prompt, class_prompt (others are ignored)."""
    opts = layout_options(opts)
    return detect_layout(source, opts)(source, opts)


def resolve_sources(source: str | Path, **opts: Any) -> list[Path]:
    """The files a training set's rows are read from (its units)."""
    return open_training_set(source, **opts).units()


def iter_training_batches(source: str | Path, image_col: str | None = None,
                          caption_col: str | None = None, key_col: str | None = None,
                          batch_rows: int = 256, start_row: int = 0,
                          stop_row: int | None = None, files: list[Path] | None = None,
                          counts: list[int] | None = None,
                          **opts: Any) -> Iterator[list[TrainingRow]]:
    """`memaudit.data.parquet.iter_training_batches` for any layout (same arguments, plus
    the layout options)."""
    ts = open_training_set(source, image_col=image_col, caption_col=caption_col,
                           key_col=key_col, **opts)
    return ts.iter_batches(batch_rows, start_row, stop_row, files, counts)


def iter_training_rows(source: str | Path, batch_rows: int = 256,
                       **opts: Any) -> Iterator[TrainingRow]:
    """Every training row of any layout, in order."""
    for batch in iter_training_batches(source, batch_rows=batch_rows, **opts):
        yield from batch


def read_image_rows(path: str | Path, rows, image_col: str | None = None) -> dict[int, bytes]:
    """Encoded image bytes of some rows of one unit (an index item's source_file and
    source_row), whatever its layout: chosen by the file itself."""
    path = Path(path)
    rows = [int(r) for r in rows]
    if path.suffix == ".parquet":
        return ParquetLayout.read_images(path, rows, image_col)
    if path.suffix == ".tar":
        return WebDatasetLayout.read_images(path, rows)
    if path.name in METADATA_NAMES:
        return ImageFolderLayout.read_images(path, rows)
    if is_image(path):
        return ImageFilesLayout.read_images(path, rows)
    raise UserError(f"{path}: not a training-set file memaudit reads")
