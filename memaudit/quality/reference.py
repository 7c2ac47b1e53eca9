"""The reference sample for the quality distances: training images drawn from the index's
recorded sources (items.parquet `source_file` / `source_row`, docs/index-format.md).

`n` items are drawn uniformly without replacement from all items of the index (duplicates
count as often as they occur: the distribution the model was trained on) with
`numpy.random.default_rng(seed)`. Only the Parquet files listed in the index manifest's
`source.paths` are read: an item naming any other file is refused, so an index cannot make
memaudit read a file the user did not point it at. Images are decoded with the training-set
reader's limits and resized (short side, bicubic, centre crop) to the generated size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memaudit.common import UserError


@dataclass
class ReferenceSample:
    """Decoded reference images (PIL, RGB) and where they came from."""

    images: list[Any]
    rows: np.ndarray  # items.parquet row ids, sorted
    requested: int
    seed: int
    skipped: int  # drawn but undecodable or empty

    def tensor(self, size: tuple[int, int]) -> torch.Tensor:
        """[n, 3, H, W] in [0, 1] at the generated size."""
        return images_to_tensor(self.images, size)

    def describe(self) -> dict[str, Any]:
        return {"n": len(self.images), "requested": self.requested, "seed": self.seed,
                "skipped": self.skipped}


def source_files(index: Any) -> list[Path]:
    """The training Parquet files the index was built from (its manifest's record)."""
    src = index.manifest.get("source") or {}
    paths = src.get("paths") if isinstance(src, dict) else None
    return [Path(str(p)) for p in paths or []]


def _resolve(name: str, allowed: list[Path]) -> Path:
    exact = [p for p in allowed if str(p) == name]
    if exact:
        return exact[0]
    same = [p for p in allowed if p.name == Path(name).name]
    if len(same) == 1:  # a relative path recorded at build time
        return same[0]
    raise UserError(f"quality: an index item names source file {name!r}, which is not one "
                    "of the index's recorded sources (manifest source.paths)")


def reference_sample(index: Any, n: int, seed: int = 0) -> ReferenceSample:
    """Draw and decode `n` training images (see the module docstring)."""
    from memaudit.data.parquet import decode_image
    from memaudit.data.training_set import read_image_rows

    allowed = source_files(index)
    if not allowed:
        raise UserError(f"quality: index {index.path} records no training source files to "
                        "draw a reference sample from; set quality = false in the plan")
    total = int(index.nitems)
    k = min(int(n), total)
    if k < 2:
        raise UserError(f"quality: reference sample of {k} images; need at least 2")
    rows = np.sort(np.random.default_rng(int(seed)).choice(total, size=k, replace=False))
    files = index.items.column("source_file").take(rows).to_pylist()
    src_rows = index.items.column("source_row").take(rows).to_pylist()
    image_col = (index.manifest.get("source") or {}).get("image_col")
    by_file: dict[Path, list[tuple[int, int]]] = {}
    for i, (f, r) in enumerate(zip(files, src_rows, strict=True)):
        by_file.setdefault(_resolve(str(f), allowed), []).append((i, int(r)))
    decoded: dict[int, Any] = {}
    for path, pairs in by_file.items():
        if not path.is_file():
            raise UserError(f"quality: training source {path} (recorded in the index) not "
                            "found; set quality = false in the plan to skip quality")
        data = read_image_rows(path, [r for _, r in pairs], image_col)
        for i, r in pairs:
            im, _ = decode_image(data.get(r))
            if im is not None:
                decoded[i] = im
    keep = sorted(decoded)
    if len(keep) < 2:
        raise UserError("quality: fewer than 2 reference images could be decoded")
    return ReferenceSample(images=[decoded[i] for i in keep], rows=rows[keep], requested=int(n),
                           seed=int(seed), skipped=k - len(keep))


def images_to_tensor(images: list[Any], size: tuple[int, int]) -> torch.Tensor:
    """PIL images -> [n, 3, H, W] in [0, 1]: short side to fit (bicubic), centre crop."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    out = np.zeros((len(images), h, w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        im = im.convert("RGB")
        if im.size != (w, h):
            s = max(w / im.width, h / im.height)
            nw, nh = max(w, round(im.width * s)), max(h, round(im.height * s))
            im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - w) // 2, (nh - h) // 2
            im = im.crop((left, top, left + w, top + h))
        out[i] = np.asarray(im)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(255)


def load_pngs(paths: list[Path]) -> torch.Tensor:
    """Generated images (as the audit wrote them) -> [n, 3, H, W] in [0, 1]."""
    from PIL import Image

    arrs = []
    for p in paths:
        with Image.open(p) as im:
            arrs.append(np.asarray(im.convert("RGB")))
    if not arrs:
        return torch.zeros(0, 3, 1, 1)
    if len({a.shape for a in arrs}) != 1:
        raise UserError("quality: the generated images differ in size")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div(255)
