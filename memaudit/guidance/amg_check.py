"""AMG's per-step similarity check (issue 21): which image the descriptor reads, and on which
steps it is computed. What the check decides (sigma_t > lambda(u)) is AMG's own
(memaudit/guidance/amg.py, Chen et al. CVPR 2024; METHODS 3.2); this module only makes it
cheaper, each part switched on by an AMG parameter and recorded with the run's parameters.

- `decoder` (--amg-decoder): a tiny distilled decoder (`AutoencoderTiny`, TAESD;
  memaudit/models/tiny_decoder.py) decodes x0_hat for the check and its gradient instead of
  the model's full VAE. The image a run keeps is always the full VAE's.
- `check_size = "descriptor"`: for latent models, x0_hat is resized (bilinear, antialiased)
  to the latent size that decodes to what the descriptor reads before its trunk
  (`Embedder.input_size`: SSCD's 288 short edge, or 256 then the 224 centre crop for
  `somepalli`; CLIP's short edge; the pixel embedder's comparison size), never enlarged.
  Pixel-space models are unchanged (their x0_hat is the image; the embedder resizes it).
- `skip_margin = m > 0`: after a check at step j with sigma_j < lambda_j, that row's next
  check is at j + clip(floor((lambda_j - sigma_j) / m), 1, skip_max_gap): every m below
  lambda buys one skipped step, so a skipped step can miss firing by more than m only if
  sigma - lambda rose faster than m per step. Rows under Gdup (which reads sigma every step)
  are checked every step, and every row is when Gspe is not gated by firing (it reads sigma
  whenever positive). A skipped row has no sigma that step (NaN in the trace, `checked` 0)
  and does not fire.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from memaudit.common import UserError

CHECK_SIZES = ("full", "descriptor")
NEXT = "amg_next_check"  # state.memory key: per row, the step of its next check


def descriptor_input_size(criterion: Any, h: int, w: int) -> tuple[int, int] | None:
    """The size at which the criterion's descriptor reads an h x w image (before any centre
    crop), or None when it does not say."""
    emb = getattr(getattr(criterion, "index", None), "embedder", None)
    fn = getattr(emb, "input_size", None) or getattr(criterion, "input_size", None)
    return None if fn is None else tuple(int(v) for v in fn(h, w))


def latent_factor(model: Any) -> int:
    """Pixels per latent pixel of a latent model (its VAE's scale factor)."""
    f = getattr(model, "vae_scale_factor", None)
    if f:
        return int(f)
    return max(1, int(getattr(model, "resolution", model.latent_shape[-1]))
               // int(model.latent_shape[-1]))


class CheckImage:
    """x0_hat -> the image AMG's criterion reads: full VAE or tiny decoder, full size or the
    descriptor's (module docstring)."""

    def __init__(self, decoder: str | None = None, decoder_sha256: str | None = None,
                 size: str = "full") -> None:
        if size not in CHECK_SIZES:
            raise UserError(f"unknown AMG check_size {size!r}; known: {', '.join(CHECK_SIZES)}")
        self.size = size
        self.tiny = None
        if decoder:
            from memaudit.models.tiny_decoder import TinyDecoder

            self.tiny = TinyDecoder.load(str(decoder), decoder_sha256)
        self._bound: int | None = None

    def bind(self, model: Any) -> None:
        """Check the tiny decoder against the model (once per model) and move it there."""
        if self.tiny is None or self._bound == id(model):
            return
        self.tiny.check(model)
        self.tiny.to(model.device)
        self._bound = id(model)

    def resized(self, model: Any, criterion: Any, x0: torch.Tensor) -> torch.Tensor:
        """x0_hat at the latent size that decodes to the descriptor's input size."""
        if self.size != "descriptor" or not getattr(model, "is_latent", True):
            return x0
        f = latent_factor(model)
        h, w = x0.shape[-2:]
        view = descriptor_input_size(criterion, h * f, w * f)
        if view is None:
            return x0
        lh, lw = max(1, round(view[0] / f)), max(1, round(view[1] / f))
        if (lh, lw) == (h, w) or lh > h or lw > w:
            return x0
        return F.interpolate(x0, size=(lh, lw), mode="bilinear", align_corners=False,
                             antialias=True)

    def __call__(self, model: Any, criterion: Any, x0: torch.Tensor) -> torch.Tensor:
        self.bind(model)
        z = self.resized(model, criterion, x0)
        return self.tiny.decode(z) if self.tiny is not None else model.decode(z)


class CheckSchedule:
    """Which rows are checked at a step (module docstring, `skip_margin`)."""

    def __init__(self, margin: float = 0.0, max_gap: int = 4) -> None:
        if margin < 0 or not math.isfinite(margin):
            raise UserError(f"AMG skip_margin must be >= 0 (0: check every step), got {margin}")
        if max_gap < 1:
            raise UserError(f"AMG skip_max_gap must be >= 1, got {max_gap}")
        self.margin, self.max_gap = float(margin), int(max_gap)

    def due(self, memory: dict[str, Any], index: int, b: int,
            always: torch.Tensor | None = None) -> torch.Tensor:
        """Bool [b]: rows to check at step `index` (`always`: rows that must be)."""
        nxt = memory.get(NEXT)
        if self.margin <= 0 or nxt is None:
            return torch.ones(b, dtype=torch.bool)
        due = nxt <= index
        return due | always if always is not None else due

    def after(self, memory: dict[str, Any], index: int, sigma: torch.Tensor, lam: float,
              checked: torch.Tensor) -> None:
        """Schedule the next check of the rows checked at step `index`."""
        if self.margin <= 0:
            return
        b = sigma.shape[0]
        nxt = memory.get(NEXT, torch.full((b,), index + 1, dtype=torch.long))
        below = (lam - sigma.double()) / self.margin
        gap = torch.nan_to_num(below.floor(), nan=1.0).clamp(1, self.max_gap).long()
        memory[NEXT] = torch.where(checked, index + gap, nxt)
