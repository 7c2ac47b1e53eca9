"""Streaming reader for training sets stored as Parquet (img2dataset / Hugging Face layout).

DESIGN.md "Training set format": one or many Parquet files (a file, a directory or a glob)
with an encoded-image column (`jpg`, `png`, `webp`, `image`, or the Hugging Face `Image`
struct `{bytes, path}`), a caption (`caption` or `text`) and a `key` (else
`"{file_stem}:{row}"`). Rows are streamed with pyarrow `iter_batches`; the whole set is
never held in memory.
"""

from __future__ import annotations

import glob as _glob
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from memaudit.common import UserError

IMAGE_COLUMNS = ("jpg", "png", "webp", "image")
CAPTION_COLUMNS = ("caption", "text")
KEY_COLUMNS = ("key",)

#: images with more pixels than this are skipped as "too_large" (decompression bombs)
MAX_IMAGE_PIXELS = 64_000_000


@dataclass
class TrainingRow:
    """One training item as read from Parquet (image still encoded)."""

    key: str
    caption: str
    image_bytes: bytes | None
    source_file: str
    source_row: int  # row number inside source_file
    row: int  # global row number across all files of the source (in file order)
    skip: str | None = None  # other layouts: why the row is unusable (image_bytes is None)


@dataclass(frozen=True)
class Columns:
    image: str
    image_is_struct: bool
    caption: str | None
    key: str | None


def resolve_sources(source: str | Path) -> list[Path]:
    """Parquet files of a file, directory (recursive, sorted) or glob pattern."""
    text = str(source)
    p = Path(text)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(f) for f in _glob.glob(text, recursive=True) if f.endswith(".parquet"))
        if not files:
            raise UserError(f"no Parquet files match {text!r}")
        return files
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
        if not files:
            raise UserError(f"no Parquet files under directory {text}")
        return files
    if p.is_file():
        return [p]
    raise UserError(f"training set not found: {text}")


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"cannot read Parquet file {path}: {str(e).splitlines()[0]}") from e


def detect_columns(schema: pa.Schema, path: Path | str, image_col: str | None = None,
                   caption_col: str | None = None, key_col: str | None = None) -> Columns:
    """Pick the image / caption / key columns (explicit names win; else the conventions)."""
    names = list(schema.names)

    def pick(explicit: str | None, candidates: tuple[str, ...], what: str,
             required: bool) -> str | None:
        if explicit:
            if explicit not in names:
                raise UserError(f"{path}: no {what} column {explicit!r} (columns: "
                                f"{', '.join(names)})")
            return explicit
        for c in candidates:
            if c in names:
                return c
        if required:
            raise UserError(f"{path}: no {what} column (looked for {', '.join(candidates)}; "
                            f"columns: {', '.join(names)}); use --{what}-col")
        return None

    image = pick(image_col, IMAGE_COLUMNS, "image", True)
    assert image is not None
    t = schema.field(image).type
    is_struct = pa.types.is_struct(t)
    if is_struct:
        if "bytes" not in [t.field(i).name for i in range(t.num_fields)]:
            raise UserError(f"{path}: image column {image!r} is a struct without a 'bytes' field")
    elif not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        raise UserError(f"{path}: image column {image!r} has type {t}, expected encoded bytes")
    caption = pick(caption_col, CAPTION_COLUMNS, "caption", False)
    key = pick(key_col, KEY_COLUMNS, "key", False)
    return Columns(image, is_struct, caption, key)


def file_row_counts(files: list[Path]) -> list[int]:
    """Row count of each file from the Parquet footers (no data read)."""
    return [_open(f).metadata.num_rows for f in files]


def count_rows(source: str | Path) -> int:
    return sum(file_row_counts(resolve_sources(source)))


def iter_training_batches(source: str | Path, image_col: str | None = None,
                          caption_col: str | None = None, key_col: str | None = None,
                          batch_rows: int = 256, start_row: int = 0,
                          stop_row: int | None = None, files: list[Path] | None = None,
                          counts: list[int] | None = None) -> Iterator[list[TrainingRow]]:
    """Stream lists of `TrainingRow` (at most `batch_rows` each) for global rows
    [start_row, stop_row). Files and row groups wholly before `start_row` are not read.
    `files` (and their row `counts`) given: `source` is not listed again, and files before
    `start_row` are not even opened (one shard of a build over many files)."""
    files = resolve_sources(source) if files is None else files
    offset = 0  # global row number of the first row of the current file
    for i, path in enumerate(files):
        if counts is not None and offset + counts[i] <= start_row:
            offset += counts[i]
            continue
        pf = _open(path)
        n = pf.metadata.num_rows
        if stop_row is not None and offset >= stop_row:
            return
        if offset + n <= start_row:
            offset += n
            continue
        cols = detect_columns(pf.schema_arrow, path, image_col, caption_col, key_col)
        wanted = [c for c in (cols.image, cols.caption, cols.key) if c]
        # skip whole row groups before start_row
        groups, rg_offset, first_row = [], 0, None
        for i in range(pf.metadata.num_row_groups):
            rg_n = pf.metadata.row_group(i).num_rows
            if offset + rg_offset + rg_n > start_row:
                if first_row is None:
                    first_row = rg_offset
                groups.append(i)
            rg_offset += rg_n
        row_in_file = first_row or 0
        stem = path.stem
        try:
            batches = pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=wanted)
            for rb in batches:
                images = rb.column(cols.image)
                if cols.image_is_struct:
                    images = images.field("bytes")
                img_list = images.to_pylist()
                cap_list = (rb.column(cols.caption).to_pylist() if cols.caption
                            else [None] * rb.num_rows)
                key_list = (rb.column(cols.key).to_pylist() if cols.key
                            else [None] * rb.num_rows)
                out = []
                for j in range(rb.num_rows):
                    r = row_in_file + j
                    g = offset + r
                    if g < start_row:
                        continue
                    if stop_row is not None and g >= stop_row:
                        break
                    k = key_list[j]
                    out.append(TrainingRow(
                        key=str(k) if k is not None else f"{stem}:{r}",
                        caption="" if cap_list[j] is None else str(cap_list[j]),
                        image_bytes=img_list[j],
                        source_file=str(path),
                        source_row=r,
                        row=g,
                    ))
                row_in_file += rb.num_rows
                if out:
                    yield out
                if stop_row is not None and offset + row_in_file >= stop_row:
                    return
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"cannot read Parquet file {path}: {str(e).splitlines()[0]}") from e
        offset += n


def iter_training_rows(source: str | Path, image_col: str | None = None,
                       caption_col: str | None = None, key_col: str | None = None,
                       batch_rows: int = 256) -> Iterator[TrainingRow]:
    """Stream every training row (key, caption, encoded image bytes, source file and row),
    reading `batch_rows` rows at a time with pyarrow. Missing column or unreadable file ->
    `UserError`."""
    for batch in iter_training_batches(source, image_col, caption_col, key_col, batch_rows):
        yield from batch


def decode_image(data: bytes | None, max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode encoded image bytes to an RGB PIL image.

    Returns `(image, None)` or `(None, reason)` with reason one of "empty", "too_large",
    "undecodable". Never raises on bad data.
    """
    from PIL import Image

    if not data:
        return None, "empty"
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w <= 0 or h <= 0:
                return None, "empty"
            if w * h > max_pixels:
                return None, "too_large"
            im.load()
            rgb = im.convert("RGB")
    except Image.DecompressionBombError:
        return None, "too_large"
    except Exception:  # PIL raises many types on corrupt data
        return None, "undecodable"
    return rgb, None


def image_size(data: bytes | None) -> tuple[int, int] | None:
    """(width, height) from the image header only, or None when unreadable."""
    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:
        return None


def read_image_rows(path: str | Path, rows, image_col: str | None = None) -> dict[int, bytes]:
    """Encoded image bytes of the given row numbers of one Parquet file (reading only the row
    groups that hold them, only the image column); rows with no bytes are left out."""
    path = Path(path)
    pf = _open(path)
    cols = detect_columns(pf.schema_arrow, path, image_col=image_col)
    wanted = sorted({int(r) for r in rows})
    out: dict[int, bytes] = {}
    start, i = 0, 0
    try:
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            mine = []
            while i < len(wanted) and wanted[i] < start + n:
                if wanted[i] >= start:
                    mine.append(wanted[i])
                i += 1
            if mine:
                col = pf.read_row_group(g, columns=[cols.image]).column(0)
                if cols.image_is_struct:
                    col = col.combine_chunks().field("bytes")
                for r in mine:
                    v = col[r - start].as_py()
                    if v:
                        out[r] = v
            start += n
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"cannot read Parquet file {path}: {str(e).splitlines()[0]}") from e
    return out
