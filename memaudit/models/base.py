"""The `Denoiser` adapter interface (DESIGN.md, "Core abstractions").

An adapter wraps one model family (diffusers Stable Diffusion, the built-in canary) and
exposes exactly what the sampler and the guidances use: prompt encoding to a `Cond` (named
condition tensors, memaudit/models/cond.py), the null condition, a batched eps prediction,
decoding to images, and a fresh scheduler.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from memaudit.models.cond import Cond, as_cond


class Denoiser(ABC):
    """A text-conditional eps-prediction model plus its decoder and noise schedule.

    Attributes set by implementations:
      name: human-readable model id; model_hash: content hash of the weights (provenance);
      latent_shape: (C, H, W) of x_t; device, dtype;
      default_guidance_scale (s0), default_steps;
      is_latent: False for pixel-space models (decode is the identity up to range);
      screen_params: screening-score parameters calibrated for this model.
    """

    name: str
    model_hash: str
    latent_shape: tuple[int, int, int]
    device: torch.device
    dtype: torch.dtype = torch.float32
    default_guidance_scale: float = 7.5
    default_steps: int = 50
    is_latent: bool = True
    #: Screening-score parameters calibrated for this model, {score: {param: value}}
    #: (memaudit/screen; e.g. the anisotropy weights, METHODS 2.1); explicit ones override.
    screen_params: dict[str, dict[str, float]] = {}

    def __init__(self) -> None:
        self.unet_rows = 0  # rows evaluated by eps(); the sampler turns it into UNet calls

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """The condition of each prompt, a `Cond` of B rows on `device` (`emb`: the text-encoder
        states [B, L, D]; families add their other inputs, e.g. `pooled`)."""

    def null_embedding(self, n: int) -> Cond:
        """The condition of the empty prompt, repeated n times (e_u's condition)."""
        return as_cond(self.encode_prompts([""])).expand(n)

    @abstractmethod
    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """One batched forward of the noise predictor."""

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int,
            cond: Cond | torch.Tensor) -> torch.Tensor:
        """eps(x_t, t, cond), batched over rows; counts rows for the cost accounting. A bare
        tensor is taken as `Cond(emb=tensor)`."""
        if not torch.is_tensor(t):
            t = torch.tensor(t)
        t = t.to(self.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        self.unet_rows += x_t.shape[0]
        self.forward_calls = getattr(self, "forward_calls", 0) + 1  # batched passes (sampler)
        return self._eps(x_t, t, as_cond(cond))

    @abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model-space sample -> RGB images in [0, 1], [B, 3, H, W]; differentiable."""

    @abstractmethod
    def make_scheduler(self, kind: str = "ddim"):
        """A fresh diffusers scheduler of `kind` ("ddim" or "dpm") with this model's schedule."""

    def random_tokens(self, n: int, generator: torch.Generator) -> list[str]:
        """n random vocabulary tokens, decoded to text (for the `rta` perturbation)."""
        raise NotImplementedError(f"{type(self).__name__} has no tokenizer vocabulary")

    def attention_model(self) -> torch.nn.Module | None:
        """The diffusers model whose cross-attention layers screening may read (the
        `attention-entropy` score); None for families without cross-attention."""
        return None

    def alphas_cumprod(self, scheduler) -> torch.Tensor:
        return scheduler.alphas_cumprod.to(self.device, torch.float32)


def load_model(spec: str | Path, device: str | None = None) -> Denoiser:
    """`canary` (the shipped model), a canary folder, or a diffusers pipeline folder / hub id."""
    from memaudit.common import UserError, resolve_device

    device = resolve_device(device)
    spec = str(spec)
    path = Path(spec)
    if spec == "canary" or (path / "canary.json").exists():
        from memaudit.models.canary import CanaryDenoiser

        return CanaryDenoiser.load(None if spec == "canary" else path, device=device)
    if (path / "model_index.json").exists() or (not path.exists() and "/" in spec):
        from memaudit.models.diffusers_sd import StableDiffusionDenoiser

        return StableDiffusionDenoiser.load(spec, device=device)
    raise UserError(
        f"model {spec!r} not found: give 'canary', a canary folder (with canary.json) or a "
        "diffusers pipeline folder (with model_index.json) or hub id"
    )
