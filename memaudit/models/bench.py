"""What the mitigations cost at real size (issue 13): `python -m memaudit.models.bench`.

Compute does not depend on the weights, so the full-size denoiser architectures are built
with random weights: the SD 1.5 UNet (64x64 latents at 512), the SDXL UNet (128x128 at 1024),
the SD3-medium MMDiT; a one-layer CLIP (and no T5, whose 256 zero tokens SD3 then receives,
as the pipeline does without it) stands in where only prompt encoding would differ; the VAE
(decoder) is full size. AMG's criterion is an SSCD-size descriptor: torchvision ResNet-50 +
GeM (p = 3) + linear 2048 -> 512 at 288 px (short edge), random weights, cosine to 1,000
random unit vectors, offset so that it always fires (the worst case: every step decodes,
differentiates and batches a Gdup row).

Two measurements, interleaved with cfg so the machine's load hits both alike, timed in CPU
seconds of the process (one thread: what the work costs, whatever else shares the machine;
`--clock wall` for wall time):
- components (median of --repeats): one cfg step (the denoiser on 2 rows), one wen iteration
  (forward + backward of 1 row to the embedding), AMG's similarity step (x0 estimate, VAE
  decode, descriptor, gradient to x_t: `AMG.similarity` itself) with and without the
  gradient, the final VAE decode;
- per image at --steps (small) through the real sampler, for cfg and each method, with the
  UNet rows the sampler counts.
The per-image cost at the family's default steps is projected from the components:
cfg = dynamic = S step + decode; amg = S (step + Gdup row + similarity) + decode when it fires
on every step (the worst case), amg-quiet = S (step + similarity forward) + decode when it never
fires (AMG runs the backward only on steps where a row fires); wen = cfg + one null row + I
iterations (I = wen's max_iters, its worst case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from memaudit.models.cond import Cond

METHODS = ("cfg", "dynamic", "amg", "wen")


# --- the architectures, random weights ------------------------------------------------------
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


def _vae(latent_channels: int = 4, **kw):
    """The SD / SDXL / SD3 autoencoder architecture (4 levels, 128-512 channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, **kw)


def build_sd15(resolution: int = 512):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from memaudit.models.diffusers_sd import StableDiffusionDenoiser

    tok = _tokenizer()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(tok, 768), tokenizer=tok,
                                   unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionDenoiser(pipe, "sd15-random", "random", "cpu", torch.float32,
                                   resolution=resolution)


def build_sdxl(resolution: int = 1024):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from memaudit.models.sdxl import SDXLDenoiser

    tok = _tokenizer()
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                   beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025), text_encoder=_clip(tok, 768),
        text_encoder_2=_clip(tok, 1280, projection=1280), tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=sched)
    return SDXLDenoiser(pipe, "sdxl-random", "random", "cpu", torch.float32,
                        resolution=resolution)


def build_sd3(resolution: int = 1024):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from memaudit.models.flow import SD3Denoiser

    tok = _tokenizer()
    transformer = SD3Transformer2DModel(  # SD3-medium
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                 use_post_quant_conv=False),
        text_encoder=_clip(tok, 768, projection=768), tokenizer=tok,
        text_encoder_2=_clip(tok, 1280, projection=1280), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)
    return SD3Denoiser(pipe, "sd3-medium-random", "random", "cpu", torch.float32,
                       resolution=resolution)


ARCHS = {"sd15": (build_sd15, 512, 50), "sdxl": (build_sdxl, 1024, 50),
         "sd3": (build_sd3, 1024, 28)}


class DescriptorCriterion:
    """SSCD-size descriptor over a random 1,000-vector index (see the module docstring)."""

    higher_is_more_similar = True
    calibrated_threshold = None
    name = "sscd-size"

    def __init__(self, size: int = 288, n_index: int = 1000, offset: float = 0.6) -> None:
        import torchvision

        g = torch.Generator().manual_seed(0)
        trunk = torchvision.models.resnet50(weights=None)
        self.trunk = torch.nn.Sequential(*list(trunk.children())[:-2]).eval().requires_grad_(False)
        self.proj = torch.nn.Linear(2048, 512).requires_grad_(False)
        self.vectors = torch.nn.functional.normalize(torch.randn(n_index, 512, generator=g), dim=1)
        self.size, self.offset, self.index = size, offset, self
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def group_caption(self, gid: int) -> str:
        return "a photo"

    def similarity_tensor(self, images: torch.Tensor):
        h, w = images.shape[-2:]
        scale = self.size / min(h, w)
        x = torch.nn.functional.interpolate(images, size=(round(h * scale), round(w * scale)),
                                            mode="bilinear", align_corners=False)
        f = self.trunk((x - self.mean) / self.std).clamp_min(1e-6)
        f = f.pow(3).mean(dim=(2, 3)).pow(1 / 3)  # GeM, p = 3
        d = torch.nn.functional.normalize(self.proj(f), dim=1)
        sims = d @ self.vectors.T
        best, ids = sims.max(dim=1)
        return best + self.offset, ids


# --- measurements ------------------------------------------------------------------------
def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine with one thread the
    CPU time is what the work costs, the wall time also counts the other jobs' share."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def components(model: Any, crit: DescriptorCriterion, repeats: int,
               only: list[str] | None = None, amg_px: int | None = None
               ) -> dict[str, dict[str, float]]:
    """{"cpu": .., "wall": ..}: median seconds of the per-step and per-image parts (module
    docstring), interleaved;
    `only` names a subset; `amg_px` decodes AMG's x0 estimate at that image size (a latent
    resized to amg_px / 8: what decoding at the descriptor's size would cost)."""
    from memaudit.guidance import make_guidance
    from memaudit.guidance.base import StepState

    x = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    sched = model.scheduler(None, 50)
    t = sched.timesteps[10]
    with torch.no_grad():
        emb_c, emb_u = model.encode_prompts(["a photo"]), model.null_embedding(1)
    both = Cond.cat([emb_u, emb_c])
    amg = make_guidance("amg")

    def step():
        with torch.no_grad():
            model.eps(torch.cat([x, x]), t, both)

    def wen_iter():
        e = emb_c.emb.detach().float().clone().requires_grad_(True)
        model.eps(x, t, emb_c.replace(emb=e)).norm().backward()

    xs = x
    if amg_px:
        f = model.resolution // model.latent_shape[-1]
        xs = torch.nn.functional.interpolate(x, size=(amg_px // f, amg_px // f),
                                             mode="bilinear", align_corners=False)
    state = StepState(index=10, num_steps=50, t=t, u=float(t) / 1000, x_t=xs,
                      alpha_bar=model.prediction.alpha_bar(t), s0=7.5, model=model,
                      criterion=crit)

    def similarity():  # a step where a row fires: forward and the gradient to x_t
        amg.similarity(state, torch.zeros_like(xs), True)[2]()

    def similarity_fwd():  # a step where none fires: the forward only
        amg.similarity(state, torch.zeros_like(xs), True)

    def decode():
        with torch.no_grad():
            model.decode(x)

    parts = {"step_s": step, "wen_iter_s": wen_iter, "similarity_s": similarity,
             "similarity_fwd_s": similarity_fwd, "decode_s": decode}
    parts = {k: fn for k, fn in parts.items() if not only or k in only}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in parts}
    for r in range(repeats):
        for k, fn in parts.items():
            times[k].append(_timed(fn))
            print(f"  repeat {r}: {k} wall {times[k][-1][0]:.2f} cpu {times[k][-1][1]:.2f}",
                  flush=True)
    return {clock: {k: statistics.median(x[i] for x in v) for k, v in times.items()}
            for i, clock in enumerate(("wall", "cpu"))}


def sampled(model: Any, crit: DescriptorCriterion, steps: int, methods: list[str],
            wen_iters: int) -> dict[str, dict[str, float]]:
    """Per image through the real sampler: cfg before every method (interleaved)."""
    from memaudit.guidance import make_guidance
    from memaudit.sampler import sample

    out: dict[str, dict[str, float]] = {}
    for name in methods:
        for label in (["cfg"] if name == "cfg" else ["cfg", name]):
            g = make_guidance(label, **({"max_iters": wen_iters} if label == "wen" else {}))
            c = time.process_time()
            res = sample(model, ["a photo"], [0], g, steps=steps, guidance_scale=7.5,
                         criterion=crit if g.needs_criterion else None)
            rec = out.setdefault(label, {"wall_s": [], "cpu_s": [], "unet_rows": res.unet_rows})
            rec["wall_s"].append(res.wall_seconds)
            rec["cpu_s"].append(time.process_time() - c)
    return {k: {"wall_s": statistics.median(v["wall_s"]), "cpu_s": statistics.median(v["cpu_s"]),
                "unet_rows": v["unet_rows"]} for k, v in out.items()}


def project(c: dict[str, float], steps: int, wen_iters: int) -> dict[str, dict[str, float]]:
    """Per-image seconds and UNet rows at `steps` from the components (worst cases)."""
    cfg = steps * c["step_s"] + c["decode_s"]
    amg = steps * (1.5 * c["step_s"] + c["similarity_s"]) + c["decode_s"]
    amg_quiet = steps * (c["step_s"] + c["similarity_fwd_s"]) + c["decode_s"]
    wen = cfg + 0.5 * c["step_s"] + wen_iters * c["wen_iter_s"]
    rows = {"cfg": 2 * steps, "dynamic": 2 * steps, "amg": 3 * steps, "amg-quiet": 2 * steps,
            "wen": 2 * steps + 1 + (wen_iters + 1)}
    secs = {"cfg": cfg, "dynamic": cfg, "amg": amg, "amg-quiet": amg_quiet, "wen": wen}
    return {k: {"seconds": secs[k], "ratio": secs[k] / cfg, "unet_rows": rows[k]}
            for k in secs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    ap.add_argument("--resolution", type=int, default=None, help="default: the family's")
    ap.add_argument("--steps", type=int, default=2, help="sampler steps of the per-image runs")
    ap.add_argument("--project-steps", type=int, default=None,
                    help="steps of the projection (default: the family's, 50 / 28 for SD3)")
    ap.add_argument("--repeats", type=int, default=3, help="component repeats (median)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="methods run through the sampler (empty: components only)")
    ap.add_argument("--wen-iters", type=int, default=10, help="wen's max_iters")
    ap.add_argument("--parts", default="", help="components to measure (default: all), e.g. "
                    "step_s,similarity_s,similarity_fwd_s")
    ap.add_argument("--amg-decode-px", type=int, default=None,
                    help="decode AMG's x0 estimate at this size (default: the full image)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="what the ratios and projections use: CPU seconds of this process "
                    "(right for --threads 1 on a shared machine) or wall seconds")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    build, res0, steps0 = ARCHS[args.arch]
    t0 = time.perf_counter()
    model = build(args.resolution or res0)
    crit = DescriptorCriterion()
    print(f"{args.arch}: built in {time.perf_counter() - t0:.0f} s, latents "
          f"{model.latent_shape}, {args.threads} thread(s)", flush=True)
    comp = components(model, crit, args.repeats, [p for p in args.parts.split(",") if p],
                      args.amg_decode_px)
    for clock, vals in comp.items():
        print(f"components ({clock} s): " + ", ".join(f"{k} {v:.2f}" for k, v in vals.items()),
              flush=True)
    result: dict[str, Any] = {"arch": args.arch, "resolution": model.resolution,
                              "latent_shape": list(model.latent_shape),
                              "threads": args.threads, "amg_decode_px": args.amg_decode_px,
                              "clock": args.clock, "components": comp}
    methods = [m for m in args.methods.split(",") if m]
    if methods:
        runs = sampled(model, crit, args.steps, methods, args.wen_iters)
        result["sampled"] = {"steps": args.steps, **runs}
        key = f"{args.clock}_s"
        base = runs["cfg"][key]
        for k, v in runs.items():
            print(f"  {args.steps} steps, {k}: {v[key]:.1f} {args.clock} s/image "
                  f"({v[key] / base:.2f}x cfg), {v['unet_rows']:g} UNet rows", flush=True)
    comp = comp[args.clock]
    steps = args.project_steps or steps0
    if methods and set(comp) >= {"step_s", "similarity_s", "similarity_fwd_s", "decode_s",
                                 "wen_iter_s"}:
        result["projected_at_sampled_steps"] = project(comp, args.steps, args.wen_iters)
    if not {"step_s", "similarity_s", "similarity_fwd_s", "decode_s", "wen_iter_s"} <= set(comp):
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return result  # a subset of the components: no projection
    proj = project(comp, steps, args.wen_iters)
    result["projected"] = {"steps": steps, **proj}
    for k, v in proj.items():
        print(f"  projected at {steps} steps, {k}: {v['seconds']:.0f} {args.clock} s/image "
              f"({v['ratio']:.2f}x cfg), {v['unet_rows']:g} UNet rows")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
