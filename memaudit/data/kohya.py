"""kohya-ss sd-scripts dataset configs (`--dataset-config lora.toml`).

```toml
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "img/sks"        # relative to the config file's folder
  class_tokens = "sks dog"     # the caption of an image without a caption file
  num_repeats = 10             # recorded as the duplicate count the model saw
  [[datasets.subsets]]
  image_dir = "reg/dog"
  class_tokens = "dog"
  is_reg = true
```

Options cascade from `[general]` to `[[datasets]]` to each subset, as in sd-scripts. Per
subset: the images directly in `image_dir` (sd-scripts does not recurse), each read
`num_repeats` times (default 1); caption = the first line of `NAME + caption_extension`
(default `.caption`, sd-scripts' default), else `class_tokens`, else the row is skipped as
`no_caption`; `caption_prefix` / `caption_suffix` are added with a space. Regularization
subsets (`is_reg`) are training images too. The random caption augmentations (shuffle,
dropout, wildcards) are not applied: the caption is recorded as written. Fine-tuning subsets
(`metadata_file` without `image_dir`) are refused. Keys: image paths relative to the config
file's folder. The `class_tokens` of the training subsets become the instance prompts, the
first regularization subset's the class prompt (`memaudit audit --init`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from memaudit.common import UserError, read_toml
from memaudit.data.base import stat_digest
from memaudit.data.images import ImageEntry, ImageFilesLayout, list_images, sidecars


def _read(path: Path) -> dict[str, Any]:
    return read_toml(path, "dataset config")


class KohyaLayout(ImageFilesLayout):
    name = "kohya"

    @classmethod
    def detect(cls, path: Path, opts: dict[str, Any]) -> bool:
        return path.is_file() and path.suffix == ".toml" and "datasets" in _read(path)

    def subsets(self) -> list[dict[str, Any]]:
        """Each subset's options merged over its dataset's and [general]'s, checked."""
        path = Path(self.source)
        cfg = _read(path)
        where = f"dataset config {path}"
        general = cfg.get("general", {})
        datasets = cfg.get("datasets")
        if not isinstance(general, dict):
            raise UserError(f"{where}: [general] must be a table")
        if not isinstance(datasets, list) or not datasets or not all(
                isinstance(d, dict) for d in datasets):
            raise UserError(f"{where}: needs [[datasets]] tables")
        out = []
        for d in datasets:
            subs = d.get("subsets")
            if not isinstance(subs, list) or not subs or not all(isinstance(s, dict)
                                                                 for s in subs):
                raise UserError(f"{where}: each [[datasets]] needs [[datasets.subsets]]")
            for s in subs:
                m = {**general, **{k: v for k, v in d.items() if k != "subsets"}, **s}
                out.append(self._check(m, where, path.parent.resolve()))
        return out

    @staticmethod
    def _check(m: dict[str, Any], where: str, base: Path) -> dict[str, Any]:
        image_dir = m.get("image_dir")
        if image_dir is None and m.get("metadata_file"):
            raise UserError(f"{where}: fine-tuning subsets (metadata_file) are not read; "
                            "give image_dir with caption files")
        if not isinstance(image_dir, str) or not image_dir:
            raise UserError(f"{where}: a subset needs image_dir = \"FOLDER\"")
        folder = Path(image_dir).expanduser()
        folder = (folder if folder.is_absolute() else base / folder).resolve()
        if not folder.is_dir():
            raise UserError(f"{where}: image_dir {folder} not found")
        ext = m.get("caption_extension", ".caption")
        repeats = m.get("num_repeats", 1)
        checks = [
            (isinstance(ext, str) and ext != "", "caption_extension must be a string"),
            (isinstance(repeats, int) and not isinstance(repeats, bool) and repeats >= 1,
             f"num_repeats must be an integer >= 1, got {repeats!r}"),
            (all(isinstance(m.get(k, ""), str) for k in
                 ("class_tokens", "caption_prefix", "caption_suffix")),
             "class_tokens, caption_prefix and caption_suffix must be strings"),
            (isinstance(m.get("is_reg", False), bool), "is_reg must be true or false"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{where}: {message}")
        return {"folder": folder, "ext": ext if ext.startswith(".") else "." + ext,
                "class_tokens": m.get("class_tokens") or None, "repeats": repeats,
                "is_reg": m.get("is_reg", False), "prefix": m.get("caption_prefix", ""),
                "suffix": m.get("caption_suffix", "")}

    def build_entries(self) -> list[ImageEntry]:
        base = Path(self.source).resolve().parent
        return [ImageEntry(p, Path(os.path.relpath(p, base)).as_posix(),
                           captions=sidecars(p, (s["ext"],)), fallback=s["class_tokens"],
                           repeats=s["repeats"], first_line=True, prefix=s["prefix"],
                           suffix=s["suffix"])
                for s in self.subsets() for p in list_images(s["folder"], recursive=False)]

    def roots(self) -> list[Path]:
        return list(dict.fromkeys(s["folder"] for s in self.subsets()))

    def fingerprint(self) -> str | None:
        return stat_digest([Path(self.source).resolve(), *(c for e in self.entries()
                                                            for c in e.captions)])

    def describe(self) -> dict[str, Any]:
        subs = self.subsets()
        instance = [s["class_tokens"] for s in subs if s["class_tokens"] and not s["is_reg"]]
        reg = [s["class_tokens"] for s in subs if s["class_tokens"] and s["is_reg"]]
        return {"layout": self.name, "instance_prompts": list(dict.fromkeys(instance)),
                "class_prompt": reg[0] if reg else None}
