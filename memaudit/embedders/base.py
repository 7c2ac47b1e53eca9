"""The `Embedder` interface (DESIGN.md "Core abstractions"): images -> float32 vectors.

`preprocess` runs in decoding worker threads (PIL -> tensor); `embed_batch` runs the model on
a stacked batch; `embed_tensor` is the differentiable path from [B, 3, H, W] images in [0, 1]
(AMG, METHODS 3.2, needs gradients through the descriptor).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch


class Embedder(ABC):
    name: str
    dim: int
    metric: str  # "ip" (cosine on L2-normalised vectors) or "l2" (squared euclidean)
    preprocessing: str  # id recorded in the manifest
    device: str = "cpu"

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Options that rebuild this embedder: `make_embedder(name, **config())`."""

    @abstractmethod
    def preprocess(self, image) -> torch.Tensor:
        """One RGB PIL image -> float tensor [3, H, W] (model input)."""

    @abstractmethod
    def embed_tensor(self, x01: torch.Tensor) -> torch.Tensor:
        """Differentiable: [B, 3, H, W] in [0, 1] -> [B, dim] (L2-normalised when metric ip)."""

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The size at which the descriptor reads an h x w image (after its resize, before
        any centre crop); AMG decodes its check at this size (memaudit/guidance/amg_check.py).
        Default: as given (no resize)."""
        return h, w

    @abstractmethod
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Model on an already preprocessed batch."""

    @torch.inference_mode()
    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        """Preprocessed batch [B, 3, H, W] -> float32 [B, dim]."""
        out = self._forward(batch.to(self.device))
        if self.metric == "ip":
            out = torch.nn.functional.normalize(out.float(), dim=-1)
        return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)

    def embed_list(self, tensors: list[torch.Tensor], batch_size: int = 64) -> np.ndarray:
        """Preprocessed tensors of possibly different shapes -> float32 [n, dim] in order.

        Same-shape tensors are stacked together (the official SSCD preprocessing keeps the
        aspect ratio, so shapes vary)."""
        out = np.zeros((len(tensors), self.dim), dtype=np.float32)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(tensors):
            by_shape.setdefault(tuple(t.shape), []).append(i)
        for idx in by_shape.values():
            for s in range(0, len(idx), batch_size):
                part = idx[s:s + batch_size]
                out[part] = self.embed_batch(torch.stack([tensors[i] for i in part]))
        return out

    def embed(self, images, batch_size: int = 64) -> np.ndarray:
        """PIL images -> float32 [n, dim]."""
        return self.embed_list([self.preprocess(im.convert("RGB")) for im in images],
                               batch_size=batch_size)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "metric": self.metric,
                "preprocessing": self.preprocessing, "config": self.config()}
