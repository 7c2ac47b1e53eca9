"""The report's images: generated image files and training images (re-read from the training
Parquet through the index's items.parquet source_file/source_row), inlined as PNG data URIs.

A database or index may come from someone else, so only generated images under the
database's own folder and training images from the Parquet files the index recorded as its
sources are read; what was refused is counted for the provenance section.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

from memaudit.common import UserError


def png_data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


#: Pixels an inlined image is brought to: twice the size it is shown at (cards 128 CSS px,
#: per-prompt thumbnails 48), so it stays sharp on dense screens and in the PDF.
CARD_PX, THUMB_PX = 256, 96


def image_file_uri(path: Path, root: Path | None = None, px: int = CARD_PX,
                   shrink: bool = False) -> str | None:
    """A generated image file as a PNG data URI (re-encoded, so any format is fine); None
    when missing or, with `root`, when its real path is not under `root`. Sizes: `_to_png_uri`.
    """
    from memaudit.paths import real

    if root is not None and not real(path).is_relative_to(real(root)):
        return None
    if not path.is_file():
        return None
    return _to_png_uri(path.read_bytes(), px=px, shrink=shrink)


def _to_png_uri(data: bytes, px: int = CARD_PX, shrink: bool = False) -> str | None:
    """PNG data URI of an encoded image. An image smaller than `px` is enlarged by a whole
    factor with nearest-neighbour sampling (a 16x16 canary image becomes 256x256 blocks of
    its pixels): CSS `image-rendering: pixelated` does that in a browser, but chromium's PDF
    keeps the 16x16 image and leaves the scaling, often smoothed, to the PDF viewer. With
    `shrink`, a larger image is reduced to fit `px` and sent as JPEG (a thumbnail: the card
    beside the training image keeps the lossless original)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGB")
            k = px // max(im.size)
            if k >= 2:
                im = im.resize((im.width * k, im.height * k), Image.NEAREST)
            elif shrink and max(im.size) > px:
                im = im.convert("RGB")
                im.thumbnail((px, px), Image.LANCZOS)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
                return png_data_uri(buf.getvalue(), mime="image/jpeg")
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except Exception:  # noqa: BLE001 - an undecodable image is shown as unavailable
        return None
    return png_data_uri(buf.getvalue())


def training_image_bytes(source_file: str | Path, source_row: int,
                         image_col: str | None = None) -> bytes | None:
    """The encoded image of one training row, read back from its file in any layout (a
    Parquet row group, a tar sample, an image file: memaudit.data.training_set)."""
    from memaudit.data.training_set import read_image_rows

    path = Path(source_file)
    if not path.exists():
        return None
    return read_image_rows(path, [int(source_row)], image_col).get(int(source_row))


def source_files(sources: list[str | Path] | None) -> list[Path]:
    """The files of the training sources the user names (files, folders, globs; any layout
    of memaudit.data.training_set)."""
    from memaudit.data.training_set import resolve_sources

    out: list[Path] = []
    for src in sources or []:
        if not any(ch in str(src) for ch in "*?[") and not Path(src).exists():
            raise UserError(f"--source {src} not found")
        out += resolve_sources(src)
    return out


def _paths(paths: list[str]) -> str:
    """A few recorded source paths by name; many (an image folder: one per image) by the
    folder that holds them all, the folder to name with --source."""
    if len(paths) <= 3:
        return ", ".join(paths)
    try:
        return f"{len(paths)} files under {os.path.commonpath(paths)}"
    except ValueError:  # relative and absolute paths mixed (a crafted manifest)
        return f"{', '.join(paths[:3])} and {len(paths) - 3} more"


class _TrainingImages:
    """Neighbour row id -> PNG data URI, through the run's index (None when unavailable).

    Trust (docs/report.md "Trust model"): the index is the one the user names, else the path
    the database records, and `mismatch` says when its content hash is not the one the run
    recorded. Training images are read only from training files inside the index folder or
    among the `sources` the user names (symlinks resolved), never from a file only the
    index's manifest or items name: those are counted in `refused`, never opened."""

    def __init__(self, index_path: str | Path | None,
                 sources: list[str | Path] | None = None):
        from memaudit.paths import real

        self.index = None
        self.index_path = index_path
        self.image_col = None
        self.hash: str | None = None
        self.recorded: list[str] = []  # the manifest's sources (named in the hint only)
        self.named: dict[str, Path] = {}  # basename -> a source the user named
        self.allowed: set[Path] = set()
        self.cache: dict[int, str | None] = {}
        self.refused: set[str] = set()
        self.error: str | None = None
        self.dirs = [real(s) for s in sources or [] if Path(s).is_dir()]  # image folders
        for f in source_files(sources):
            self.named.setdefault(f.name, f)
            self.allowed.add(real(f))
        if index_path and Path(index_path).exists():
            try:
                from memaudit.index import TrainingIndex
                from memaudit.index.training_index import index_hash

                self.index = TrainingIndex.open(index_path)
                self.hash = index_hash(self.index.manifest, index_path)
                src = self.index.manifest.get("source") or {}
                src = src if isinstance(src, dict) else {}
                col = src.get("image_col")
                self.image_col = col if isinstance(col, str) else None
                paths = src.get("paths")
                self.recorded = [str(p) for p in paths] if isinstance(paths, list) else []
            except Exception as e:  # noqa: BLE001 - the report still renders without images
                self.index = None
                self.error = f"the index {index_path} could not be opened ({e})"
        elif index_path:
            self.error = f"the index {index_path} was not found"

    def mismatch(self, run: dict[str, Any]) -> str | None:
        """Why the opened index is not the run's (None when its content hash is)."""
        if self.index is None or self.hash == run.get("index_hash"):
            return None
        recorded = run.get("index_hash") or "no hash"
        return (f"the index {self.index_path} is not the run's index (content hash "
                f"{(self.hash or 'none')[:12]}; run {run.get('id')} recorded "
                f"{recorded[:12]} for {run.get('index_path')})")

    def _source(self, name: str) -> Path | None:
        """The file a row's source_file names, if the report may open it (else refused)."""
        from memaudit.paths import real

        assert self.index is not None
        folder = real(self.index.path)
        p = Path(name)
        candidates = [p] if p.is_absolute() else [self.index.path / p, p]
        if p.name in self.named:
            candidates.append(self.named[p.name])  # moved since the build: the user's file
        for c in candidates:
            r = real(c)
            if c.is_file() and (r in self.allowed or r.is_relative_to(folder)
                                or any(r.is_relative_to(d) for d in self.dirs)):
                return r
        self.refused.add(name)
        return None

    def uri(self, row: int | None) -> str | None:
        if row is None or self.index is None:
            return None
        if row not in self.cache:
            self.cache[row] = None
            try:
                item = self.index.item(int(row))
                src = self._source(str(item["source_file"]))
                if src is None:
                    return None
                data = training_image_bytes(src, int(item["source_row"]), self.image_col)
                self.cache[row] = _to_png_uri(data) if data else None
            except Exception:  # noqa: BLE001
                self.cache[row] = None
        return self.cache[row]

    def left_out(self, shown_any: bool) -> list[str]:
        """Lines for the report's "Files not shown"."""
        out = []
        if self.refused:
            out.append(f"training images from {len(self.refused)} file(s) neither inside the "
                       f"index folder nor named with --source, never opened, e.g. "
                       f"{sorted(self.refused)[0]}")
            if self.recorded:
                out.append(f"the index records its training data as {_paths(self.recorded)}: "
                           "name it with --source to show the training images")
        if self.error and shown_any:
            out.append(f"every training image: {self.error}")
        return out
