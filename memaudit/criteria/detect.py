"""Copy detection of any folder of images against a training index (issue 2, METHODS 1).

`detect_images(paths_or_dir, index, criteria=None, batch_size=32)` scores every image with
each criterion and returns one row per (image, criterion): the nearest training item (row,
key, caption, duplicate count), the score, and both verdicts, fixed (METHODS 1) and
calibrated (the index's 1% FPR threshold, METHODS 1.2).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from memaudit.common import UserError, progress_bar
from memaudit.criteria import canonical_name, make_criterion, open_index, supported_criteria
from memaudit.criteria.common import check_supported, describe_rows, embed_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

SCHEMA = pa.schema([
    ("image", pa.string()),
    ("criterion", pa.string()),
    ("score", pa.float64()),
    ("neighbour_row", pa.int64()),
    ("neighbour_key", pa.string()),
    ("neighbour_caption", pa.string()),
    ("group_count", pa.int64()),
    ("is_copy", pa.bool_()),
    ("is_copy_calibrated", pa.bool_()),
    ("threshold", pa.float64()),
    ("calibrated_threshold", pa.float64()),
])


def list_images(paths_or_dir: str | Path | Iterable[str | Path]) -> list[Path]:
    """Image files from a directory (recursive, sorted), a file, or a list of both.

    A path that does not exist, or no image at all, is a UserError."""
    items = [paths_or_dir] if isinstance(paths_or_dir, (str, Path)) else list(paths_or_dir)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if not p.exists():
            raise UserError(f"no such file or directory: {p}")
        if p.is_dir():
            out += sorted(f for f in p.rglob("*")
                          if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    if not out:
        where = ", ".join(map(str, items))
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {where}")
    return out


def _load(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path}: {e}") from e


def resolve_criteria(index: Any, criteria: Sequence[str] | None) -> list[str]:
    """Canonical criterion names; default: every criterion the index supports."""
    if not criteria:
        names = list(supported_criteria(index))
        if not names:
            raise UserError("this index's embedder supports no copy criterion")
        return names
    names = []
    for c in criteria:
        key = canonical_name(c)
        check_supported(index, key)
        if key not in names:
            names.append(key)
    return names


def detect_images(paths_or_dir: str | Path | Iterable[str | Path], index: Any,
                  criteria: Sequence[str] | None = None, batch_size: int = 32,
                  criterion_opts: dict[str, dict] | None = None,
                  device: str | None = None) -> pa.Table:
    """Score every image against `index` (TrainingIndex or directory) -> pyarrow Table with
    the columns of `SCHEMA`, rows ordered by image then criterion. `device` rebuilds the
    index's embedder there; `criterion_opts` maps a criterion name to make_criterion options."""
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    paths = list_images(paths_or_dir)
    index = open_index(index, device=device)
    names = resolve_criteria(index, criteria)
    opts = criterion_opts or {}
    crits = [make_criterion(n, index, **opts.get(n, {})) for n in names]
    per_crit: dict[str, list] = {n: [] for n in names}
    batches = [paths[a:a + batch_size] for a in range(0, len(paths), batch_size)]

    def load(batch: list[Path]) -> list:
        return [_load(p) for p in batch]

    # decoding of batch i+1 overlaps the embedding and search of batch i; all criteria of
    # one index share the same vectors, so each image is embedded once
    with progress_bar("detect", total=len(paths), unit="images") as advance, \
            ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, batches[0])
        for i in range(len(batches)):
            images = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(load, batches[i + 1])
            vectors = embed_images(index, images)
            for crit in crits:
                per_crit[crit.name].append(crit.score_from_vectors(vectors))
            advance(len(images))
    columns: dict[str, list] = {f.name: [] for f in SCHEMA}
    blocks = []
    for crit in crits:
        parts = per_crit[crit.name]
        score = np.concatenate([s.score for s in parts])
        rows = np.concatenate([s.neighbour for s in parts])
        fixed = np.concatenate([s.is_copy for s in parts])
        cal = (np.concatenate([s.is_copy_calibrated for s in parts])
               if crit.calibrated_threshold is not None else None)
        info = describe_rows(index, rows)
        blocks.append((crit, score, rows, fixed, cal, info))
    for i, path in enumerate(paths):
        for crit, score, rows, fixed, cal, info in blocks:
            columns["image"].append(str(path))
            columns["criterion"].append(crit.name)
            columns["score"].append(float(score[i]))
            columns["neighbour_row"].append(int(rows[i]))
            columns["neighbour_key"].append(None if info["key"][i] is None else str(info["key"][i]))
            columns["neighbour_caption"].append(info["caption"][i])
            gc = info["group_count"][i]
            columns["group_count"].append(None if gc is None else int(gc))
            columns["is_copy"].append(bool(fixed[i]))
            columns["is_copy_calibrated"].append(None if cal is None else bool(cal[i]))
            columns["threshold"].append(float(crit.threshold))
            columns["calibrated_threshold"].append(crit.calibrated_threshold)
    return pa.Table.from_pydict(columns, schema=SCHEMA)
