"""The diffusers Stable Diffusion 1.x / 2.x adapter (DESIGN.md "Core abstractions"; issue 3).

Wraps any `StableDiffusionPipeline` folder or cached hub id as a `Denoiser`: CLIP text-encoder
hidden states as the condition, the UNet as eps predictor (v-prediction models are converted
to eps, so every guidance sees eps; METHODS.md 0), the VAE as decoder. SDXL extends it
(memaudit/models/sdxl.py).
"""

from __future__ import annotations

import torch

from memaudit.common import UserError
from memaudit.models.cond import Cond
from memaudit.models.families import (  # noqa: F401 - re-exported
    HASHED_COMPONENTS,
    WEIGHT_SUFFIXES,
    DiffusersDenoiser,
    hash_pipeline_weights,
)
from memaudit.models.prediction import EpsPrediction

PREDICTION_TYPES = ("epsilon", "v_prediction")


class StableDiffusionDenoiser(DiffusersDenoiser):
    """Stable Diffusion (1.x / 2.x) through diffusers. Use `StableDiffusionDenoiser.load`."""

    pipeline_class = "StableDiffusionPipeline"
    required = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    family = "sd"
    is_latent = True
    default_guidance_scale = 7.5
    default_steps = 50

    def setup(self, resolution: int | None) -> None:
        self.unet = self.pipe.unet
        self.text_encoder = self.pipe.text_encoder
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"{self.name}: prediction_type {self.prediction_type!r} is not "
                            f"supported ({' or '.join(PREDICTION_TYPES)})")
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else int(size[0])
        res = self.resolution_from(resolution, size)
        side = res // self.vae_scale_factor
        self.latent_shape = (int(self.unet.config.in_channels), side, side)
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        from diffusers import DDIMScheduler

        # the training schedule's abar_t: x0 estimate, gain and the v -> eps conversion
        self.prediction = EpsPrediction(
            DDIMScheduler.from_config(self.scheduler_config).alphas_cumprod)
        self._null: Cond | None = None
        # anisotropy's weights per family (SD 1.x / 2.x by text width and prediction type)
        # live with the score: memaudit/screen/anisotropy.py `family_weights`

    def attention_model(self) -> torch.nn.Module:
        return self.unet

    # --- conditioning ------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """emb: CLIP text-encoder last hidden states [B, L, D] (L = tokenizer max length,
        padded), as StableDiffusionPipeline.encode_prompt computes them (clip_skip None)."""
        tok = self.tokenizer(list(prompts), padding="max_length",
                             max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt")
        ids = tok.input_ids.to(self.device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(self.device)
        out = self.text_encoder(ids, attention_mask=mask)[0]
        return Cond(emb=out.to(self.dtype))

    def null_embedding(self, n: int) -> Cond:
        if self._null is None:
            self._null = self.encode_prompts([""])
        return self._null.expand(n)

    # --- denoising ---------------------------------------------------------------------
    def unet_kwargs(self, cond: Cond) -> dict:
        """The UNet's conditioning arguments (SDXL adds its added_cond_kwargs)."""
        return {"encoder_hidden_states": cond.emb.to(self.dtype)}

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """UNet forward in `dtype`, as float32 eps (v-prediction converted:
        eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t)."""
        out = self.unet(x_t.to(self.dtype), t, **self.unet_kwargs(cond)).sample
        return EpsPrediction.to_eps(out, x_t, self.prediction.alpha_bar(t),
                                    self.prediction_type)

    def make_scheduler(self, kind: str = "ddim"):
        """A fresh DDIM (eta 0 at step time) or DPM-Solver++ multistep scheduler built from the
        pipeline's scheduler config; prediction_type is forced to epsilon since `_eps`
        already converts v-prediction."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
        if kind not in classes:
            raise UserError(f"unknown scheduler {kind!r}; known: {', '.join(classes)}")
        return classes[kind].from_config(self.scheduler_config, prediction_type="epsilon")
