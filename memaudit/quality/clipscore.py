"""CLIP score per generation (METHODS 1.3 / 4): 100 * cos(image, prompt) with an open_clip
model loaded from a local checkpoint (never downloaded: a pretrained *tag* is refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from memaudit.common import UserError, sha256_file


class ClipScorer:
    """`score(images01, prompts)` -> float64 [B] CLIP scores; `name` tags the figures."""

    def __init__(self, model: str, pretrained: str | Path | None,
                 model_config: str | Path | None = None, device: str = "cpu") -> None:
        from memaudit.embedders.clip import CLIPEmbedder

        if not pretrained or not Path(pretrained).expanduser().is_file():
            raise UserError(f"CLIP score: --clip-pretrained must be a local checkpoint file "
                            f"for {model} (got {pretrained!r}); memaudit never downloads "
                            "weights")
        self.embedder = CLIPEmbedder(model=model, pretrained=str(pretrained),
                                     model_config=model_config, device=device)
        self.sha256 = sha256_file(Path(pretrained).expanduser())
        self.name = f"clip-score:{model}@{self.sha256[:12]}"

    def score(self, images01: torch.Tensor, prompts: list[str]) -> np.ndarray:
        from memaudit.criteria.clip import clip_score_from_features

        if len(prompts) != len(images01):
            raise UserError(f"{len(images01)} images but {len(prompts)} prompts")
        with torch.inference_mode():
            img = self.embedder.embed_tensor(images01.float())
        return clip_score_from_features(img, self.embedder.embed_text(list(prompts)))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.embedder.model_name,
                "pretrained": self.embedder.pretrained, "sha256": self.sha256,
                "model_config": self.embedder.model_config}
