"""CLIP criteria (open_clip; METHODS.md 1.3 and 4).

- `ClipCriterion`: cosine of open_clip image embeddings with the nearest training item
  (semantic neighbours; higher = more similar). METHODS gives no published fixed copy cut for
  CLIP; memaudit uses 0.95 (a near-duplicate level) as the fixed threshold and reports the
  index-calibrated one (1% FPR) beside it, which is the verdict to trust.
- `clip_score(images, prompts, model, ...)`: text alignment, CLIP score = 100 * cos(image
  embedding, prompt embedding) per pair (no clamping), as METHODS 1.3 / 4 define it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from memaudit.common import UserError
from memaudit.criteria.sscd import CosineCriterion


class ClipCriterion(CosineCriterion):
    """open_clip image cosine with the nearest training item; copy when > 0.95 (fixed)."""

    name = "clip"
    threshold = 0.95

    def clip_score(self, images: Any, prompts: list[str]) -> np.ndarray:
        """CLIP score of each (image, prompt) pair with the index's own CLIP model."""
        emb = self.index.embedder
        if len(prompts) != len(images):
            raise UserError(f"{len(images)} images but {len(prompts)} prompts for the CLIP score")
        image_features = self._embed(images)
        if hasattr(emb, "embed_text"):
            text_features = emb.embed_text(list(prompts))
        elif getattr(emb, "model", None) is not None:
            text_features = encode_text(emb.model, prompts, getattr(emb, "tokenizer", None))
        else:
            raise UserError("this index's CLIP embedder has no text tower")
        return clip_score_from_features(image_features, text_features)


def clip_score_from_features(image_features: np.ndarray | torch.Tensor,
                             text_features: np.ndarray | torch.Tensor) -> np.ndarray:
    """100 * cos(image_i, text_i) row by row, float64 [n]."""
    a = np.asarray(torch.as_tensor(image_features).detach().cpu(), np.float64)
    b = np.asarray(torch.as_tensor(text_features).detach().cpu(), np.float64)
    if a.shape != b.shape:
        raise UserError(f"{len(a)} images but {len(b)} prompts for the CLIP score")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return 100.0 * (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def encode_text(model: Any, prompts: list[str], tokenizer: Any = None) -> torch.Tensor:
    """open_clip text features [n, d] (no gradient)."""
    import open_clip

    tok = tokenizer or open_clip.tokenize
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.encode_text(tok(list(prompts)).to(device)).float().cpu()


def encode_images(model: Any, images: Any, preprocess: Any = None) -> torch.Tensor:
    """open_clip image features [n, d] of PIL images or a [B,3,H,W] tensor in [0,1].

    PIL images go through `preprocess` (open_clip's eval transform) when given; tensors (and
    PIL without `preprocess`) are resized to the model's input size and normalised with the
    model's mean/std (OpenAI's by default)."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms.functional import pil_to_tensor

    device = next(model.parameters()).device
    visual = model.visual
    if not isinstance(images, torch.Tensor):
        if preprocess is not None:
            x = torch.stack([preprocess(im) for im in images])
            with torch.no_grad():
                return model.encode_image(x.to(device)).float().cpu()
        images = torch.stack([pil_to_tensor(im.convert("RGB")).float() / 255 for im in images])
    size = getattr(visual, "image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mean = getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_DATASET_STD
    x = torch.nn.functional.interpolate(images.float(), size=size, mode="bicubic",
                                        align_corners=False).clamp(0, 1)
    x = (x - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]
    with torch.no_grad():
        return model.encode_image(x.to(device)).float().cpu()


def clip_score(images: Any, prompts: list[str], model: Any, tokenizer: Any = None,
               preprocess: Any = None) -> np.ndarray:
    """CLIP score = 100 * cos(image, prompt) per pair (METHODS 1.3 / 4) with an open_clip
    model (e.g. `open_clip.create_model_and_transforms(name, pretrained=...)`)."""
    if len(prompts) != len(images):
        raise UserError(f"{len(images)} images but {len(prompts)} prompts for the CLIP score")
    return clip_score_from_features(encode_images(model, images, preprocess),
                                    encode_text(model, prompts, tokenizer))
