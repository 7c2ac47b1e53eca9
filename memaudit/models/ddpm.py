"""Pixel-space DDPMs through diffusers: unconditional and class-conditional `UNet2DModel`
folders (`DDPMPipeline` / `DDIMPipeline`; Ho et al. 2020, Nichol & Dhariwal 2021; issue 13).

The UNet's output is converted to eps at the adapter (epsilon, v_prediction or sample; a
learned-variance output, 2C channels, keeps its first C), so every rule sees eps (METHODS.md
0). Conditions:
- unconditional (no class embedding): an empty `Cond`; a prompt's text is ignored, each
  (prompt, seed) row is one sample (`memaudit generate` without --prompts gives one empty
  prompt, so --seeds N is the count). No e_c and no e_u: only criterion-based rules (AMG's
  Gsim, `amg:sim`) and cfg (plain sampling) apply.
- class-conditional (`num_class_embeds`): `class_labels` [B]; a prompt is a class id ("3") or
  a class name from an `id2label` mapping in unet/config.json ({"0": "airplane", ...}). When
  the embedding has one row more than `id2label` names, that row is the null class (CFG
  training with label dropout, as DiT's) and is e_u's condition: transition rules and AMG's
  Gsim/Gspe apply. Without a null class there is no e_u (like the unconditional case).
Sampling uses DDIM (eta 0) or DPM-Solver++ on the folder's scheduler config; the default
scale is 1 (no CFG), what these pipelines give.
"""

from __future__ import annotations

import json

import torch

from memaudit.common import UserError
from memaudit.models.base import COND, UNCOND
from memaudit.models.cond import Cond
from memaudit.models.families import DiffusersDenoiser
from memaudit.models.prediction import EpsPrediction


class DDPMDenoiser(DiffusersDenoiser):
    """A UNet2DModel pipeline folder. Use `DDPMDenoiser.load`."""

    pipeline_class = "DiffusionPipeline"
    required = ("unet", "scheduler")
    family = "ddpm"
    is_latent = False
    default_guidance_scale = 1.0
    capabilities = frozenset()

    def setup(self, resolution: int | None) -> None:
        self.unet = self.pipe.unet
        cfg = self.unet.config
        self.vae_scale_factor = 1
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UserError(f"{self.name}: prediction_type {self.prediction_type!r} is not "
                            "supported (epsilon, v_prediction or sample)")
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else int(cfg.sample_size[0])
        res = self.resolution_from(resolution, size)
        self.latent_shape = (int(cfg.in_channels), res, res)
        self.learned_variance = int(cfg.out_channels) == 2 * int(cfg.in_channels)
        from diffusers import DDIMScheduler

        self.prediction = EpsPrediction(
            DDIMScheduler.from_config(self.scheduler_config).alphas_cumprod)
        self.num_classes = int(cfg.num_class_embeds or 0)
        if cfg.class_embed_type is not None and not self.num_classes:
            raise UserError(f"{self.name}: class_embed_type {cfg.class_embed_type!r} without "
                            "num_class_embeds is not supported")
        self.labels: dict[str, int] = {}
        self.null_class: int | None = None
        if self.num_classes:
            raw = self._raw_unet_config().get("id2label") or {}
            self.labels = {str(name).strip().lower(): int(i) for i, name in raw.items()}
            if raw and self.num_classes == len(raw) + 1:
                self.null_class = len(raw)
            self.capabilities = frozenset({COND} | ({UNCOND} if self.null_class is not None
                                                   else set()))
        else:
            self.notes = ["unconditional model: prompt text is ignored; each (prompt, seed) "
                          "is one sample"]

    def _raw_unet_config(self) -> dict:
        """unet/config.json as written (diffusers drops keys it does not know, e.g. id2label)."""
        f = self.folder / "unet" / "config.json" if self.folder is not None else None
        return json.loads(f.read_text()) if f is not None and f.exists() else {}

    # --- conditioning ---------------------------------------------------------------------
    def class_id(self, prompt: str) -> int:
        """A prompt as a class id: an integer in range, or an `id2label` name."""
        text = prompt.strip()
        if text.lstrip("-").isdigit():
            k = int(text)
        elif text.lower() in self.labels:
            k = self.labels[text.lower()]
        else:
            names = ", ".join(sorted(self.labels)[:8]) or "(none: give class ids)"
            raise UserError(f"{self.name}: {prompt!r} is not a class id or name; names: {names}")
        top = self.num_classes - (1 if self.null_class is not None else 0)
        if not 0 <= k < top:
            raise UserError(f"{self.name}: class {k} out of range 0..{top - 1}")
        return k

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """class_labels [B] (long) for a class-conditional model; an empty Cond otherwise."""
        if not self.num_classes:
            return Cond(batch=len(prompts))
        ids = [self.class_id(p) for p in prompts]
        return Cond(class_labels=torch.tensor(ids, dtype=torch.long, device=self.device))

    def null_embedding(self, n: int) -> Cond:
        if not self.num_classes:
            return Cond(batch=n)
        if self.null_class is None:
            raise UserError(f"{self.name}: no null class (no unconditional prediction)")
        return Cond(class_labels=torch.full((n,), self.null_class, dtype=torch.long,
                                            device=self.device))

    # --- denoising ------------------------------------------------------------------------
    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        out = self.unet(x_t.to(self.dtype), t, class_labels=cond.get("class_labels")).sample
        if self.learned_variance:
            out = out[:, : x_t.shape[1]]
        return EpsPrediction.to_eps(out, x_t, self.prediction.alpha_bar(t),
                                    self.prediction_type)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pixels -> [0, 1] RGB (a grey channel repeated); differentiable."""
        img = (x0.float() / 2 + 0.5).clamp(0, 1)
        return img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img

    def make_scheduler(self, kind: str = "ddim"):
        """DDIM (eta 0) or DPM-Solver++ multistep on the folder's schedule, eps-prediction
        (`_eps` converts)."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
        if kind not in classes:
            raise UserError(f"unknown scheduler {kind!r}; known: {', '.join(classes)}")
        return classes[kind].from_config(self.scheduler_config, prediction_type="epsilon")
