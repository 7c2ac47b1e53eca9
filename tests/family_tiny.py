"""Tiny randomly initialised pipelines of every supported family, for tests (no download).

Each is built from the real diffusers/transformers classes with toy sizes and saved with
`save_pretrained`, so tests load it back by path exactly as a user's checkpoint is loaded
(tests/sd_tiny.py does the same for SD 1.x). Images are 16x16; text encoders have 2 layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sd_tiny import WORDS, build_tiny_pipeline, write_tokenizer_files

FAMILY_BUILDERS = {}


def family(name):
    def deco(fn):
        FAMILY_BUILDERS[name] = fn
        return fn
    return deco


def clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_tokenizer_files(folder)
    return CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=16)


def clip_encoder(tokenizer, projection_dim: int | None = None, hidden: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
        projection_dim=projection_dim or hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)


def t5_pair(d_model: int = 32):
    """A T5 tokenizer (unigram over the test words and single letters) and a 1-layer encoder."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=8)
    enc = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_ff=37, d_kv=8,
                                  num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return tok, enc


def tiny_vae(latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16,
        layers_per_block=1, **kw)


@family("sd")
def build_sd(folder: Path) -> Path:
    return build_tiny_pipeline(folder)


@family("sdxl")
def build_sdxl(folder: Path) -> Path:
    """SDXL: two CLIP encoders (16 + 16 -> cross-attention 32), pooled 16, time ids."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(1)
    tok = clip_tokenizer(folder.parent / (folder.name + "_tok"))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                   beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(scaling_factor=0.13025), text_encoder=clip_encoder(tok),
        text_encoder_2=clip_encoder(tok, projection_dim=16), tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=sched)
    pipe.save_pretrained(folder)
    return folder


@family("sd3")
def build_sd3(folder: Path) -> Path:
    """SD3: MMDiT, CLIP-L/G stand-ins (pooled 16 + 16) and a T5 (d_model 32)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(2)
    tok = clip_tokenizer(folder.parent / (folder.name + "_tok"))
    t5_tok, t5 = t5_pair(32)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                     use_post_quant_conv=False),
        text_encoder=clip_encoder(tok, projection_dim=16), tokenizer=tok,
        text_encoder_2=clip_encoder(tok, projection_dim=16), tokenizer_2=tok,
        text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.save_pretrained(folder)
    return folder


@family("flux")
def build_flux(folder: Path, guidance_embeds: bool = True) -> Path:
    """FLUX.1 [dev]-like: guidance embedding, CLIP pooled 16, T5 32, 16 packed channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(3)
    tok = clip_tokenizer(folder.parent / (folder.name + "_tok"))
    t5_tok, t5 = t5_pair(32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 2, 2))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=sched,
        vae=tiny_vae(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                     use_post_quant_conv=False),
        text_encoder=clip_encoder(tok), tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok)
    pipe.save_pretrained(folder)
    return folder


def build_ddpm(folder: Path, classes: list[str] | None = None, null_class: bool = True,
               seed: int = 4) -> Path:
    """A pixel-space UNet2DModel (3x8x8, CIFAR-like DDPM schedule with clipping); with
    `classes`, class-conditional (`num_class_embeds`, one more row for the null class) and
    the class names written as `id2label` in unet/config.json."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    extra = {}
    if classes:
        extra = {"num_class_embeds": len(classes) + (1 if null_class else 0)}
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, **extra)
    if classes:
        unet.register_to_config(id2label={str(i): c for i, c in enumerate(classes)})
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(clip_sample=True)).save_pretrained(folder)
    return folder


@family("ddpm")
def build_ddpm_uncond(folder: Path) -> Path:
    return build_ddpm(folder)


@family("ddpm-class")
def build_ddpm_class(folder: Path) -> Path:
    return build_ddpm(folder, classes=["airplane", "cat", "dog"], seed=5)
