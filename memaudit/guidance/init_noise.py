"""`init-noise`: adjust the initial noise x_T so the trajectory escapes the attraction basin early
(Han, Kim, Joo, Hong, Lee, "Adjusting Initial Noise to Mitigate Memorization in Text-to-Image
Diffusion Models", NeurIPS 2025; official code hygnhan/init_noise_diffusion_memorization;
METHODS.md 3.5).

Before the loop (`prepare_noise`), with m(x) = ||e_c(x, t0) - e_u(x, t0)||_2 per sample, the
noise-prediction magnitude on every family (METHODS 0, the model's `prediction.magnitude`): on
flow models (1 - sigma) ||v_c - v_u||, 1 - sigma floored at 1 / T at x_T where sigma = 1, a
constant factor there (the per-sample minimiser and a fraction target are the velocity's; an
absolute `target` is on the noise scale):
- `per-sample` (default, the paper's stronger variant): AdamW (lr 0.01) on x_T in float32,
  minimising m(x_T) of each sample, checked before each step, until m <= target, at most
  `max_iters` iterations; a sample that met its target keeps that x_T.
- `batch-wise` (sharpness-aware, no gradients): `adj_iters` (2) times,
  delta = rho eps~/||eps~||, eps~ = e_c(x) - e_u(x);  x <- x - gamma (eps~(x + delta) - eps~(x)),
  gamma 0.7. The update is in the model's prediction space (velocity on flow models: at
  sigma = 1 the noise difference (1 - sigma)(v_c - v_u) is 0 for every prompt, and the
  direction eps~/||eps~|| is the same in either); the m recorded is the noise prediction's.
Constants (`constants`; memaudit/guidance/scale.py): on SD latents (4x64x64) the official
ones, target 0.9 (absolute), max_iters 1000, rho 50 (`generate_images.py` defaults and README
commands); on every other magnitude scale memaudit's defaults, stated beside them: target =
`fraction` 0.5 x the sample's initial m, max_iters 100, rho = rho_rel sqrt(dim x_T) with
rho_rel = 50 / 128 (= 50 on SD's 16,384-dimensional latents). Explicit parameters win.
Then the official code's guidance: eps_hat = e_u while j <= apply_cfg_step, then CFG. The
per-sample mode applies CFG from step 0 (default -1), as the official per-sample mode does
(its `apply_cfg_step` acts only in the batch-wise branch); batch-wise default 4.
Trace: init_m0 / init_m (m before and after), init_iters, init_target, scale, switch_step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from memaudit.common import UserError
from memaudit.guidance.base import Guidance, StepState, per_sample_norm
from memaudit.guidance.optim import minimise_per_row
from memaudit.guidance.scale import sd_latents
from memaudit.guidance.transition import apply_scale, scale_from_switch
from memaudit.models.base import COND, UNCOND
from memaudit.models.cond import Cond

MODES = ("per-sample", "batch-wise")
#: Official constants on SD 1.4's 4x64x64 latents (generate_images.py, README).
OFFICIAL_TARGET, OFFICIAL_MAX_ITERS, OFFICIAL_RHO = 0.9, 1000, 50.0
#: memaudit's defaults on every other magnitude scale (docs/mitigations.md "init-noise").
OTHER_MAX_ITERS = 100


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1))).to(like)


class InitNoise(Guidance):
    name = "init-noise"
    requires = frozenset({COND, UNCOND})  # the magnitude ||e_c - e_u|| it minimises
    spec_param = "mode"  # `init-noise:batch-wise`

    @dataclass
    class Params:
        mode: str = "per-sample"
        lr: float = 0.01  # per-sample: AdamW learning rate (official)
        max_iters: int | None = None  # per-sample cap; None: 1000 on SD latents, else 100
        target: float | None = None  # per-sample absolute target; None: 0.9 on SD latents
        fraction: float = 0.5  # per-sample, other scales: target = fraction x initial m
        adj_iters: int = 2  # batch-wise iterations (official)
        rho: float | None = None  # batch-wise; None: 50 on SD latents, else rho_rel sqrt(dim)
        rho_rel: float = OFFICIAL_RHO / 128  # batch-wise, other scales (50 on SD latents)
        gamma: float = 0.7  # batch-wise step (official)
        apply_cfg_step: int | None = None  # e_u only while j <= it; None: -1 / 4 by mode

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params.mode not in MODES:
            raise UserError(f"unknown init-noise mode {self.params.mode!r}; "
                            f"known: {', '.join(MODES)}")
        self.last: dict[str, torch.Tensor] = {}

    @property
    def cfg_step(self) -> int:
        p = self.params
        if p.apply_cfg_step is not None:
            return int(p.apply_cfg_step)
        return -1 if p.mode == "per-sample" else 4

    @staticmethod
    def difference(model: Any, x: torch.Tensor, t0: torch.Tensor, emb_c: Cond, emb_u: Cond
                   ) -> torch.Tensor:
        """e_c(x) - e_u(x) from one batched forward (differentiable in x)."""
        e = model.eps(torch.cat([x, x]), t0, Cond.cat([emb_u, emb_c])).float()
        e_u, e_c = e.chunk(2)
        return e_c - e_u

    @staticmethod
    def magnitude(model: Any, d: torch.Tensor, t0: torch.Tensor) -> torch.Tensor:
        """m per sample: the noise-prediction magnitude of d = e_c - e_u (METHODS 0; the
        model's `prediction.magnitude`, ||d|| on eps models)."""
        return model.prediction.magnitude(d, t0)

    def constants(self, model: Any, dim: int | None = None) -> dict[str, Any]:
        """The target, iteration cap and rho this run uses on `model` and where they come
        from: explicit parameters, else the official SD-latent constants, else memaudit's
        defaults for another magnitude scale (target None: fraction x the initial m)."""
        p, sd = self.params, sd_latents(model)
        dim = dim if dim is not None else math.prod(getattr(model, "latent_shape", (1,)))
        src = "official (SD latents)" if sd else "memaudit's default for this magnitude scale"
        return {
            "target": p.target if p.target is not None else (OFFICIAL_TARGET if sd else None),
            "fraction": p.fraction,
            "max_iters": p.max_iters if p.max_iters is not None else (
                OFFICIAL_MAX_ITERS if sd else OTHER_MAX_ITERS),
            "rho": p.rho if p.rho is not None else (
                OFFICIAL_RHO if sd else p.rho_rel * math.sqrt(dim)),
            "source": src}

    def prepare_noise(self, x_T: torch.Tensor, emb_c: Cond, emb_u: Cond, seeds: list[int],
                      model: Any, t0: torch.Tensor) -> torch.Tensor:
        x = x_T.detach().float()
        k = self.constants(model, x[0].numel())
        if self.params.mode == "per-sample":
            x, m0, m, iters = self._per_sample(model, x, t0, emb_c, emb_u, k)
            target = torch.full_like(m0, k["target"]) if k["target"] is not None \
                else k["fraction"] * m0
        else:
            x, m0, m, iters = self._batch_wise(model, x, t0, emb_c, emb_u, k)
            target = torch.full_like(m0, float("nan"))
        self.last = {"init_m0": m0.cpu(), "init_m": m.cpu(), "init_iters": iters.cpu(),
                     "init_target": target.cpu()}
        return x

    def _per_sample(self, model, x, t0, emb_c, emb_u, k):
        res = minimise_per_row(
            x, lambda v: self.magnitude(model, self.difference(model, v, t0, emb_c, emb_u), t0),
            self.params.lr, int(k["max_iters"]), k["target"], k["fraction"])
        return res.value, res.loss0, res.loss, res.iters

    @torch.no_grad()
    def _batch_wise(self, model, x, t0, emb_c, emb_u, k):
        p = self.params
        rho = float(k["rho"])
        m0 = None
        for _ in range(p.adj_iters):
            d = self.difference(model, x, t0, emb_c, emb_u)
            m0 = self.magnitude(model, d, t0) if m0 is None else m0
            delta = rho * d / _bcast(per_sample_norm(d).clamp_min(1e-12), d)  # a direction
            d_sharp = self.difference(model, x + delta, t0, emb_c, emb_u)
            x = x - p.gamma * (d_sharp - d)
        m = self.magnitude(model, self.difference(model, x, t0, emb_c, emb_u), t0)
        if m0 is None:
            m0 = m
        return x, m0, m, torch.full((x.shape[0],), p.adj_iters, dtype=torch.long)

    def guide(self, state: StepState):
        b = state.e_c.shape[0]
        k = self.cfg_step
        sw = torch.full((b,), k + 1 if state.index > k else -1, dtype=torch.long)
        return apply_scale(state, scale_from_switch(sw, 0.0, state.s0), sw, dict(self.last))
