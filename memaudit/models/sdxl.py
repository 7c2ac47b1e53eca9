"""The diffusers SDXL adapter (Podell et al. 2023; issue 13): two CLIP text encoders, a pooled
embedding and micro-conditioning time ids, carried in the `Cond` as `emb` [B, 77, 2048],
`pooled` [B, 1280] and `time_ids` [B, 6] (the UNet's added_cond_kwargs).

Prompts are encoded by the pipeline's own `encode_prompt` (penultimate CLIP states of both
encoders, concatenated); the null condition is zeros when the pipeline forces zeros for the
empty prompt (SDXL base: `force_zeros_for_empty_prompt`), else the empty prompt's. The time
ids are (H, W, 0, 0, H, W) at the sampling resolution, as the pipeline's defaults give. The
refiner is not needed for an audit and is not supported.
"""

from __future__ import annotations

import torch

from memaudit.models.cond import Cond
from memaudit.models.diffusers_sd import StableDiffusionDenoiser


class SDXLDenoiser(StableDiffusionDenoiser):
    """SDXL base through diffusers. Use `SDXLDenoiser.load`."""

    pipeline_class = "StableDiffusionXLPipeline"
    required = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                "scheduler")
    load_kwargs = {}
    family = "sdxl"
    default_guidance_scale = 5.0  # the pipeline's default

    def setup(self, resolution: int | None) -> None:
        super().setup(resolution)
        size = self.resolution
        proj = int(self.pipe.text_encoder_2.config.projection_dim)
        self._time_ids = self.pipe._get_add_time_ids(
            (size, size), (0, 0), (size, size), dtype=torch.float32,
            text_encoder_projection_dim=proj).to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """emb, pooled from StableDiffusionXLPipeline.encode_prompt; time_ids per row."""
        emb, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts), device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False)
        n = emb.shape[0]
        return Cond(emb=emb.to(self.dtype), pooled=pooled.to(self.dtype),
                    time_ids=self._time_ids.expand(n, -1).clone())

    def null_embedding(self, n: int) -> Cond:
        if self._null is None:
            null = self.encode_prompts([""])
            if self.pipe.config.force_zeros_for_empty_prompt:
                null = null.map(torch.zeros_like, keys=("emb", "pooled"))
            self._null = null
        return self._null.expand(n)

    def unet_kwargs(self, cond: Cond) -> dict:
        return {"encoder_hidden_states": cond.emb.to(self.dtype),
                "added_cond_kwargs": {"text_embeds": cond.pooled.to(self.dtype),
                                      "time_ids": cond.time_ids.to(self.dtype)}}
