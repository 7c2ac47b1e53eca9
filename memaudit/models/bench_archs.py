"""Full-size (and, for smoke runs, toy-size) architectures with random weights for the
real-size cost benchmarks (memaudit/models/bench.py, memaudit/bench/gpu.py; issues 13, 21).

Compute does not depend on the weights: the SD 1.5 UNet, the SDXL UNet, the SD3-medium MMDiT
and the full SD VAE (4 levels, 128-512 channels) are built as published; a 2-layer CLIP (and
no T5) stands in where only prompt encoding would differ. `tiny=True` gives the same classes
at toy sizes (64 px images, 8x VAE) for `--smoke`. `tiny_decoder_dir` saves a TAESD-architecture
AutoencoderTiny; `DescriptorCriterion` is an SSCD-size descriptor (ResNet-50 + GeM + linear
2048 -> 512) over random unit vectors, offset so that AMG always fires.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

#: each family's TAESD un-scaling (taesd, taesdxl: 1 / 0; taesd3; taef1)
TAESD_SCALING = {4: (1.0, 0.0), 16: (1.5305, 0.0609)}


def tiny_decoder_dir(latent_channels: int) -> Path:
    """A TAESD-architecture AutoencoderTiny (64 channels, 3-3-3-1 decoder blocks, 8x) with
    random weights, saved in a temporary folder as a user's taesd folder is."""
    from diffusers import AutoencoderTiny

    sf, shift = TAESD_SCALING.get(latent_channels, (1.0, 0.0))
    folder = Path(tempfile.mkdtemp(prefix="memaudit-bench-taesd-"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderTiny(latent_channels=latent_channels, scaling_factor=sf,
                        shift_factor=shift).save_pretrained(folder)
    return folder


def _tokenizer(max_len: int = 77):
    """A character-level CLIP tokenizer (prompt encoding is not what is measured)."""
    from transformers import CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder = Path(tempfile.mkdtemp(prefix="memaudit-bench-tok-"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                         model_max_length=max_len)


def _clip(tok, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden,
                         num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=77,
                         projection_dim=projection or hidden, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _vae(latent_channels: int = 4, tiny: bool = False, **kw):
    """The SD / SDXL / SD3 autoencoder architecture (4 levels, 128-512 channels; 8x)."""
    from diffusers import AutoencoderKL

    size = {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1,
            "norm_num_groups": 4} if tiny else {"block_out_channels": (128, 256, 512, 512),
                                                "layers_per_block": 2}
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, **size, **kw)


def _denoiser(cls, pipe, name: str, resolution: int, device: str, dtype: torch.dtype):
    """The adapter over a built pipeline, its denoiser and text encoders in `dtype` on
    `device` (the VAE float32, as the adapters keep it)."""
    pipe.to(device)
    for comp in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, comp, None)
        if m is not None and dtype != torch.float32:
            m.to(dtype)
    return cls(pipe, name, "random", device, dtype, resolution=resolution)


def build_sd15(resolution: int = 512, device: str = "cpu", dtype: torch.dtype = torch.float32,
               tiny: bool = False):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from memaudit.models.diffusers_sd import StableDiffusionDenoiser

    tok = _tokenizer()
    hidden = 32 if tiny else 768
    unet = UNet2DConditionModel(  # SD 1.5 (defaults), or a toy one
        sample_size=resolution // 8, cross_attention_dim=hidden, attention_head_dim=8,
        **({"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")} if tiny else {}))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_vae(tiny=tiny), text_encoder=_clip(tok, hidden),
                                   tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return _denoiser(StableDiffusionDenoiser, pipe, "sd15-random", resolution, device, dtype)


def build_sdxl(resolution: int = 1024, device: str = "cpu", dtype: torch.dtype = torch.float32,
               tiny: bool = False):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from memaudit.models.sdxl import SDXLDenoiser

    tok = _tokenizer()
    h1, h2, t_dim = (16, 16, 8) if tiny else (768, 1280, 256)
    arch = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": 1, "attention_head_dim": 8} if tiny else {
        "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20)}
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, cross_attention_dim=h1 + h2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=t_dim,
        projection_class_embeddings_input_dim=6 * t_dim + h2, **arch)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                   beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025, tiny=tiny), text_encoder=_clip(tok, h1),
        text_encoder_2=_clip(tok, h2, projection=h2), tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=sched)
    return _denoiser(SDXLDenoiser, pipe, "sdxl-random", resolution, device, dtype)


def build_sd3(resolution: int = 1024, device: str = "cpu", dtype: torch.dtype = torch.float32,
              tiny: bool = False):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from memaudit.models.flow import SD3Denoiser

    tok = _tokenizer()
    h1, h2 = (16, 16) if tiny else (768, 1280)
    arch = {"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2,
            "joint_attention_dim": 32, "caption_projection_dim": 16,
            "pos_embed_max_size": 16} if tiny else {  # SD3-medium
        "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
        "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pos_embed_max_size": 192}
    transformer = SD3Transformer2DModel(sample_size=resolution // 8, patch_size=2,
                                        in_channels=16, out_channels=16,
                                        pooled_projection_dim=h1 + h2, **arch)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, tiny=tiny, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(tok, h1, projection=h1), tokenizer=tok,
        text_encoder_2=_clip(tok, h2, projection=h2), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)
    return _denoiser(SD3Denoiser, pipe, "sd3-medium-random", resolution, device, dtype)


ARCHS = {"sd15": (build_sd15, 512, 50), "sdxl": (build_sdxl, 1024, 50),
         "sd3": (build_sd3, 1024, 28)}


class DescriptorCriterion:
    """SSCD-size descriptor over a random 1,000-vector index (see the module docstring)."""

    higher_is_more_similar = True
    calibrated_threshold = None
    name = "sscd-size"

    def __init__(self, size: int = 288, n_index: int = 1000, offset: float = 0.6,
                 device: str = "cpu") -> None:
        import torchvision

        g = torch.Generator().manual_seed(0)
        trunk = torchvision.models.resnet50(weights=None)
        self.trunk = torch.nn.Sequential(*list(trunk.children())[:-2]).eval() \
            .requires_grad_(False).to(device)
        self.proj = torch.nn.Linear(2048, 512).requires_grad_(False).to(device)
        self.vectors = torch.nn.functional.normalize(torch.randn(n_index, 512, generator=g),
                                                     dim=1).to(device)
        self.size, self.offset, self.index = size, offset, self
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def group_caption(self, gid: int) -> str:
        return "a photo"

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """Short edge to `size`, as the SSCD embedder (AMG's check_size = descriptor)."""
        s = self.size
        return (s, round(w * s / h)) if h <= w else (round(h * s / w), s)

    def similarity_tensor(self, images: torch.Tensor):
        h, w = images.shape[-2:]
        x = torch.nn.functional.interpolate(images, size=self.input_size(h, w),
                                            mode="bilinear", align_corners=False)
        f = self.trunk((x - self.mean) / self.std).clamp_min(1e-6)
        f = f.pow(3).mean(dim=(2, 3)).pow(1 / 3)  # GeM, p = 3
        d = torch.nn.functional.normalize(self.proj(f), dim=1)
        sims = d @ self.vectors.T
        best, ids = sims.max(dim=1)
        return best + self.offset, ids
