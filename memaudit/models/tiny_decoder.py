"""A tiny distilled decoder for AMG's per-step check (issue 21): diffusers' `AutoencoderTiny`
(TAESD, Ollin Boer Bohan 2023: `taesd` for SD 1/2, `taesdxl` for SDXL, `taesd3` for SD3,
`taef1` for FLUX.1), about 1.2 M decoder parameters against the full VAE decoder's 49 M.

It decodes the model-space x0 estimate the way the family's pipeline decodes latents with
that VAE swapped in (`pipe.vae = AutoencoderTiny...`): z = x0 / scaling_factor + shift_factor
with the tiny VAE's own config (SD3's and FLUX's TAESDs carry their family's scaling and
shift; SD/SDXL's are 1 and 0), then `decode(z)` in [-1, 1] mapped to [0, 1]. FLUX's latents
are already unpacked ([16, H, W]) where AMG reads them (memaudit/models/flow.py). It is used
only for AMG's similarity and its gradient; the image a run keeps is always the model's own
VAE decode. Loaded from a folder the user names (`config.json` + weights, diffusers format)
or a hub id already in the local Hugging Face cache (never downloaded); the SHA-256 of the
weights file is recorded with AMG's parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from memaudit.common import UserError, sha256_file

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def resolve_decoder_folder(spec: str) -> Path:
    """A local folder with config.json, or a hub id resolved in the local cache only."""
    path = Path(spec).expanduser()
    if path.exists():
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise UserError(f"AMG decoder {spec}: not an AutoencoderTiny folder (config.json "
                            "and diffusion_pytorch_model.safetensors, as save_pretrained writes)")
        return path.resolve()
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(f"AMG decoder {spec!r} not found")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any hub error is one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load AMG decoder {spec!r} (not in the local Hugging Face "
                        f"cache; `huggingface-cli download {spec}` first): {first}") from e
    return resolve_decoder_folder(str(folder))


class TinyDecoder:
    """An `AutoencoderTiny` decoder, float32, as AMG's check decoder. Use `TinyDecoder.load`."""

    def __init__(self, vae: Any, folder: Path, sha256: str, spec: str) -> None:
        self.vae = vae.requires_grad_(False).eval()
        self.folder, self.sha256, self.spec = folder, sha256, spec
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.scaling_factor = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        blocks = list(getattr(cfg, "num_decoder_blocks", (3, 3, 3, 1)))
        self.upscale = int(cfg.upsampling_scaling_factor) ** (len(blocks) - 1)

    @classmethod
    def load(cls, spec: str, sha256: str | None = None) -> TinyDecoder:
        """Load a folder or cached hub id on the CPU; `sha256` (when given) must match."""
        folder = resolve_decoder_folder(str(spec))
        weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
        if weights is None:
            raise UserError(f"AMG decoder {spec}: no {' or '.join(WEIGHT_NAMES)} in {folder}")
        digest = sha256_file(weights)
        if sha256 and sha256 != digest:
            raise UserError(f"AMG decoder {weights} has SHA-256 {digest}, expected {sha256}")
        from diffusers import AutoencoderTiny

        from memaudit.models.families import quiet_loading

        with quiet_loading():
            try:
                vae = AutoencoderTiny.from_pretrained(str(folder), dtype=torch.float32)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"cannot load AutoencoderTiny {spec!r}: {first}") from e
        return cls(vae, folder, digest, str(spec))

    def check(self, model: Any) -> None:
        """One-line error unless this decoder reads `model`'s latents at its VAE's scale."""
        family = getattr(model, "family", type(model).__name__)
        if not getattr(model, "is_latent", True) or getattr(model, "vae", None) is None:
            raise UserError(f"--amg-decoder applies to latent models; {family} model "
                            f"{getattr(model, 'name', '')} samples in pixel space")
        channels = int(model.latent_shape[0])
        if channels != self.latent_channels:
            raise UserError(f"AMG decoder {self.spec} reads {self.latent_channels}-channel "
                            f"latents, the {family} model's have {channels} (taesd / taesdxl: "
                            "4 channels, taesd3 / taef1: 16)")
        factor = int(getattr(model, "vae_scale_factor", self.upscale))
        if factor != self.upscale:
            raise UserError(f"AMG decoder {self.spec} upsamples {self.upscale}x, the {family} "
                            f"model's VAE {factor}x")

    def to(self, device: torch.device | str) -> TinyDecoder:
        self.vae.to(device)
        return self

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model-space latents [B, C, h, w] -> images [B, 3, 8h, 8w] in [0, 1], float32,
        differentiable (the pipeline's un-scaling with the tiny VAE's config)."""
        z = x0.float() / self.scaling_factor + self.shift_factor
        img = self.vae.decode(z).sample
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def describe(self) -> dict[str, Any]:
        return {"decoder": str(self.folder), "sha256": self.sha256,
                "latent_channels": self.latent_channels, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor}
