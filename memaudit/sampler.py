"""The guided sampler: owns the timestep loop, batches UNet calls, asks a `Guidance` for eps_hat.

Modelled on k-diffusion's separation of samplers from denoiser wrappers (with a callback) and
on diffusers schedulers' `step()`. METHODS.md section 3: "eps_hat is what the scheduler step
receives"; the baseline `cfg` is eps_hat = e_u + s0 (e_c - e_u).

Contract (what every guidance may rely on; memaudit/guidance/base.py):

* The model. `model.eps` returns the prediction in the family's guidance space (eps for
  DDPM-style families, velocity for flow matching: METHODS.md 0), float32; "eps" below means
  that prediction. `check_supported(guidance, model)` runs first: a method needing a capability
  the model lacks (text, a condition, an unconditional branch) is a one-line error.
* Rows. One row per (prompt, seed) pair. x_T of a row is
  `torch.randn(model.latent_shape, generator=torch.Generator("cpu").manual_seed(seed))`
  (times the scheduler's `init_noise_sigma`), then moved to the device, so a row's result
  does not depend on the batch it is in. `batch_size` < B processes the rows in chunks, each
  chunk with its own fresh scheduler (`model.scheduler(kind, steps)`: the family's scheduler
  with timesteps set as its pipeline sets them; kind None = the family's default, DDIM for
  DDPM-style families, flow-matching Euler for SD3/FLUX) and its own `state.memory`.
* Conditions are `Cond`s (memaudit/models/cond.py: named tensors sharing the batch
  dimension; `emb` the text states, plus whatever the family needs), never bare tensors.
* Before the loop (per chunk): `prompts = guidance.prepare_prompts(prompts, seeds, model)`;
  `emb_c = model.encode_prompts(prompts)`; `emb_u = model.null_embedding(B)`;
  `emb_c, emb_u = guidance.prepare_embeddings(emb_c, emb_u, x_T, seeds, model, t0)` with t0
  the first timestep, then `x_T = guidance.prepare_noise(x_T, emb_c, emb_u, seeds, model, t0)`
  (both called with gradients enabled; results are detached; x_T is the sample as the sampler
  holds it, before `scale_model_input`, the identity for DDIM and DPM-Solver; it keeps its shape).
* Step j (t = scheduler.timesteps[j], T = num_train_timesteps): a `StepState` with index=j,
  num_steps, t (scalar tensor), u = t / T (for flow matching t = sigma T, so u = sigma),
  x_t = scheduler.scale_model_input(x, t) (x where the scheduler has none),
  alpha_bar = abar_t (scalar; None for flow matching: use `state.x0_hat(pred)` and
  `state.gain()`, which ask the model), s0 = guidance_scale, model, criterion, emb_u, emb_c,
  memory (one dict persisting across the steps of a chunk), prompts (after prepare_prompts),
  seeds.
  `extra = guidance.extra_conditions(state)` (name -> a `Cond` like emb_c); then ONE batched
  `model.eps(cat([x_t] * (2 + len(extra))), t, Cond.cat([emb_u, emb_c, *extra.values()]))`
  under `torch.no_grad()`; `state.e_u`, `state.e_c`, `state.extra[name]` get the chunks.
  A model without an unconditional branch (unconditional DDPMs, class-conditional ones
  without a null class) skips the e_u rows: e_u = e_c, so cfg is plain conditional sampling.
  `eps_hat, trace = guidance.guide(state)` runs with gradients enabled (a guidance needing
  gradients, e.g. AMG, builds them itself: the UNet outputs carry no graph). Then
  `x = scheduler.step(eps_hat, t, x).prev_sample` (DDIM: eta = 0; flow matching: Euler on v).
  `callback(j, state, eps_hat)`.
* Trace: per step a dict with `t` (int), `u` (float; sigma for flow matching) and per-sample
  lists of length B: `guidance_norm` = the noise-prediction magnitude of eps_hat - e_u
  (`state.magnitude`: ||eps_hat - e_u||_2, on flow models ||(1 - sigma)(v_hat - v_u)||_2;
  METHODS 0) plus every key of the guidance's trace (tensors [B] -> lists; scalars are
  repeated for every row).
* Cost: `unet_rows` = rows evaluated by `model.eps` during the call (the sampler's and any a
  guidance makes itself) / B, so 2 x steps for cfg; `forwards` = batched forward passes an
  image went through (steps for cfg); `wall_seconds` = wall time of the call / B.
* After the loop: `images = model.decode(x)` in [0, 1], [B, 3, H, W], without gradients.

Everything is deterministic per (prompt, seed, guidance and its parameters, settings).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from memaudit.common import UserError
from memaudit.guidance.base import Guidance, StepState, check_supported
from memaudit.models.base import UNCOND, Denoiser
from memaudit.models.cond import Cond, as_cond

SCHEDULERS = ("ddim", "dpm", "euler")  # every kind some family offers (model.schedulers)


@dataclass
class SampleOutput:
    """Result of `sample`: rows in the order of the (prompt, seed) pairs given."""

    images: torch.Tensor  # float32 [B, 3, H, W] in [0, 1], on the CPU
    trace: list[dict[str, Any]]  # one dict per step (see the module docstring)
    unet_rows: float  # UNet rows evaluated per image (cfg: 2 x steps)
    forwards: int  # batched forward passes per image (cfg: steps)
    wall_seconds: float  # wall time per image
    prompts: list[str]  # final prompts, after guidance.prepare_prompts
    seeds: list[int] = field(default_factory=list)
    latents: torch.Tensor | None = None  # final x_0 in model space, on the CPU
    total_seconds: float = 0.0
    steps: int = 0
    guidance_scale: float = 0.0
    scheduler: str = "ddim"


def scale_input(sched: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """scheduler.scale_model_input(x, t), or x for schedulers without one (flow matching)."""
    fn = getattr(sched, "scale_model_input", None)
    return x if fn is None else fn(x, t)


def initial_noise(model: Denoiser, seeds: list[int], init_sigma: float = 1.0) -> torch.Tensor:
    """x_T per seed from a CPU generator, stacked and moved to the model's device (float32)."""
    rows = [torch.randn(tuple(model.latent_shape),
                        generator=torch.Generator("cpu").manual_seed(int(s)))
            for s in seeds]
    return (torch.stack(rows) * init_sigma).to(model.device, torch.float32)


def _per_sample(value: Any, b: int) -> list[Any]:
    """A trace value as a list of length b (tensor [B] -> list, scalar -> repeated)."""
    if torch.is_tensor(value):
        value = value.detach().float().cpu().numpy() if value.is_floating_point() else \
            value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return [value.item()] * b
        if value.shape[0] == b:
            return [v.item() if np.ndim(v) == 0 else v.tolist() for v in value]
        return [value.tolist()] * b
    if isinstance(value, (list, tuple)) and len(value) == b:
        return list(value)
    return [value] * b


def _sample_chunk(model: Denoiser, prompts: list[str], seeds: list[int], guidance: Guidance,
                  steps: int, scale: float, scheduler_kind: str | None, criterion: Any,
                  callback: Callable[[int, StepState, torch.Tensor], Any] | None):
    b = len(prompts)
    sched = model.scheduler(scheduler_kind, steps)
    timesteps = sched.timesteps
    big_t = int(sched.config.num_train_timesteps)
    has_uncond = UNCOND in getattr(model, "capabilities", {UNCOND})
    x = initial_noise(model, seeds, float(getattr(sched, "init_noise_sigma", 1.0)))
    t0 = timesteps[0]

    prompts = list(guidance.prepare_prompts(list(prompts), list(seeds), model))
    if len(prompts) != b:
        raise ValueError(f"{guidance.name}.prepare_prompts returned {len(prompts)} prompts "
                         f"for {b} rows")
    with torch.no_grad():
        emb_c = as_cond(model.encode_prompts(prompts)).detach()
        emb_u = as_cond(model.null_embedding(b)).detach() if has_uncond else emb_c
    emb_c, emb_u = guidance.prepare_embeddings(emb_c, emb_u, x, list(seeds), model, t0)
    emb_c, emb_u = as_cond(emb_c).detach(), as_cond(emb_u).detach()
    x_new = guidance.prepare_noise(x, emb_c, emb_u, list(seeds), model, t0)
    if x_new is not x:
        if tuple(x_new.shape) != tuple(x.shape):
            raise ValueError(f"{guidance.name}.prepare_noise returned {tuple(x_new.shape)} "
                             f"for x_T of {tuple(x.shape)}")
        x = x_new.detach().to(x.device, x.dtype)

    memory: dict[str, Any] = {}
    trace: list[dict[str, Any]] = []
    for j, t in enumerate(timesteps):
        x_t = scale_input(sched, x, t)
        abar = model.prediction.alpha_bar(t)
        state = StepState(index=j, num_steps=len(timesteps), t=t, u=float(t) / big_t, x_t=x_t,
                          alpha_bar=abar, s0=scale, model=model,
                          criterion=criterion, emb_u=emb_u, emb_c=emb_c, memory=memory,
                          prompts=prompts, seeds=list(seeds))
        extra = {k: as_cond(e) for k, e in (guidance.extra_conditions(state) or {}).items()}
        embs = [emb_u, emb_c, *extra.values()] if has_uncond else [emb_c, *extra.values()]
        for name, e in extra.items():
            if len(e) != b or e.signature().keys() != emb_c.signature().keys() or \
                    any(e.signature()[k][0] != s for k, (s, _) in emb_c.signature().items()):
                raise ValueError(f"{guidance.name}: extra condition {name!r} is {e}, "
                                 f"expected the rows of {emb_c}")
        with torch.no_grad():
            out = model.eps(torch.cat([x_t] * len(embs)), t, Cond.cat(embs))
        parts = list(out.float().chunk(len(embs)))
        if not has_uncond:
            parts.insert(0, parts[0])  # e_u = e_c: nothing to guide from
        state.e_u, state.e_c = parts[0], parts[1]
        state.extra = dict(zip(extra.keys(), parts[2:], strict=True))
        eps_hat, gtrace = guidance.guide(state)
        eps_hat = eps_hat.detach().float()
        record: dict[str, Any] = {}
        for key, value in (gtrace or {}).items():
            record[key] = _per_sample(value, b)
        record["guidance_norm"] = state.magnitude(eps_hat - state.e_u).tolist()
        record["t"] = int(t)
        record["u"] = state.u
        trace.append(record)
        with torch.no_grad():
            x = sched.step(eps_hat, t, x).prev_sample
        if callback is not None:
            callback(j, state, eps_hat)
    with torch.no_grad():
        images = model.decode(x).float().cpu()
    return images, trace, prompts, x.detach().float().cpu()


def _merge_traces(parts: list[tuple[list[dict[str, Any]], int]]) -> list[dict[str, Any]]:
    """Concatenate per-chunk traces row-wise; a key missing in a chunk gives None rows."""
    merged: list[dict[str, Any]] = []
    for j in range(len(parts[0][0])):
        keys: list[str] = []
        for tr, _ in parts:
            keys += [k for k in tr[j] if k not in keys]
        rec: dict[str, Any] = {"t": parts[0][0][j]["t"], "u": parts[0][0][j]["u"]}
        for k in keys:
            if k in ("t", "u"):
                continue
            rec[k] = [v for tr, n in parts for v in tr[j].get(k, [None] * n)]
        merged.append(rec)
    return merged


def sample(model: Denoiser, prompts: list[str], seeds: list[int], guidance: Guidance, *,
           steps: int | None = None, guidance_scale: float | None = None,
           scheduler: str | None = None, criterion: Any = None,
           callback: Callable[[int, StepState, torch.Tensor], Any] | None = None,
           batch_size: int | None = None) -> SampleOutput:
    """Generate one image per (prompt, seed) pair with `guidance` (contract: module docstring).

    steps / guidance_scale / scheduler default to the model's; scheduler is one of
    `model.schedulers`: "ddim" (eta 0) or "dpm" (DPM-Solver++ multistep) for DDPM-style
    families, "euler" (flow-matching Euler) for SD3 / FLUX.
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise UserError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per row")
    if not prompts:
        raise UserError("nothing to sample: no prompts")
    scheduler = scheduler or getattr(model, "default_scheduler", "ddim")
    known = getattr(model, "schedulers", SCHEDULERS)
    if scheduler not in known:
        raise UserError(f"unknown scheduler {scheduler!r} for this model; known: "
                        f"{', '.join(known)}")
    check_supported(guidance, model)
    steps = int(model.default_steps if steps is None else steps)
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    scale = float(model.default_guidance_scale if guidance_scale is None else guidance_scale)
    if guidance.needs_criterion and criterion is None:
        raise UserError(f"method {guidance.name!r} needs a copy criterion (give an index)")
    n = len(prompts)
    bs = n if batch_size is None else max(1, int(batch_size))

    rows0 = model.unet_rows
    start = time.perf_counter()
    images, latents, final_prompts, parts = [], [], [], []
    chunk_forwards = []
    for lo in range(0, n, bs):
        f_before = getattr(model, "forward_calls", 0)
        img, tr, fp, lat = _sample_chunk(model, prompts[lo:lo + bs], seeds[lo:lo + bs], guidance,
                                         steps, scale, scheduler, criterion, callback)
        chunk_forwards.append(getattr(model, "forward_calls", 0) - f_before)
        images.append(img)
        latents.append(lat)
        final_prompts += fp
        parts.append((tr, len(fp)))
    total = time.perf_counter() - start
    rows = model.unet_rows - rows0
    return SampleOutput(
        images=torch.cat(images), trace=_merge_traces(parts), unet_rows=rows / n,
        forwards=int(max(chunk_forwards)), wall_seconds=total / n, prompts=final_prompts,
        seeds=seeds, latents=torch.cat(latents), total_seconds=total, steps=steps,
        guidance_scale=scale, scheduler=scheduler,
    )
