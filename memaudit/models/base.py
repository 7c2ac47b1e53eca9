"""The `Denoiser` adapter interface (DESIGN.md "Core abstractions"; docs/generate.md "The
Denoiser contract").

An adapter wraps one model family (diffusers SD 1/2, SDXL, SD3, FLUX, DDPM/UNet2DModel, the
built-in canary) and exposes exactly what the sampler and the guidances use: prompt encoding
to a `Cond` (named condition tensors, memaudit/models/cond.py), the null condition, a batched
prediction in the family's guidance space (`eps`: eps for DDPM-style families, whatever the
network predicts converted at the adapter; velocity for flow matching, METHODS.md 0), the x0
estimate and guidance gain of that prediction (memaudit/models/prediction.py), decoding to
images, the family's scheduler, and what the family can do (`capabilities`), against which a
guidance's `requires` is checked before any work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from memaudit.models.cond import Cond, as_cond

# --- capabilities: what a family can do (checked against Guidance.requires) -------------------
TEXT = "text"  # conditions come from text prompts (prompt rewrites, text embeddings, captions)
COND = "cond"  # the prediction depends on a condition (an e_c distinct from e_u)
UNCOND = "uncond"  # an unconditional prediction e_u to guide from (null prompt or null class)
DISTILLED = "distilled"  # guidance-distilled: e_u is the null prompt through it ("true CFG")
CAPABILITIES = {
    TEXT: "text prompts",
    COND: "a conditional prediction (a prompt or a class)",
    UNCOND: "an unconditional prediction e_u to guide from (a null prompt or null class)",
    DISTILLED: "guidance distillation",
}

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """`fp16` / `bf16` / `fp32` (or a torch dtype, or None for the family's default)."""
    from memaudit.common import UserError

    if value is None or isinstance(value, torch.dtype):
        return value
    if str(value).lower() not in DTYPES:
        raise UserError(f"unknown dtype {value!r}; known: fp32, fp16, bf16")
    return DTYPES[str(value).lower()]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        dtype, str(dtype))


class Denoiser(ABC):
    """A conditional denoiser plus its decoder, schedule and capabilities.

    Attributes set by implementations:
      name; model_hash: content hash of the weights (with any LoRA, provenance); family;
      latent_shape: (C, H, W) of x_t; device; dtype (the denoiser's; the VAE stays float32);
      default_guidance_scale (s0), default_steps, default_scheduler, schedulers (kinds);
      is_latent: False for pixel-space models; capabilities (see CAPABILITIES);
      prediction: EpsPrediction or FlowPrediction (what `eps` returns; x0 and gain);
      loras: [{"path", "sha256", "scale"}]; notes: lines a run prints and records;
      screen_params: screening-score parameters calibrated for this model.
    """

    name: str
    model_hash: str
    family: str = "unknown"
    latent_shape: tuple[int, int, int]
    device: torch.device
    dtype: torch.dtype = torch.float32
    default_guidance_scale: float = 7.5
    default_steps: int = 50
    default_scheduler: str = "ddim"
    schedulers: tuple[str, ...] = ("ddim", "dpm")
    is_latent: bool = True
    capabilities: frozenset[str] = frozenset({TEXT, COND, UNCOND})
    #: Screening-score parameters calibrated for this model, {score: {param: value}}
    #: (memaudit/screen; e.g. the anisotropy weights, METHODS 2.1); explicit ones override.
    screen_params: dict[str, dict[str, float]] = {}

    def __init__(self) -> None:
        self.unet_rows = 0  # rows evaluated by eps(); the sampler turns it into UNet calls
        self.loras: list[dict[str, Any]] = []
        self.notes: list[str] = []

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """The condition of each prompt, a `Cond` of B rows on `device` (`emb`: the text-encoder
        states [B, L, D]; families add their other inputs, e.g. `pooled`)."""

    def null_embedding(self, n: int) -> Cond:
        """The condition of the empty prompt, repeated n times (e_u's condition)."""
        return as_cond(self.encode_prompts([""])).expand(n)

    @abstractmethod
    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """One batched forward of the denoiser, converted to the guidance space (float32)."""

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int,
            cond: Cond | torch.Tensor) -> torch.Tensor:
        """The prediction in the family's guidance space (eps, or velocity for flow matching)
        at (x_t, t, cond), batched over rows, float32; counts rows for the cost accounting.
        A bare tensor is taken as `Cond(emb=tensor)`."""
        if not torch.is_tensor(t):
            t = torch.tensor(t)
        t = t.to(self.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        self.unet_rows += x_t.shape[0]
        self.forward_calls = getattr(self, "forward_calls", 0) + 1  # batched passes (sampler)
        return self._eps(x_t, t, as_cond(cond))

    # --- what the prediction means (memaudit/models/prediction.py) ---------------------------
    @property
    def prediction(self) -> Any:
        """EpsPrediction or FlowPrediction; an adapter that sets none is eps-prediction over
        its default scheduler's abar_t."""
        p = self.__dict__.get("_prediction")
        if p is None:
            from memaudit.models.prediction import EpsPrediction

            p = EpsPrediction(self.make_scheduler(self.default_scheduler).alphas_cumprod)
            self._prediction = p
        return p

    @prediction.setter
    def prediction(self, value: Any) -> None:
        self._prediction = value

    def x0_estimate(self, x_t: torch.Tensor, pred: torch.Tensor,
                    t: torch.Tensor | int) -> torch.Tensor:
        """x0_hat from x_t and a prediction `pred` of `eps` (differentiable in x_t), float32."""
        return self.prediction.x0(x_t, pred, t)

    def guidance_gain(self, t: torch.Tensor | int) -> torch.Tensor:
        """AMG's Gsim gain at t: sqrt(1 - abar_t) for eps, sigma / (1 - sigma)^2 for v (0 at
        sigma = 1; memaudit/models/prediction.py)."""
        return self.prediction.gain(t)

    @abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model-space sample -> RGB images in [0, 1], [B, 3, H, W] float32; differentiable."""

    @abstractmethod
    def make_scheduler(self, kind: str = "ddim"):
        """A fresh diffusers scheduler of `kind` (one of `schedulers`) with this model's
        schedule."""

    def scheduler(self, kind: str | None, steps: int):
        """A fresh scheduler of `kind` (None: the family's default) with `steps` timesteps set
        the way the family's own pipeline sets them."""
        from memaudit.common import UserError

        kind = kind or self.default_scheduler
        if kind not in self.schedulers:
            raise UserError(f"scheduler {kind!r} does not apply to {self.family} model "
                            f"{self.name}; known: {', '.join(self.schedulers)}")
        sched = self.make_scheduler(kind)
        self.set_timesteps(sched, steps)
        return sched

    def set_timesteps(self, sched: Any, steps: int) -> None:
        """Set `steps` timesteps on a fresh scheduler (families whose pipeline passes more,
        e.g. FLUX's sigmas and shift, override this)."""
        sched.set_timesteps(steps, device=self.device)

    def random_tokens(self, n: int, generator: torch.Generator) -> list[str]:
        """n random vocabulary tokens, decoded to text (for the `rta` perturbation)."""
        raise NotImplementedError(f"{type(self).__name__} has no tokenizer vocabulary")

    def provenance(self) -> dict[str, Any]:
        """What a run records about the model (generations.parquet, the runs row)."""
        return {"name": self.name, "family": self.family, "model_hash": self.model_hash,
                "dtype": dtype_name(self.dtype), "prediction": self.prediction.kind,
                "capabilities": sorted(self.capabilities), "loras": list(self.loras),
                "notes": list(self.notes)}
    def attention_model(self) -> torch.nn.Module | None:
        """The diffusers model whose cross-attention layers screening may read (the
        `attention-entropy` score); None for families without cross-attention."""
        return None

    def alphas_cumprod(self, scheduler) -> torch.Tensor:
        return scheduler.alphas_cumprod.to(self.device, torch.float32)


def load_model(spec: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
               loras: list[str] | None = None, resolution: int | None = None) -> Denoiser:
    """`canary` (the shipped model), a canary folder, or a diffusers pipeline folder / cached hub
    id of a supported family (memaudit.models.families). dtype: fp32 / fp16 / bf16 (default:
    the family's on CUDA, fp32 on the CPU); loras: `PATH[:SCALE]` specs; resolution: image
    side in pixels (default: the pipeline's)."""
    from memaudit.common import UserError, resolve_device

    device = resolve_device(device)
    dtype = parse_dtype(dtype)
    spec = str(spec)
    path = Path(spec)
    if spec == "canary" or (path / "canary.json").exists():
        from memaudit.models.canary import CanaryDenoiser

        if loras:
            raise UserError("--lora applies to diffusers pipelines, not to the canary")
        return CanaryDenoiser.load(None if spec == "canary" else path, device=device,
                                   dtype=dtype)
    if (path / "model_index.json").exists() or (not path.exists() and "/" in spec):
        from memaudit.models.families import load_pipeline

        return load_pipeline(spec, device=device, dtype=dtype, loras=loras or [],
                             resolution=resolution)
    raise UserError(
        f"model {spec!r} not found: give 'canary', a canary folder (with canary.json) or a "
        "diffusers pipeline folder (with model_index.json) or hub id"
    )
