"""diffusers pipelines as `Denoiser`s: the family registry and what every family adapter shares.

A pipeline folder (or a hub id already in the local Hugging Face cache) is dispatched on its
`model_index.json` `_class_name` to the family's adapter (FAMILIES). `DiffusersDenoiser` holds
what the adapters share: loading quietly with one-line errors, the weight hash, LoRA loading
(memaudit/models/lora.py), the float32 VAE and its decode, the resolution and random tokens.

Precision: the denoiser and text encoders run in `dtype` (default: the family's half dtype on
CUDA, fp32 on the CPU); the VAE always runs in float32 (AMG's gradient goes through it, and
SD/SDXL VAEs overflow in fp16); every prediction is returned as float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from memaudit.common import UserError, sha256_file
from memaudit.models.base import Denoiser
from memaudit.models.lora import combined_hash, load_loras

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
HASHED_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2",
                     "text_encoder_3")

#: model_index.json `_class_name` -> "module:Adapter"
FAMILIES = {
    "StableDiffusionPipeline": "memaudit.models.diffusers_sd:StableDiffusionDenoiser",
    "StableDiffusionXLPipeline": "memaudit.models.sdxl:SDXLDenoiser",
    "StableDiffusion3Pipeline": "memaudit.models.flow:SD3Denoiser",
    "FluxPipeline": "memaudit.models.flow:FluxDenoiser",
    "DDPMPipeline": "memaudit.models.ddpm:DDPMDenoiser",
    "DDIMPipeline": "memaudit.models.ddpm:DDPMDenoiser",
}


def hash_pipeline_weights(folder: str | Path) -> str:
    """SHA-256 over the weight files of the denoiser, VAE and text encoders of a pipeline folder.

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
        raise UserError(f"{folder}: no unet/transformer/vae/text_encoder weight files to hash")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def resolve_folder(spec: str | Path) -> tuple[Path, str | None]:
    """(pipeline folder, revision): a local folder (revision None), or a hub id resolved in the
    local Hugging Face cache only (its snapshot's revision). Never downloads."""
    spec = str(spec)
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{spec}: not a diffusers pipeline folder")
        if not (path / "model_index.json").exists():
            raise UserError(f"{spec}: not a diffusers pipeline folder (no model_index.json)")
        return path, None
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(f"model folder {spec!r} not found")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any hub error is one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load pipeline {spec!r} (not in the local Hugging Face "
                        f"cache): {first}") from e
    if not (folder / "model_index.json").exists():
        raise UserError(f"cannot load pipeline {spec!r}: its snapshot has no model_index.json")
    return folder, folder.name


def pipeline_class_name(folder: Path) -> str:
    try:
        return str(json.loads((folder / "model_index.json").read_text())["_class_name"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder}/model_index.json: unreadable ({e})") from e


def null_components(folder: Path) -> list[str]:
    """Components the folder's model_index.json lists as null ([null, null]: saved from a
    pipeline loaded with that component None, e.g. SD3 with `text_encoder_3=None`)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}/model_index.json: unreadable ({e})") from e
    return sorted(k for k, v in index.items() if not k.startswith("_") and
                  (v is None or (isinstance(v, list) and all(x is None for x in v))))


def load_pipeline(spec: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, loras: list[str] | None = None,
                  resolution: int | None = None) -> Denoiser:
    """The family adapter of a pipeline folder or cached hub id, loaded."""
    folder, _ = resolve_folder(spec)
    cls_name = pipeline_class_name(folder)
    if cls_name not in FAMILIES:
        raise UserError(f"{spec}: pipeline class {cls_name} is not supported; supported: "
                        f"{', '.join(sorted(FAMILIES))}")
    module, attr = FAMILIES[cls_name].split(":")
    adapter = getattr(importlib.import_module(module), attr)
    return adapter.load(spec, device=device, dtype=dtype, loras=loras or [],
                        resolution=resolution)


@contextlib.contextmanager
def quiet_loading():
    """No progress bars or warnings from diffusers/transformers while a pipeline loads."""
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    verbosity = dlogging.get_verbosity(), tlogging.get_verbosity()
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    dlogging.set_verbosity_error()
    tlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.enable_progress_bar()
        tlogging.enable_progress_bar()
        dlogging.set_verbosity(verbosity[0])
        tlogging.set_verbosity(verbosity[1])


class DiffusersDenoiser(Denoiser):
    """What the diffusers family adapters share. Subclasses set `pipeline_class`, `family`,
    `required` components, `cuda_dtype` and implement `setup`, `encode_prompts`, `_eps`,
    `make_scheduler`."""

    pipeline_class: ClassVar[str] = "DiffusionPipeline"
    required: ClassVar[tuple[str, ...]] = ("vae", "scheduler")
    load_kwargs: ClassVar[dict[str, Any]] = {}
    #: what an absent (null) component means for the family, noted when it is absent
    absent_notes: ClassVar[dict[str, str]] = {}
    cuda_dtype: ClassVar[torch.dtype] = torch.float16

    def __init__(self, pipe: Any, name: str, model_hash: str, device: str | torch.device,
                 dtype: torch.dtype, revision: str | None = None,
                 loras: list[dict[str, Any]] | None = None,
                 resolution: int | None = None, folder: Path | None = None) -> None:
        super().__init__()
        self.pipe = pipe
        self.folder = folder
        self.vae = getattr(pipe, "vae", None)
        self.tokenizer = getattr(pipe, "tokenizer", None)
        self.scheduler_config = dict(pipe.scheduler.config)
        self.name = name
        self.base_hash = model_hash
        self.loras = list(loras or [])
        self.model_hash = combined_hash(model_hash, self.loras)
        self.revision = revision
        self.device = torch.device(device)
        self.dtype = dtype
        for m in pipe.components.values():
            if isinstance(m, torch.nn.Module):
                m.requires_grad_(False)
                m.eval()
        if self.vae is not None:
            if self.vae.dtype != torch.float32:
                with quiet_loading():
                    self.vae.to(torch.float32)
            self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.setup(resolution)

    def setup(self, resolution: int | None) -> None:
        """Family specifics after loading: latent_shape, prediction, capabilities, ..."""

    @classmethod
    def load(cls, path_or_hub_id: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None, loras: list[str] | None = None,
             resolution: int | None = None) -> DiffusersDenoiser:
        """Load a pipeline folder or cached hub id of this family (half dtype `cuda_dtype` on
        CUDA, fp32 on the CPU unless `dtype` is given), with LoRAs `PATH[:SCALE]`.

        model_hash: SHA-256 of the weights (`hash_pipeline_weights`; for a hub id the files of
        the resolved snapshot, whose revision is kept in `revision`), with the LoRAs' hashes.
        """
        import diffusers

        spec = str(path_or_hub_id)
        folder, revision = resolve_folder(spec)
        device = torch.device(device)
        if dtype is None:
            dtype = cls.cuda_dtype if device.type == "cuda" else torch.float32
        pipe_cls = getattr(diffusers, cls.pipeline_class)
        # diffusers wants a component the folder lists as null passed as None explicitly
        absent = null_components(folder)
        with quiet_loading():
            try:
                pipe = pipe_cls.from_pretrained(
                    str(folder), dtype=dtype, **{**{c: None for c in absent}, **cls.load_kwargs})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"cannot load {cls.pipeline_class} {spec!r}: {first}") from e
            for comp in cls.required:
                if getattr(pipe, comp, None) is None:
                    raise UserError(f"{spec}: pipeline has no {comp}")
            pipe.to(device)
            records = load_loras(pipe, list(loras or []))
        model = cls(pipe, name=spec, model_hash=hash_pipeline_weights(folder), device=device,
                    dtype=dtype, revision=revision, loras=records, resolution=resolution,
                    folder=folder)
        missing = [c for c in absent if c not in getattr(pipe_cls, "_optional_components", [])
                   and c not in cls.load_kwargs]
        if missing:
            model.notes.append(f"saved without {', '.join(missing)} (null in model_index.json)")
            model.notes += [cls.absent_notes[c].format(model=model) for c in missing
                            if c in cls.absent_notes]
        return model

    # --- shared pieces ------------------------------------------------------------------------
    def resolution_from(self, resolution: int | None, default_sample_size: int) -> int:
        """Image side in pixels: `resolution`, else the pipeline's default; a multiple of
        the latent grid."""
        res = int(resolution or default_sample_size * self.vae_scale_factor)
        step = self.vae_scale_factor * getattr(self, "latent_multiple", 1)
        if res < step or res % step:
            raise UserError(f"resolution {res} must be a positive multiple of {step}")
        self.resolution = res
        return res

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """VAE decode (float32) of the latents un-normalised the way the pipeline does
        (latents_mean/std, or / scaling_factor + shift_factor), mapped to [0, 1]."""
        cfg = self.vae.config
        z = x0.float()
        sf = float(getattr(cfg, "scaling_factor", 0.18215) or 1.0)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            view = (1, -1, 1, 1)
            z = z * torch.tensor(std, device=z.device).view(view) / sf + \
                torch.tensor(mean, device=z.device).view(view)
        else:
            z = z / sf + float(getattr(cfg, "shift_factor", None) or 0.0)
        img = self.vae.decode(z.to(self.vae.dtype)).sample
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def random_tokens(self, n: int, generator: torch.Generator) -> list[str]:
        """n vocabulary tokens of the (first) tokenizer drawn uniformly (no special tokens),
        decoded to text."""
        if self.tokenizer is None:
            return super().random_tokens(n, generator)
        if not hasattr(self, "_vocab_ids"):
            special = set(self.tokenizer.all_special_ids)
            self._vocab_ids = [i for i in range(len(self.tokenizer)) if i not in special]
        out: list[str] = []
        while len(out) < n:
            idx = int(torch.randint(len(self._vocab_ids), (1,), generator=generator))
            text = self.tokenizer.decode([self._vocab_ids[idx]]).strip()
            if text:
                out.append(text)
        return out
