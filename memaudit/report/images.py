"""The report's images: generated image files and training images (re-read from the training
Parquet through the index's items.parquet source_file/source_row), inlined as PNG data URIs.

A database or index may come from someone else, so only generated images under the
database's own folder and training images from the Parquet files the index recorded as its
sources are read; what was refused is counted for the provenance section.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path


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


class _TrainingImages:
    """Neighbour row id -> PNG data URI, through the run's index (None when unavailable).

    Only Parquet files the index's manifest records as its sources are read; a row whose
    source_file is anything else is left out and counted in `refused`."""

    def __init__(self, index_path: str | Path | None):
        from memaudit.paths import real

        self.index = None
        self.image_col = None
        self.paths: dict[str, Path] = {}
        self.allowed: set[Path] = set()
        self.cache: dict[int, str | None] = {}
        self.refused: set[str] = set()
        self.error: str | None = None
        if index_path and Path(index_path).exists():
            try:
                from memaudit.index import TrainingIndex

                self.index = TrainingIndex.open(index_path)
                src = self.index.manifest.get("source") or {}
                src = src if isinstance(src, dict) else {}
                self.image_col = src.get("image_col")
                paths = [Path(str(p)) for p in src.get("paths") or []]
                self.paths = {p.name: p for p in paths}
                self.allowed = {real(p) for p in paths}
            except Exception as e:  # noqa: BLE001 - the report still renders without images
                self.index = None
                self.error = f"the index {index_path} could not be opened ({e})"
        elif index_path:
            self.error = f"the index {index_path} was not found"

    def uri(self, row: int | None) -> str | None:
        from memaudit.paths import real

        if row is None or self.index is None:
            return None
        if row not in self.cache:
            self.cache[row] = None
            try:
                item = self.index.item(int(row))
                src = Path(item["source_file"])
                if not src.exists():  # a relative path from the build: the manifest's copy
                    src = self.paths.get(src.name, src)
                if real(src) not in self.allowed:
                    self.refused.add(str(item["source_file"]))
                    return None
                data = training_image_bytes(src, int(item["source_row"]), self.image_col)
                self.cache[row] = _to_png_uri(data) if data else None
            except Exception:  # noqa: BLE001
                self.cache[row] = None
        return self.cache[row]
