"""Nearest training items of image files (`memaudit index query`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from memaudit.common import UserError


def load_images(paths: list[Path]):
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except FileNotFoundError as e:
            raise UserError(f"image not found: {p}") from e
        except Exception as e:
            raise UserError(f"cannot read image {p}: {e}") from e
    return out


def neighbours(index, vectors: np.ndarray, k: int = 5) -> list[list[dict[str, Any]]]:
    """Per query vector, its k nearest groups as dicts: rank, group_id, row_id (the group's
    representative), key, caption, score (cosine for "ip"; RMSE = sqrt(d2 / dim) for "l2",
    the l2 of METHODS 1.2), score_kind, group_count."""
    scores, gids = index.search(vectors, k)
    if index.metric == "l2":
        scores = np.sqrt(np.maximum(scores, 0) / index.dim)
        kind = "rmse"
    else:
        kind = "cosine"
    rows = index.representative_rows(gids)
    counts = index.group_counts(gids)
    out = []
    for i in range(len(gids)):
        res = []
        for j in range(gids.shape[1]):
            if gids[i, j] < 0:
                continue
            item = index.item(int(rows[i, j]))
            res.append({"rank": j + 1, "group_id": int(gids[i, j]), "row_id": int(rows[i, j]),
                        "key": item["key"], "caption": item["caption"],
                        "score": float(scores[i, j]), "score_kind": kind,
                        "group_count": int(counts[i, j])})
        out.append(res)
    return out


def query_images(index_dir: str | Path, images: list[Path], k: int = 5,
                 device: str | None = None, weights: str | None = None
                 ) -> list[tuple[Path, list[dict[str, Any]]]]:
    """Embed image files with the index's embedder and return their neighbours; `weights`
    is the embedder weights file the user names (SSCD needs it)."""
    from memaudit.criteria import open_index

    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    pil = load_images(images)
    idx = open_index(index_dir, device=device or "auto", weights=weights)
    vecs = idx.embedder.embed(pil)
    return list(zip(images, neighbours(idx, vecs, k), strict=True))
