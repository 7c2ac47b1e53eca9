"""A small in-memory stand-in with the TrainingIndex contract (memaudit.index), for the
criteria unit tests: exact-duplicate groups, one faiss vector per group (id == group id)."""

from __future__ import annotations

from collections import Counter

import faiss
import numpy as np
import pyarrow as pa
import torch
from PIL import Image


class PixelEmbedder:
    """Resize to size x size, RGB in [0,1], flattened C-order of [3, H, W]."""

    name = "pixels"
    metric = "l2"

    def __init__(self, size: int):
        self.size = size
        self.dim = 3 * size * size

    def embed(self, images) -> np.ndarray:
        out = []
        for im in images:
            im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
            out.append((np.asarray(im, np.float32) / 255).transpose(2, 0, 1).reshape(-1))
        return np.stack(out)

    def embed_tensor(self, x01: torch.Tensor) -> torch.Tensor:
        if x01.shape[-1] != self.size or x01.shape[-2] != self.size:
            x01 = torch.nn.functional.interpolate(x01, size=(self.size, self.size),
                                                  mode="bilinear", align_corners=False)
        return x01.reshape(x01.shape[0], -1)


class ProjEmbedder:
    """A fixed random projection of 8x8 pixels, L2-normalised (a stand-in for SSCD/CLIP)."""

    metric = "ip"

    def __init__(self, name: str, dim: int = 16, seed: int = 0):
        self.name = name
        self.dim = dim
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(3 * 8 * 8, dim, generator=g)
        self.pix = PixelEmbedder(8)

    def embed_tensor(self, x01: torch.Tensor) -> torch.Tensor:
        v = self.pix.embed_tensor(x01) - 0.5
        return torch.nn.functional.normalize(v @ self.w, dim=1)

    def embed(self, images) -> np.ndarray:
        x = torch.from_numpy(self.pix.embed(images))
        return torch.nn.functional.normalize((x - 0.5) @ self.w, dim=1).numpy()


class FakeIndex:
    def __init__(self, vectors: np.ndarray, embedder, keys=None, captions=None,
                 calibration=None):
        vectors = np.ascontiguousarray(vectors, np.float32)
        n, d = vectors.shape
        self.embedder = embedder
        self.metric = embedder.metric
        groups: dict[bytes, int] = {}
        gid = np.zeros(n, np.int64)
        reps: list[int] = []
        for i, v in enumerate(vectors):
            h = v.tobytes()
            if h not in groups:
                groups[h] = len(reps)
                reps.append(i)
            gid[i] = groups[h]
        counts = np.bincount(gid)
        self._reps = np.asarray(reps, np.int64)
        keys = keys or [f"k{i}" for i in range(n)]
        captions = captions or [f"caption {i}" for i in range(n)]
        self.items = pa.table({
            "row_id": np.arange(n, dtype=np.int64), "key": keys, "caption": captions,
            "source_file": ["fake.parquet"] * n, "source_row": np.arange(n, dtype=np.int64),
            "group_id": gid, "group_count": counts[gid],
            "is_representative": np.isin(np.arange(n), self._reps),
        })
        self.index = faiss.IndexFlatIP(d) if self.metric == "ip" else faiss.IndexFlatL2(d)
        self.index.add(vectors[self._reps])
        self.manifest = {"embedder": embedder.name, "embedder_config": {}, "dim": d,
                         "metric": self.metric, "factory": "Flat", "rows": n,
                         "groups": len(reps), "calibration": calibration}
        if hasattr(embedder, "size"):
            self.manifest["embedder_config"]["size"] = embedder.size

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, vectors, k):
        return self.index.search(np.ascontiguousarray(vectors, np.float32), k)

    def group_vectors(self) -> np.ndarray:
        return self.index.reconstruct_n(0, self.index.ntotal)

    def representative_rows(self, group_ids):
        return self._reps[np.asarray(group_ids, np.int64)]

    def group_caption(self, group_id: int) -> str:
        gid = self.items.column("group_id").to_numpy()
        caps = [c for c, g in zip(self.items.column("caption").to_pylist(), gid, strict=True)
                if g == group_id]
        return Counter(caps).most_common(1)[0][0]

    @property
    def nitems(self) -> int:
        return self.items.num_rows

    def group_of_rows(self, row_ids):
        return self.items.column("group_id").to_numpy()[np.asarray(row_ids, np.int64)]

    def take_items(self, row_ids, columns=None):
        t = self.items.take(pa.array(np.asarray(row_ids, np.int64)))
        return t if columns is None else t.select(list(columns))

    def item(self, row_id: int) -> dict:
        return {k: v[0] for k, v in self.items.slice(int(row_id), 1).to_pydict().items()}

    def save_manifest(self) -> None:
        pass


def fake_index_from_images(images, embedder, **kw) -> FakeIndex:
    """A FakeIndex over the embedder's vectors of PIL images."""
    return FakeIndex(embedder.embed(images), embedder, **kw)


def to_pil(arr01: np.ndarray) -> Image.Image:
    """[3,H,W] or [H,W,3] float in [0,1] -> an RGB PIL image (exactly representable values
    survive the 8-bit round trip when they are multiples of 1/255)."""
    a = np.asarray(arr01)
    if a.shape[0] == 3:
        a = a.transpose(1, 2, 0)
    return Image.fromarray(np.round(a * 255).astype(np.uint8), "RGB")
