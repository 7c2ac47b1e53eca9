"""open_clip image (and text) embeddings, METHODS 1.3 (semantic neighbours, CLIP score).

A model name plus a pretrained tag (from the open_clip cache) or a local checkpoint path;
`model_config` may name a JSON model config file to register first (custom/tiny models).
Vectors are L2-normalised; similarity is the cosine (faiss inner product).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from memaudit.common import UserError
from memaudit.embedders.base import Embedder


class CLIPEmbedder(Embedder):
    name = "clip"
    metric = "ip"

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None,
                 model_config: str | Path | None = None, device: str | None = None,
                 pretrained_sha256: str | None = None, precision: str | None = None,
                 **_: Any):
        try:
            import open_clip
        except ImportError as e:
            raise UserError("the clip embedder needs open_clip: pip install "
                            "'memaudit[clip]'") from e
        self.model_name = model
        self.pretrained = pretrained
        self.model_config = str(Path(model_config).resolve()) if model_config else None
        self.device = "cpu" if device is None else device
        if self.model_config:
            if not Path(self.model_config).is_file():
                raise UserError(f"open_clip model config not found: {model_config}")
            open_clip.add_model_config(self.model_config)
        if model not in open_clip.list_models():
            raise UserError(f"unknown open_clip model {model!r}")
        self.pretrained_sha256: str | None = None
        if pretrained and Path(pretrained).expanduser().is_file():
            from memaudit.common import sha256_file

            pretrained = str(Path(pretrained).expanduser().resolve())
            self.pretrained = pretrained
            self.pretrained_sha256 = sha256_file(pretrained)
            if pretrained_sha256 and pretrained_sha256 != self.pretrained_sha256:
                raise UserError(f"CLIP checkpoint {pretrained} has SHA-256 "
                                f"{self.pretrained_sha256}, expected {pretrained_sha256}")
        elif pretrained_sha256:
            raise UserError(f"CLIP checkpoint not found: {pretrained}")
        try:
            # pretrained=None means random weights (tests): seeded so a reopened index
            # rebuilds the same model
            import warnings

            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a refused pickle: our one line, not torch's
                torch.manual_seed(0)
                net, _, val = open_clip.create_model_and_transforms(
                    model, pretrained=pretrained, device=self.device)
        except Exception as e:  # missing tag offline, bad checkpoint
            raise UserError(f"cannot load open_clip {model} / {pretrained}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        self.model = net.eval()
        self._val = val
        self.tokenizer = open_clip.get_tokenizer(model)
        cfg = open_clip.get_model_preprocess_cfg(net)
        size = cfg.get("size", 224)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self.preprocessing = (f"openclip-{model}-{self.image_size[0]}x{self.image_size[1]}"
                              f"-{cfg.get('resize_mode', 'shortest')}")
        with torch.inference_mode():
            probe = torch.zeros(1, 3, *self.image_size, device=self.device)
            self.dim = int(self.model.encode_image(probe).shape[-1])
        self.set_precision(precision, self.model.visual)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"model": self.model_name, "pretrained": self.pretrained}
        if self.pretrained_sha256:
            cfg["pretrained_sha256"] = self.pretrained_sha256
        if self.model_config:
            cfg["model_config"] = self.model_config
        if self.precision != "fp32":
            cfg["precision"] = self.precision
        return cfg

    def preprocess(self, image) -> torch.Tensor:
        return self._val(image.convert("RGB"))

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(batch)

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """Short edge resized to cover the model's input, before the centre crop."""
        th, tw = self.image_size
        s = max(th / h, tw / w)
        return max(th, round(h * s)), max(tw, round(w * s))

    def embed_tensor(self, x01: torch.Tensor) -> torch.Tensor:
        """Differentiable: resize short edge (bicubic), centre crop, CLIP mean/std, encode."""
        x01 = x01.to(self.device)
        th, tw = self.image_size
        h, w = x01.shape[-2:]
        nh, nw = self.input_size(h, w)
        if (nh, nw) != (h, w):
            x01 = F.interpolate(x01, size=(nh, nw), mode="bicubic", align_corners=False,
                                antialias=True)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x01[..., top:top + th, left:left + tw]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        with self.autocast():
            out = self.model.encode_image(self.memory_format((x - mean) / std))
        return F.normalize(out.float(), dim=-1)

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        """Texts -> L2-normalised float32 [n, dim] (CLIP score = 100 * cos, METHODS 1.3)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        out = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)
