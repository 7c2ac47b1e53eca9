"""Flow-matching transformer families: SD3 / SD3.5 (MMDiT; Esser et al. 2024) and FLUX.1
(Black Forest Labs 2024) through diffusers (issue 13; METHODS.md 0).

x_t = (1 - sigma) x0 + sigma n and the transformer predicts v = n - x0; the adapter keeps the
velocity (`FlowPrediction`: x0_hat = x_t - sigma v, sigma = t / 1000), so CFG is taken on v
(linear: the same in any parameterisation), while every magnitude is the noise prediction's,
||(1 - sigma)(v_c - v_u)||, and switch points are matched to Stable Diffusion's by SNR
(METHODS.md 0; memaudit/models/prediction.py). The scheduler is the pipeline's
FlowMatchEulerDiscreteScheduler with its timesteps set as the pipeline sets them (shift, and
FLUX's resolution-dependent mu).
Conditions: SD3 `emb` = [CLIP-L | CLIP-G padded ; T5] states, `pooled` = both CLIP pooled
outputs (an SD3 saved without T5, `text_encoder_3=None`, has zeros for the T5 states and a
77-token prompt limit, said in the model's notes); FLUX `emb` = T5 states, `pooled` = CLIP
pooled; both through the pipeline's own `encode_prompt`. FLUX latents live unpacked as
[C, H, W] in the sampler and are packed into 2x2 patches at the transformer only.

FLUX.1 is guidance-distilled: its distilled guidance scale (default 3.5, FluxPipeline's) is
embedded, and it has no trained unconditional branch. memaudit evaluates the null prompt
through it as e_u ("true CFG", FluxPipeline's `true_cfg_scale` with negative_prompt "") and
says so in the model's notes; the default s0 = 1 samples what the pipeline gives by default.
"""

from __future__ import annotations

import numpy as np
import torch

from memaudit.common import UserError
from memaudit.models.base import COND, DISTILLED, TEXT, UNCOND
from memaudit.models.cond import Cond
from memaudit.models.families import DiffusersDenoiser
from memaudit.models.prediction import FlowPrediction


class FlowDenoiser(DiffusersDenoiser):
    """What SD3 and FLUX share: the transformer, velocity prediction, the Euler scheduler."""

    cuda_dtype = torch.bfloat16
    schedulers = ("euler",)
    default_scheduler = "euler"
    default_steps = 28
    max_sequence_length = 256

    def setup(self, resolution: int | None) -> None:
        self.transformer = self.pipe.transformer
        self.text_encoder = self.pipe.text_encoder
        self.prediction = FlowPrediction(self.scheduler_config.get("num_train_timesteps", 1000))
        self._null: Cond | None = None

    def make_scheduler(self, kind: str = "euler"):
        """A fresh FlowMatchEulerDiscreteScheduler from the pipeline's scheduler config."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if kind != "euler":
            raise UserError(f"unknown scheduler {kind!r} for {self.family}; known: euler")
        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)

    def image_seq_len(self) -> int:
        raise NotImplementedError

    def mu(self, max_shift: float) -> float:
        """The resolution-dependent shift of the pipeline (calculate_shift)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.scheduler_config
        return calculate_shift(self.image_seq_len(), c.get("base_image_seq_len", 256),
                               c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                               c.get("max_shift", max_shift))

    def null_embedding(self, n: int) -> Cond:
        if self._null is None:
            self._null = self.encode_prompts([""])
        return self._null.expand(n)


class SD3Denoiser(FlowDenoiser):
    """Stable Diffusion 3 / 3.5 through diffusers. Use `SD3Denoiser.load`."""

    pipeline_class = "StableDiffusion3Pipeline"
    required = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                "tokenizer_2", "scheduler")
    family = "sd3"
    default_guidance_scale = 7.0  # the pipeline's default
    capabilities = frozenset({TEXT, COND, UNCOND})
    absent_notes = {"text_encoder_3": (
        "no T5 encoder: prompts are read by the two CLIP encoders only, "
        "{model.pipe.tokenizer.model_max_length}-token prompt limit (longer prompts are cut); "
        "the T5 part of the condition is zeros, as StableDiffusion3Pipeline does")}

    def setup(self, resolution: int | None) -> None:
        super().setup(resolution)
        self.patch_size = int(self.transformer.config.patch_size)
        self.latent_multiple = self.patch_size
        side = self.resolution_from(resolution, int(self.transformer.config.sample_size)) \
            // self.vae_scale_factor
        self.latent_shape = (int(self.transformer.config.in_channels), side, side)

    def image_seq_len(self) -> int:
        return (self.latent_shape[1] // self.patch_size) * (self.latent_shape[2] // self.patch_size)

    def set_timesteps(self, sched, steps: int) -> None:
        """As StableDiffusion3Pipeline sets them (mu when dynamic shifting is on)."""
        mu = {"mu": self.mu(1.16)} if self.scheduler_config.get("use_dynamic_shifting") else {}
        sched.set_timesteps(steps, device=self.device, **mu)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """emb [B, 77 + max_sequence_length, D], pooled [B, P] by the pipeline's encode_prompt
        (the null condition is the empty prompt's, as the pipeline's negative default)."""
        emb, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return Cond(emb=emb.to(self.dtype), pooled=pooled.to(self.dtype))

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The velocity (float32) of the MMDiT at timestep t = sigma * 1000."""
        return self.transformer(hidden_states=x_t.to(self.dtype), timestep=t.float(),
                                encoder_hidden_states=cond.emb.to(self.dtype),
                                pooled_projections=cond.pooled.to(self.dtype),
                                return_dict=False)[0].float()


class FluxDenoiser(FlowDenoiser):
    """FLUX.1 [dev] / [schnell] through diffusers. Use `FluxDenoiser.load`."""

    pipeline_class = "FluxPipeline"
    required = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                "tokenizer_2", "scheduler")
    family = "flux"
    default_guidance_scale = 1.0  # true-CFG scale: 1 = what FluxPipeline gives by default
    capabilities = frozenset({TEXT, COND, UNCOND, DISTILLED})
    max_sequence_length = 512
    distilled_guidance = 3.5  # FluxPipeline's guidance_scale, embedded when guidance_embeds

    def setup(self, resolution: int | None) -> None:
        super().setup(resolution)
        self.latent_multiple = 2
        res = self.resolution_from(resolution, int(getattr(self.pipe, "default_sample_size",
                                                           128)))
        side = 2 * (res // (self.vae_scale_factor * 2))
        self.latent_shape = (int(self.transformer.config.in_channels) // 4, side, side)
        self._img_ids = self.pipe._prepare_latent_image_ids(1, side // 2, side // 2,
                                                            self.device, self.dtype)
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        self.notes = [
            "guidance-distilled model: e_u is the empty prompt through the distilled model "
            "(true CFG, as FluxPipeline's true_cfg_scale with negative_prompt ''); "
            + (f"distilled guidance {self.distilled_guidance} embedded"
               if self.guidance_embeds else "no guidance embedding")]

    def image_seq_len(self) -> int:
        return (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)

    def set_timesteps(self, sched, steps: int) -> None:
        """As FluxPipeline sets them: sigmas linspace(1, 1/N, N), shifted by mu."""
        if sched.config.get("use_flow_sigmas"):
            sched.set_timesteps(steps, device=self.device, mu=self.mu(1.15))
        else:
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=self.device,
                                mu=self.mu(1.15))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """emb: T5 states [B, max_sequence_length, D], pooled: CLIP pooled [B, P]
        (FluxPipeline.encode_prompt)."""
        emb, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        return Cond(emb=emb.to(self.dtype), pooled=pooled.to(self.dtype))

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity (float32): pack 2x2 patches, transformer at t / 1000 with the distilled
        guidance embedded, unpack."""
        b, c, h, w = x_t.shape
        packed = self.pipe._pack_latents(x_t.to(self.dtype), b, c, h, w)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full([b], self.distilled_guidance, device=self.device,
                                  dtype=torch.float32)
        text_ids = torch.zeros(cond.emb.shape[1], 3, device=self.device, dtype=self.dtype)
        out = self.transformer(hidden_states=packed, timestep=t.to(self.dtype) / 1000,
                               guidance=guidance, pooled_projections=cond.pooled.to(self.dtype),
                               encoder_hidden_states=cond.emb.to(self.dtype), txt_ids=text_ids,
                               img_ids=self._img_ids, return_dict=False)[0]
        return self.pipe._unpack_latents(out, h * self.vae_scale_factor,
                                         w * self.vae_scale_factor,
                                         self.vae_scale_factor).float()
