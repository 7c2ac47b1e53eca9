"""Image folders with sidecar captions: `NAME.txt` (or `NAME.caption`) beside `NAME.jpg`.

The layout of most LoRA fine-tuning sets and of img2dataset's `files` output. The folder is
read recursively; a row's key is the image's path relative to the folder (`cats/01.jpg`);
an image without a caption file is skipped as `no_caption` (a folder with no caption file at
all is refused: a DreamBooth set needs `--instance-prompt`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memaudit.common import UserError
from memaudit.data.images import ImageEntry, ImageFilesLayout, is_image, list_images, sidecars


class FolderLayout(ImageFilesLayout):
    name = "folder"

    @classmethod
    def detect(cls, path: Path, opts: dict[str, Any]) -> bool:
        return path.is_dir() and any(is_image(p) for p in path.rglob("*") if p.is_file())

    def build_entries(self) -> list[ImageEntry]:
        root = Path(self.source).resolve()
        if not root.is_dir():
            raise UserError(f"training set folder not found: {self.source}")
        entries = [ImageEntry(p, p.relative_to(root).as_posix(), captions=sidecars(p))
                   for p in list_images(root, recursive=True)]
        if entries and not any(c.is_file() for e in entries for c in e.captions):
            raise UserError(f"{self.source}: no caption files (NAME.txt or NAME.caption "
                            "beside NAME.jpg); for a DreamBooth set give --instance-prompt")
        return entries
