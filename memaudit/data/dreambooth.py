"""DreamBooth sets: a folder of instance images trained with one instance prompt.

- `--instance-prompt "a photo of sks dog"` (diffusers' train_dreambooth.py): every image
  directly in the folder is one row captioned with that prompt (sidecar files are ignored,
  as the training script ignores them).
- `--layout dreambooth` without an instance prompt: kohya-ss's folder naming, subfolders
  `N_TEXT` (`10_sks dog/`; the folder itself may be one): each image is seen N times
  (`num_repeats`, recorded as its duplicate count) with its sidecar caption (`.txt`,
  `.caption`), else TEXT.

The instance prompt(s) and `--class-prompt` are recorded in the index manifest
(`source.instance_prompts`, `source.class_prompt`): `memaudit audit --init` makes them the
audit's trigger prompts. Keys are paths relative to the folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from memaudit.common import UserError
from memaudit.data.images import ImageEntry, ImageFilesLayout, list_images, sidecars

#: kohya-ss DreamBooth folder name: repeats, underscore, class tokens
FOLDER_NAME = re.compile(r"^(\d+)_(.+)$")


class DreamBoothLayout(ImageFilesLayout):
    name = "dreambooth"

    @classmethod
    def detect(cls, path: Path, opts: dict[str, Any]) -> bool:
        return path.is_dir() and bool(opts.get("instance_prompt"))

    def _folders(self, root: Path) -> list[tuple[Path, int, str]]:
        m = FOLDER_NAME.match(root.name)
        dirs = [root] if m else sorted(d for d in root.iterdir()
                                       if d.is_dir() and FOLDER_NAME.match(d.name))
        out = []
        for d in dirs:
            n, text = FOLDER_NAME.match(d.name).groups()  # type: ignore[union-attr]
            if int(n) < 1:
                raise UserError(f"{d}: a DreamBooth folder's repeat count must be >= 1")
            out.append((d, int(n), text.strip()))
        if not out:
            raise UserError(f"{self.source}: not a DreamBooth folder: give --instance-prompt, "
                            "or name the image folders N_PROMPT (kohya-ss: 10_sks dog)")
        return out

    def build_entries(self) -> list[ImageEntry]:
        root = Path(self.source).resolve()
        if not root.is_dir():
            raise UserError(f"DreamBooth folder not found: {self.source}")
        prompt = self.opts.get("instance_prompt")
        if prompt:
            return [ImageEntry(p, p.relative_to(root).as_posix(), fallback=prompt)
                    for p in list_images(root, recursive=False)]
        base = root.parent if FOLDER_NAME.match(root.name) else root
        return [ImageEntry(p, p.relative_to(base).as_posix(), captions=sidecars(p),
                           fallback=text, repeats=n)
                for d, n, text in self._folders(root) for p in list_images(d, recursive=False)]

    def instance_prompts(self) -> list[str]:
        prompt = self.opts.get("instance_prompt")
        if prompt:
            return [prompt]
        return list(dict.fromkeys(t for _, _, t in self._folders(Path(self.source).resolve())))

    def describe(self) -> dict[str, Any]:
        return {"layout": self.name, "instance_prompts": self.instance_prompts(),
                "class_prompt": self.opts.get("class_prompt")}
