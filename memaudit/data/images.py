"""Layouts whose rows are image files on disk (folders, DreamBooth, kohya-ss subsets).

Each image file is one unit; its rows are its repeats (1, or kohya's `num_repeats`: the
same image read that many times, so the index's exact-duplicate groups count what the model
saw). The caption comes from a sidecar file (`NAME.txt` beside `NAME.jpg`...), else a
fallback prompt; an image with neither is skipped as `no_caption`. Images are listed in
sorted order of their path relative to the folder; hidden files and folders are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from memaudit.common import UserError
from memaudit.data.base import Layout, stat_digest
from memaudit.data.parquet import TrainingRow

#: image file suffixes read (case-insensitive)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif",
                            ".tiff"})
#: sidecar caption suffixes of an image folder, in the order they are tried
CAPTION_SUFFIXES = (".txt", ".caption")


def is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def list_images(folder: Path, recursive: bool) -> list[Path]:
    """Image files in `folder` (and below when `recursive`), sorted by relative path."""
    if not recursive:
        found = [p for p in folder.iterdir() if p.is_file() and is_image(p)]
    else:
        found = []
        for d, dirs, files in os.walk(folder):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            found += [Path(d) / f for f in files if is_image(Path(f))]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def sidecars(image: Path, suffixes: tuple[str, ...] = CAPTION_SUFFIXES) -> tuple[Path, ...]:
    """Caption files that may sit beside an image: NAME + suffix."""
    return tuple(image.parent / (image.stem + s) for s in suffixes)


@dataclass(frozen=True)
class ImageEntry:
    """One image file and how its caption is found."""

    path: Path
    key: str
    captions: tuple[Path, ...] = ()  # sidecar candidates, the first that exists is read
    fallback: str | None = None  # caption without a sidecar (None: the row is skipped)
    repeats: int = 1
    first_line: bool = False  # kohya-ss reads the first line of a caption file
    prefix: str = ""
    suffix: str = ""

    def caption(self) -> tuple[str | None, str | None]:
        """(caption, None) or (None, "no_caption")."""
        for c in self.captions:
            try:
                text = c.read_bytes().decode("utf-8", errors="replace")
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                continue
            except OSError:
                return None, "unreadable_caption"
            text = text.strip()
            if self.first_line:
                text = text.splitlines()[0].strip() if text else ""
            break
        else:
            if self.fallback is None:
                return None, "no_caption"
            text = self.fallback
        return " ".join(x for x in (self.prefix, text, self.suffix) if x), None


class ImageFilesLayout(Layout):
    """Base of the image-file layouts: subclasses build `entries()`."""

    _entries: list[ImageEntry] | None = None

    def build_entries(self) -> list[ImageEntry]:
        raise NotImplementedError

    def entries(self) -> list[ImageEntry]:
        if self._entries is None:
            self._entries = self.build_entries()
            if not self._entries:
                raise UserError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in "
                                f"{self.source}")
        return self._entries

    def units(self) -> list[Path]:
        return [e.path for e in self.entries()]

    def unit_rows(self, units: list[Path]) -> list[int]:
        entries = self.entries()
        if len(units) != len(entries):
            raise UserError(f"{self.source}: the image files changed while reading")
        return [e.repeats for e in entries]

    def iter_unit(self, i: int, unit: Path, first: int, stop: int,
                  row0: int) -> Iterator[TrainingRow]:
        e = self.entries()[i]
        if e.path != unit:
            raise UserError(f"{self.source}: the image files changed while reading "
                            f"({unit} is now {e.path})")
        caption, reason = e.caption()
        data = None
        if reason is None:
            try:
                data = unit.read_bytes()
            except OSError:
                reason = "missing_file"
        for r in range(first, stop):
            yield TrainingRow(key=e.key, caption=caption or "", image_bytes=data,
                              source_file=str(unit), source_row=r, row=row0 + r, skip=reason)

    @staticmethod
    def read_images(unit: Path, rows: list[int]) -> dict[int, bytes]:
        try:
            data = Path(unit).read_bytes()
        except OSError:
            return {}
        return {int(r): data for r in rows} if data else {}

    def fingerprint(self) -> str | None:
        return stat_digest([c for e in self.entries() for c in e.captions])
