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
AMG's check is timed per variant (`--variants`, issue 21): `vae` (the full VAE at the
image's size: similarity_s / similarity_fwd_s), `vae-desc` (the full VAE at the descriptor's
288 px: `check_size = descriptor`), `tiny` and `tiny-desc` (a TAESD-architecture
AutoencoderTiny, random weights, saved and loaded by path as `--amg-decoder` loads it).
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
import time
from pathlib import Path
from typing import Any

import torch

from memaudit.models.bench_archs import (  # noqa: F401 - the bench's architectures
    ARCHS,
    DescriptorCriterion,
    build_sd3,
    build_sd15,
    build_sdxl,
    tiny_decoder_dir,
)
from memaudit.models.cond import Cond

METHODS = ("cfg", "dynamic", "amg", "wen")
#: AMG check variants: name -> AMG parameters (TINY: the random TAESD folder)
TINY = "<tiny>"
VARIANTS = {"vae": {}, "vae-desc": {"check_size": "descriptor"}, "tiny": {"decoder": TINY},
            "tiny-desc": {"decoder": TINY, "check_size": "descriptor"}}
def part_names(variant: str) -> tuple[str, str]:
    """(firing, quiet) component names of a check variant (`vae`: the issue-13 names)."""
    tag = "" if variant == "vae" else "_" + variant.replace("-", "_")
    return f"similarity{tag}_s", f"similarity{tag}_fwd_s"


# --- measurements ------------------------------------------------------------------------
def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine with one thread the
    CPU time is what the work costs, the wall time also counts the other jobs' share. On a
    GPU the queue is synchronised before and after (wall is then the figure)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t, c = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - t, time.process_time() - c


def components(model: Any, crit: DescriptorCriterion, repeats: int,
               only: list[str] | None = None, amg_px: int | None = None,
               variants: tuple[str, ...] = ("vae",)) -> dict[str, dict[str, float]]:
    """{"cpu": .., "wall": ..}: median seconds of the per-step and per-image parts (module
    docstring), interleaved; `only` names a subset; `variants` the AMG check variants
    (VARIANTS); `amg_px` (issue 13) decodes the `vae` variant's x0 estimate from a latent
    resized to amg_px / 8."""
    from memaudit.guidance import make_guidance
    from memaudit.guidance.base import StepState

    x = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0)).to(
        model.device)
    sched = model.scheduler(None, 50)
    t = sched.timesteps[10]
    with torch.no_grad():
        emb_c, emb_u = model.encode_prompts(["a photo"]), model.null_embedding(1)
    both = Cond.cat([emb_u, emb_c])
    tiny = tiny_decoder_dir(model.latent_shape[0]) if any("tiny" in v for v in variants) \
        else None

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

    def checks(variant: str):
        kw = {k: (str(tiny) if v == TINY else v) for k, v in VARIANTS[variant].items()}
        amg = make_guidance("amg", **kw)
        xv = xs if variant == "vae" else x
        state = StepState(index=10, num_steps=50, t=t, u=float(t) / 1000, x_t=xv,
                          alpha_bar=model.prediction.alpha_bar(t), s0=7.5, model=model,
                          criterion=crit)

        def firing():  # a step where a row fires: forward and the gradient to x_t
            amg.similarity(state, torch.zeros_like(xv), True)[2]()

        def quiet():  # a step where none fires: the forward only
            amg.similarity(state, torch.zeros_like(xv), True)

        return dict(zip(part_names(variant), (firing, quiet), strict=True))

    def decode():
        with torch.no_grad():
            model.decode(x)

    parts = {"step_s": step, "wen_iter_s": wen_iter}
    for v in variants:
        parts.update(checks(v))
    parts["decode_s"] = decode
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
    """Per-image seconds and UNet rows at `steps` from the components (worst cases): for
    every check variant measured, amg (fires every step) and amg-quiet (never fires); the
    `vae` variant keeps the names amg / amg-quiet, the others add `[variant]`."""
    cfg = steps * c["step_s"] + c["decode_s"]
    secs = {"cfg": cfg, "dynamic": cfg}
    rows = {"cfg": 2 * steps, "dynamic": 2 * steps}
    for v in VARIANTS:
        fire, quiet = part_names(v)
        if fire not in c or quiet not in c:
            continue
        tag = "" if v == "vae" else f"[{v}]"
        secs["amg" + tag] = steps * (1.5 * c["step_s"] + c[fire]) + c["decode_s"]
        secs["amg-quiet" + tag] = steps * (c["step_s"] + c[quiet]) + c["decode_s"]
        rows["amg" + tag], rows["amg-quiet" + tag] = 3 * steps, 2 * steps
    if "wen_iter_s" in c:
        secs["wen"] = cfg + 0.5 * c["step_s"] + wen_iters * c["wen_iter_s"]
        rows["wen"] = 2 * steps + 1 + (wen_iters + 1)
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
                    help="decode the vae variant's x0 estimate at this size (issue 13)")
    ap.add_argument("--variants", default="vae", help="AMG check variants timed: vae, "
                    "vae-desc, tiny, tiny-desc (comma-separated; issue 21)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (64 px, descriptor at 32 "
                    "px): a smoke run of the code path, no figure")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="what the ratios and projections use: CPU seconds of this process "
                    "(right for --threads 1 on a shared machine) or wall seconds")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    build, res0, steps0 = ARCHS[args.arch]
    t0 = time.perf_counter()
    model = build(args.resolution or (64 if args.tiny else res0), tiny=args.tiny)
    crit = DescriptorCriterion(size=32 if args.tiny else 288)
    print(f"{args.arch}: built in {time.perf_counter() - t0:.0f} s, latents "
          f"{model.latent_shape}, {args.threads} thread(s)", flush=True)
    variants = tuple(v for v in args.variants.split(",") if v)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {', '.join(bad)}; known: {', '.join(VARIANTS)}")
    comp = components(model, crit, args.repeats, [p for p in args.parts.split(",") if p],
                      args.amg_decode_px, variants)
    for clock, vals in comp.items():
        print(f"components ({clock} s): " + ", ".join(f"{k} {v:.2f}" for k, v in vals.items()),
              flush=True)
    result: dict[str, Any] = {"arch": args.arch, "resolution": model.resolution,
                              "latent_shape": list(model.latent_shape),
                              "threads": args.threads, "amg_decode_px": args.amg_decode_px,
                              "variants": list(variants),
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
    if not {"step_s", "decode_s"} <= set(comp):
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return result  # without a step and the decode: no projection
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
