"""The diffusers Stable Diffusion adapter (DESIGN.md "Core abstractions"; issue 3).

Wraps any `StableDiffusionPipeline.from_pretrained` folder or hub id (SD 1.x and 2.x) as a
`Denoiser`: CLIP text-encoder hidden states as the condition, the UNet as eps predictor
(v-prediction models are converted to eps, so every guidance sees eps), the VAE as decoder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from memaudit.common import UserError, sha256_file
from memaudit.models.base import Denoiser
from memaudit.models.cond import Cond

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
HASHED_COMPONENTS = ("unet", "vae", "text_encoder")


def hash_pipeline_weights(folder: str | Path) -> str:
    """SHA-256 over the unet, vae and text-encoder weight files of a pipeline folder.

    Each file is hashed streaming; the result hashes the sorted lines `relative/path sha256`,
    so it changes when any weight byte changes and not when unrelated files do.
    """
    folder = Path(folder)
    lines = []
    for comp in HASHED_COMPONENTS:
        sub = folder / comp
        if not sub.is_dir():
            continue
        for f in sorted(sub.rglob("*")):
            if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES):
                lines.append(f"{f.relative_to(folder).as_posix()} {sha256_file(f)}")
    if not lines:
        raise UserError(f"{folder}: no unet/vae/text_encoder weight files to hash")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


class StableDiffusionDenoiser(Denoiser):
    """Stable Diffusion (1.x / 2.x) through diffusers. Use `StableDiffusionDenoiser.load`."""

    is_latent = True
    default_guidance_scale = 7.5
    default_steps = 50

    def __init__(self, pipe: Any, name: str, model_hash: str, device: str | torch.device,
                 dtype: torch.dtype, revision: str | None = None) -> None:
        super().__init__()
        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        self.scheduler_config = dict(pipe.scheduler.config)
        self.name = name
        self.model_hash = model_hash
        self.revision = revision
        self.device = torch.device(device)
        self.dtype = dtype
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"{name}: prediction_type {self.prediction_type!r} is not supported "
                            "(epsilon or v_prediction)")
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (int(self.unet.config.in_channels), int(h), int(w))
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        # the training schedule's abar_t, for the v -> eps conversion
        from diffusers import DDIMScheduler

        self._train_abar = DDIMScheduler.from_config(self.scheduler_config).alphas_cumprod.to(
            self.device, torch.float32)
        self._null: Cond | None = None
        # anisotropy weight of the official code: g2 = 2 for SD 1.x (CLIP ViT-L, 768-wide
        # states), 0.1 for SD 2.x (OpenCLIP ViT-H, 1024) (METHODS 2.1)
        width = int(getattr(self.text_encoder.config, "hidden_size", 768))
        self.screen_params = {"anisotropy": {"g2": 2.0 if width <= 768 else 0.1}}
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False)
            m.eval()

    @classmethod
    def load(cls, path_or_hub_id: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> StableDiffusionDenoiser:
        """Load a pipeline folder or hub id; fp16 on cuda, fp32 on cpu unless `dtype` is given.

        model_hash: SHA-256 of the unet/vae/text-encoder weights (`hash_pipeline_weights`);
        for a hub id the files of the resolved snapshot, whose revision is kept in `revision`.
        """
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as dlogging
        from transformers.utils import logging as tlogging

        spec = str(path_or_hub_id)
        path = Path(spec)
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        is_local = path.exists()
        if is_local and not path.is_dir():
            raise UserError(f"{spec}: not a diffusers pipeline folder")
        if is_local and not (path / "model_index.json").exists():
            raise UserError(f"{spec}: not a diffusers pipeline folder (no model_index.json)")
        if not is_local and (spec.startswith((".", "/", "~")) or spec.count("/") != 1):
            raise UserError(f"model folder {spec!r} not found")
        verbosity = dlogging.get_verbosity(), tlogging.get_verbosity()
        dlogging.disable_progress_bar()
        tlogging.disable_progress_bar()
        dlogging.set_verbosity_error()
        tlogging.set_verbosity_error()
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                spec, dtype=dtype, safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load Stable Diffusion pipeline {spec!r}: {first}") from e
        finally:
            dlogging.enable_progress_bar()
            tlogging.enable_progress_bar()
            dlogging.set_verbosity(verbosity[0])
            tlogging.set_verbosity(verbosity[1])
        for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipe, comp, None) is None:
                raise UserError(f"{spec}: pipeline has no {comp}")
        pipe.to(device)
        revision = None
        folder = path
        if not is_local:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(spec, local_files_only=True))
            revision = folder.name
        return cls(pipe, name=spec, model_hash=hash_pipeline_weights(folder), device=device,
                   dtype=dtype, revision=revision)

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
    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """UNet forward; v-prediction is converted: eps = sqrt(abar_t) v + sqrt(1-abar_t) x_t
        (Salimans & Ho 2022, v = sqrt(abar) eps - sqrt(1-abar) x0). Returns float32."""
        out = self.unet(x_t.to(self.dtype), t, encoder_hidden_states=cond.emb.to(self.dtype)).sample
        out = out.float()
        if self.prediction_type == "v_prediction":
            abar = self._train_abar[t.long()].view(-1, *([1] * (x_t.ndim - 1)))
            out = abar.sqrt() * out + (1 - abar).sqrt() * x_t.float()
        return out

    def attention_model(self) -> torch.nn.Module:
        return self.unet

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """VAE decode of latents / scaling_factor, mapped from [-1, 1] to [0, 1] (float32)."""
        img = self.vae.decode(x0.to(self.dtype) / self.scaling_factor).sample
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def make_scheduler(self, kind: str = "ddim"):
        """A fresh DDIM (eta 0 at step time) or DPM-Solver++ multistep scheduler built from the
        pipeline's scheduler config; prediction_type is forced to epsilon since `_eps`
        already converts v-prediction."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
        if kind not in classes:
            raise UserError(f"unknown scheduler {kind!r}; known: {', '.join(classes)}")
        return classes[kind].from_config(self.scheduler_config, prediction_type="epsilon")

    def random_tokens(self, n: int, generator: torch.Generator) -> list[str]:
        """n vocabulary tokens drawn uniformly (excluding special tokens), decoded to text."""
        special = set(self.tokenizer.all_special_ids)
        vocab = [i for i in range(len(self.tokenizer)) if i not in special]
        out: list[str] = []
        while len(out) < n:
            idx = int(torch.randint(len(vocab), (1,), generator=generator))
            text = self.tokenizer.decode([vocab[idx]]).strip()
            if text:
                out.append(text)
        return out
