"""`init-noise`: adjust the initial noise x_T so the trajectory escapes the attraction basin early
(Han, Kim, Joo, Hong, Lee, "Adjusting Initial Noise to Mitigate Memorization in Text-to-Image
Diffusion Models", NeurIPS 2025; official code hygnhan/init_noise_diffusion_memorization;
METHODS.md 3.5).

Before the loop (`prepare_noise`), with m(x) = ||e_c(x, t0) - e_u(x, t0)||_2 per sample:
- `per-sample` (default, the paper's stronger variant): AdamW (lr 0.01) on x_T in float32,
  minimising m(x_T) of each sample until m <= target (absolute `target`, 0.9 on SD v1 latents;
  else `fraction` x the sample's initial m), at most `max_iters` iterations; a sample that
  met its target keeps that x_T.
- `batch-wise` (sharpness-aware, no gradients): `adj_iters` (2) times,
  delta = rho eps~/||eps~||, eps~ = e_c(x) - e_u(x);  x <- x - gamma (eps~(x + delta) - eps~(x)),
  gamma 0.7; rho = rho_rel sqrt(dim x_T) (rho_rel 0.39 gives the official 50 on SD's
  4x64x64 latents).
Then the transition rule of the official code: eps_hat = e_u while j <= apply_cfg_step, then
CFG (per-sample default -1: CFG from the first step; batch-wise default 4).
Trace: init_m0 / init_m (m before and after), init_iters, scale, switch_step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from memaudit.common import UserError
from memaudit.guidance.base import Guidance, StepState, per_sample_norm
from memaudit.guidance.optim import minimise_per_row
from memaudit.guidance.transition import apply_scale, scale_from_switch
from memaudit.models.cond import Cond

MODES = ("per-sample", "batch-wise")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1))).to(like)


class InitNoise(Guidance):
    name = "init-noise"
    spec_param = "mode"  # `init-noise:batch-wise`

    @dataclass
    class Params:
        mode: str = "per-sample"
        lr: float = 0.01  # per-sample: AdamW learning rate (official)
        max_iters: int = 100  # per-sample: iteration cap (official 1000; see docs)
        target: float | None = None  # per-sample: absolute target (0.9 for SD v1)
        fraction: float = 0.5  # per-sample: target = fraction x initial m (no `target`)
        adj_iters: int = 2  # batch-wise iterations (official)
        rho_rel: float = 0.39  # batch-wise: rho = rho_rel sqrt(dim x_T) (50 on SD latents)
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
    def magnitude(model: Any, x: torch.Tensor, t0: torch.Tensor, emb_c: Cond, emb_u: Cond
                  ) -> torch.Tensor:
        """m(x) per sample from one batched forward (differentiable in x)."""
        e = model.eps(torch.cat([x, x]), t0, Cond.cat([emb_u, emb_c])).float()
        e_u, e_c = e.chunk(2)
        return e_c - e_u

    def prepare_noise(self, x_T: torch.Tensor, emb_c: Cond, emb_u: Cond, seeds: list[int],
                      model: Any, t0: torch.Tensor) -> torch.Tensor:
        x = x_T.detach().float()
        if self.params.mode == "per-sample":
            x, m0, m, iters = self._per_sample(model, x, t0, emb_c, emb_u)
        else:
            x, m0, m, iters = self._batch_wise(model, x, t0, emb_c, emb_u)
        self.last = {"init_m0": m0.cpu(), "init_m": m.cpu(), "init_iters": iters.cpu()}
        return x

    def _per_sample(self, model, x, t0, emb_c, emb_u):
        p = self.params
        res = minimise_per_row(
            x, lambda v: per_sample_norm(self.magnitude(model, v, t0, emb_c, emb_u)),
            p.lr, p.max_iters, p.target, p.fraction)
        return res.value, res.loss0, res.loss, res.iters

    @torch.no_grad()
    def _batch_wise(self, model, x, t0, emb_c, emb_u):
        p = self.params
        rho = p.rho_rel * math.sqrt(x[0].numel())
        m0 = None
        for _ in range(p.adj_iters):
            d = self.magnitude(model, x, t0, emb_c, emb_u)
            norm = per_sample_norm(d)
            m0 = norm if m0 is None else m0
            delta = rho * d / _bcast(norm.clamp_min(1e-12), d)
            d_sharp = self.magnitude(model, x + delta, t0, emb_c, emb_u)
            x = x - p.gamma * (d_sharp - d)
        m = per_sample_norm(self.magnitude(model, x, t0, emb_c, emb_u))
        if m0 is None:
            m0 = m
        return x, m0, m, torch.full((x.shape[0],), p.adj_iters, dtype=torch.long)

    def guide(self, state: StepState):
        b = state.e_c.shape[0]
        k = self.cfg_step
        sw = torch.full((b,), k + 1 if state.index > k else -1, dtype=torch.long)
        return apply_scale(state, scale_from_switch(sw, 0.0, state.s0), sw, dict(self.last))
