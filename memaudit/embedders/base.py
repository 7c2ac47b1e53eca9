"""The `Embedder` interface (DESIGN.md "Core abstractions"): images -> float32 vectors.

`preprocess` runs in decoding worker threads (PIL -> tensor); `embed_batch` runs the model on
a stacked batch; `embed_tensor` is the differentiable path from [B, 3, H, W] images in [0, 1]
(AMG, METHODS 3.2, needs gradients through the descriptor).

Precision (issue 21; `--precision`, recorded in the index manifest's embedder config, absent
= fp32): model embedders (SSCD, CLIP) may run under autocast in channels-last memory format:
`mixed` = fp16 on CUDA, bf16 on the CPU; `bf16`, `fp16` (CUDA only) name the dtype. Vectors
are float32 whatever the precision.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

PRECISIONS = ("fp32", "mixed", "bf16", "fp16")


def autocast_dtype(precision: str | None, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of a `precision` on `device` (None: float32, no autocast)."""
    from memaudit.common import UserError

    p = str(precision or "fp32").lower()
    if p not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if p == "fp32":
        return None
    kind = torch.device(device).type
    dtype = {"mixed": torch.float16 if kind == "cuda" else torch.bfloat16,
             "bf16": torch.bfloat16, "fp16": torch.float16}[p]
    if kind != "cuda" and dtype == torch.float16:
        raise UserError("precision fp16 runs on CUDA only; on the CPU use bf16 (or mixed)")
    if kind == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bf16; use fp16 (or mixed)")
    return dtype


class Embedder(ABC):
    name: str
    dim: int
    metric: str  # "ip" (cosine on L2-normalised vectors) or "l2" (squared euclidean)
    preprocessing: str  # id recorded in the manifest
    device: str = "cpu"
    precision: str = "fp32"  # see the module docstring
    amp_dtype: torch.dtype | None = None

    def set_precision(self, precision: str | None, model: torch.nn.Module | None) -> None:
        """Autocast dtype for `precision` on this device; the model in channels-last
        memory format when not fp32."""
        self.amp_dtype = autocast_dtype(precision, self.device)
        self.precision = str(precision or "fp32").lower()
        if self.amp_dtype is not None and model is not None:
            model.to(memory_format=torch.channels_last)

    def autocast(self):
        """The context the model runs in: autocast at `amp_dtype`, or nothing (fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.amp_dtype)

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in channels-last when not fp32."""
        if self.amp_dtype is None or x.ndim != 4:
            return x
        return x.contiguous(memory_format=torch.channels_last)

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Options that rebuild this embedder: `make_embedder(name, **config())`."""

    @abstractmethod
    def preprocess(self, image) -> torch.Tensor:
        """One RGB PIL image -> float tensor [3, H, W] (model input)."""

    #: True when `preprocess_tensor` works on the tensor's device (GPU JPEG decoding pays)
    tensor_preprocess: bool = False

    def preprocess_tensor(self, u8: torch.Tensor) -> torch.Tensor:
        """A decoded uint8 RGB image [3, H, W] (any device) -> the model input, like
        `preprocess` (default: through PIL, exactly `preprocess`)."""
        from PIL import Image

        arr = u8.detach().to("cpu").permute(1, 2, 0).contiguous().numpy()
        return self.preprocess(Image.fromarray(arr, "RGB"))

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
        with self.autocast():
            out = self._forward(self.memory_format(batch.to(self.device)))
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
