"""Raw-pixel "embedder" for the pixel-level criteria (METHODS 1.2, Carlini et al. 2023).

An image is resized to the comparison size (default: the training image size when all
training images share one size, decided by `index build`; else 64x64), kept as RGB in
[0, 1] and flattened (dim = 3*H*W). Metric "l2": faiss returns squared euclidean distances,
so l2(a, b) = RMSE = sqrt(d / dim) (the nL2 numerator / denominator terms of AMG Eq. 8).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from memaudit.common import UserError
from memaudit.embedders.base import Embedder

DEFAULT_SIZE = 64


def parse_size(size) -> tuple[int, int]:
    """int | "HxW" | [H, W] -> (H, W)."""
    if size is None:
        return DEFAULT_SIZE, DEFAULT_SIZE
    if isinstance(size, str):
        parts = size.lower().split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError as e:
            raise UserError(f"bad pixel size {size!r}: use N or HxW") from e
        size = vals[0] if len(vals) == 1 else vals
    if isinstance(size, int):
        h = w = size
    else:
        if len(size) != 2:
            raise UserError(f"bad pixel size {size!r}: use N or HxW")
        h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise UserError(f"bad pixel size {size!r}")
    return h, w


class PixelEmbedder(Embedder):
    name = "pixels"
    metric = "l2"

    def __init__(self, size=None, device: str | None = None, precision: str | None = None,
                 **_: Any):
        if str(precision or "fp32").lower() != "fp32":
            raise UserError("the pixels embedder has no model: --precision applies to sscd "
                            "and clip")
        self.size = parse_size(size)
        h, w = self.size
        self.dim = 3 * h * w
        self.preprocessing = f"resize-bicubic-{h}x{w}-rgb01"
        self.device = "cpu" if device is None else device

    def config(self) -> dict[str, Any]:
        return {"size": list(self.size)}

    def preprocess(self, image) -> torch.Tensor:
        from PIL import Image

        h, w = self.size
        if image.mode != "RGB":  # decode_image's images already are: no second copy
            image = image.convert("RGB")
        if image.size != (w, h):
            image = image.resize((w, h), Image.BICUBIC)
        arr = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The comparison size, whatever the image's."""
        return self.size

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.reshape(batch.shape[0], -1)

    def embed_tensor(self, x01: torch.Tensor) -> torch.Tensor:
        """Differentiable resize (bicubic, antialiased) + flatten; values clamped to [0, 1]."""
        h, w = self.size
        if tuple(x01.shape[-2:]) != (h, w):
            x01 = F.interpolate(x01, size=(h, w), mode="bicubic", align_corners=False,
                                antialias=True).clamp(0, 1)
        return x01.reshape(x01.shape[0], -1)
