"""Anti-Memorization Guidance, `amg` (Chen, Liu, Xu, "Towards Memorization-Free Diffusion
Models", CVPR 2024; METHODS.md 3.2). Parts switchable: `amg:spe,dup,sim` (default all).

Per step and per sample, from the CFG estimate eps = e_u + s0 (e_c - e_u):
  x0_hat = the model's x0 estimate (eps: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); flow
  matching: x_t - sigma v; memaudit/models/prediction.py), decoded to [0, 1];
  sigma_t, n0 = criterion.similarity_tensor(x0_hat)  (SSCD cosine, or -nL2: higher = closer);
  fired = sigma_t > lambda(u).
- Gspe: s1 = clip(c1 q, 0, s0 - 1), eps -= s1 (e_c - e_u); gated by `fired` (paper) unless
  gate_spe = false (official code: whenever q > 0). q = sigma_t for cosine criteria; for nL2
  (sigma = -nL2 < 0, so c1 sigma would always clip to 0) memaudit uses q = 1 / nL2.
- Gdup: y_N = criterion.index.group_caption(group of n0); once fired it stays on 10 steps;
  s2 = clip((s0 - 1 - s1) r, 0, s0 - 1 - s1), eps -= s2 (eps(x_t, y_N) - e_u), with
  r = sigma_t / lambda0 for cosine criteria and r = lambda0 / nL2 for nL2 (both > 1 past
  lambda0). eps(x_t, y_N) comes from `extra_conditions` (batched with e_u, e_c); on the step
  it first fires, the triggered rows are evaluated here (counted as UNet rows).
- Gsim: eps += c3 w(t) gain(t) grad_{x_t} sigma_t when fired, gain = the model's
  (sqrt(1 - abar_t) for eps; for velocity sigma / (1 - sigma)^2, which moves x0_hat as the eps
  rule does at the same SNR, derived in memaudit/models/prediction.py; skipped at sigma = 1),
  gradient through the decoder and descriptor only (eps detached). Cosine:
  w = (sigma - lambda0) exp((1 - u)/0.17) (official code; on flow models u on SD's schedule at
  the step's SNR, `state.u_ref`); nL2: w = sigma - lambda(u), the
  margin past the threshold (METHODS 3.2).
  c3 = None (default) means the criterion's own: 100 for cosine criteria (official SSCD
  value), 3000 for nL2, tuned on the canary (docs/mitigations.md "Tuning": the lowest
  64x+16x calibrated copy rate at >= 0.9x cfg's digit agreement on seeds disjoint from the
  evaluation; METHODS 3.2). A number sets it for every criterion.
lambda(u): SSCD exponential 0.3 + 0.1 exp(-5u) (lambda0 = 0.3); nL2 "guide when
nL2 < L(u)", L(u) = tau (1.95 - 0.45 exp(-6.25u)) / 1.5 with tau the index's calibrated nL2
threshold (1.5 when uncalibrated), lambda0 = L at u -> inf = 1.95 tau / 1.5; `parabolic`
gives a + b (1 - u)^2 on the criterion's own scale. Every u of AMG's schedules is `state.u_ref`
(u itself on eps families; on flow models the u on SD's schedule at the step's SNR, METHODS 0),
so a flow model's threshold and weight are those of SD at the same signal-to-noise ratio.
What the check decodes (the full VAE or a tiny `decoder`, at full or the descriptor's size,
`check_size`) and on which steps it runs (`skip_margin`, `skip_max_gap`): amg_check.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memaudit.common import UserError
from memaudit.guidance.amg_check import CheckImage, CheckSchedule
from memaudit.guidance.base import Guidance, StepState
from memaudit.models.base import COND, TEXT, UNCOND
from memaudit.models.cond import Cond

PARTS = ("spe", "dup", "sim")
#: Gsim strength when `c3` is None: per criterion kind (see the module docstring)
C3_COSINE = 100.0
C3_NL2 = 3000.0


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1))).to(like)


def _scattered(grad_fn: Any, rows: torch.Tensor, like: torch.Tensor) -> Any:
    """grad_fn of some rows -> a function giving the gradient of every row (0 elsewhere)."""
    def full() -> torch.Tensor:
        out = torch.zeros(like.shape, device=like.device)
        out[rows.to(out.device)] = grad_fn().to(out)
        return out
    return full


class AMG(Guidance):
    name = "amg"
    needs_criterion = True
    spec_param = "parts"  # `amg:spe,dup` sets parts

    @dataclass
    class Params:
        parts: str = "spe,dup,sim"
        c1: float = 13.0
        c3: float | None = None  # None: C3_COSINE for cosine criteria, C3_NL2 for nL2
        gate_spe: bool = True
        schedule: str = "exponential"  # or "parabolic"
        a: float = 0.3  # parabolic: lambda(u) = a + b (1 - u)^2 (criterion's own scale)
        b: float = 0.1
        dup_steps: int = 10
        calibrated: bool = True  # nL2: scale lambda(u) to the index's calibrated threshold
        # the check's cost (issue 21; amg_check.py): a tiny AutoencoderTiny folder or cached
        # hub id for x0_hat (its weights' SHA-256 recorded on load), the decode size, and
        # skipping checks far below lambda (margin on the criterion's scale; 0: every step)
        decoder: str | None = None
        decoder_sha256: str | None = None
        check_size: str = "full"  # or "descriptor"
        skip_margin: float = 0.0
        skip_max_gap: int = 4

    def required(self) -> dict[str, str]:
        """Gsim needs only a decodable x0 estimate (AMG's unconditional iDDPM case); Gspe
        needs a condition and e_u, Gdup a text caption to condition on and e_u."""
        need: dict[str, str] = {}
        if "spe" in self.parts:
            need.update({COND: "AMG part spe", UNCOND: "AMG part spe"})
        if "dup" in self.parts:
            need[TEXT] = "AMG part dup"
            need.setdefault(UNCOND, "AMG part dup")
        return need

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        parts = [p.strip() for p in self.params.parts.split(",") if p.strip()]
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise UserError(f"unknown AMG part(s) {', '.join(bad) or '(none)'}; "
                            f"known: {', '.join(PARTS)}")
        if self.params.schedule not in ("exponential", "parabolic"):
            raise UserError(f"unknown AMG schedule {self.params.schedule!r}; "
                            "known: exponential, parabolic")
        self.parts = set(parts)
        self.cost = {"similarity_s": 0.0, "similarity_calls": 0, "rows_checked": 0,
                     "rows_skipped": 0}
        p = self.params
        self.check_image = CheckImage(p.decoder, p.decoder_sha256, p.check_size)
        self.schedule = CheckSchedule(p.skip_margin, p.skip_max_gap)
        if self.check_image.tiny is not None:  # provenance: what was loaded
            tiny = self.check_image.tiny
            p.decoder_sha256 = tiny.sha256
            if Path(str(p.decoder)).expanduser().exists():
                p.decoder = str(tiny.folder)

    def prepare_noise(self, x_T, emb_c, emb_u, seeds, model, t0):
        """x_T unchanged; a tiny decoder that cannot read this model is refused here,
        before the loop."""
        self.check_image.bind(model)
        return x_T

    # --- the threshold schedule -------------------------------------------------------
    def is_cosine(self, criterion: Any) -> bool:
        return bool(getattr(criterion, "higher_is_more_similar", True))

    def c3(self, criterion: Any) -> float:
        """The Gsim strength in effect: the `c3` parameter, else the criterion's default."""
        if self.params.c3 is not None:
            return float(self.params.c3)
        return C3_COSINE if self.is_cosine(criterion) else C3_NL2

    def nl2_tau(self, criterion: Any) -> float:
        tau = getattr(criterion, "calibrated_threshold", None)
        return float(tau) if (self.params.calibrated and tau is not None) else 1.5

    def threshold(self, u: float, criterion: Any) -> tuple[float, float]:
        """(lambda(u), lambda0) on the similarity scale (cosine, or -nL2)."""
        p = self.params
        if self.is_cosine(criterion):
            if p.schedule == "exponential":
                return 0.3 + 0.1 * math.exp(-5.0 * u), 0.3
            return p.a + p.b * (1.0 - u) ** 2, p.a
        tau = self.nl2_tau(criterion)
        if p.schedule == "exponential":
            return -tau * (1.95 - 0.45 * math.exp(-6.25 * u)) / 1.5, -tau * 1.95 / 1.5
        return -(p.a + p.b * (1.0 - u) ** 2), -p.a

    # --- per step ---------------------------------------------------------------------
    def extra_conditions(self, state: StepState) -> dict[str, Cond]:
        if "dup" not in self.parts:
            return {}
        until = state.memory.get("dup_until")
        if until is None:
            return {}
        active = until > state.index
        if not bool(active.any()):
            return {}
        return {"amg_dup": state.memory["dup_emb"].where(active, state.emb_u)}

    def similarity(self, state: StepState, eps: torch.Tensor, need_grad: bool,
                   rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """sigma_t [R] (detached), neighbour ids [R], and a function returning
        grad_{x_t} sigma_t [R, ...] (eps held constant; None without need_grad), for the
        rows `rows` of the batch (default all). The backward runs only when that function is
        called, i.e. on steps where some row fires: the decode and descriptor forward keep
        their graph until then (docs/benchmarks.md, AMG's cost)."""
        t0 = time.perf_counter()
        x_t = state.x_t
        if rows is not None:
            x_t, eps = x_t[rows.to(x_t.device)], eps[rows.to(eps.device)]
        with torch.enable_grad():  # float32 x_t; the model's x0 estimate, float32 decode
            x = x_t.detach().clone().float().requires_grad_(need_grad)
            x0 = state.x0_hat(eps.detach().float(), x)
            img = self.check_image(state.model, state.criterion, x0)
            sigma, ids = state.criterion.similarity_tensor(img)
        self.cost["similarity_s"] += time.perf_counter() - t0
        self.cost["similarity_calls"] += 1

        def grad() -> torch.Tensor:
            t1 = time.perf_counter()
            (g,) = torch.autograd.grad(sigma.sum(), x)
            self.cost["similarity_s"] += time.perf_counter() - t1
            return g

        return (sigma.detach().float().cpu(), torch.as_tensor(ids).long().cpu(),
                grad if need_grad else None)

    def checked_similarity(self, state: StepState, eps: torch.Tensor, lam: float
                           ) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]:
        """`similarity` on the rows the check schedule says are due (amg_check.py): sigma
        [B] (-inf on rows not checked, which cannot fire), group ids [B], the gradient
        function (zero on rows not checked) and the checked rows [B] (bool)."""
        b = eps.shape[0]
        always = None
        if "spe" in self.parts and not self.params.gate_spe:
            always = torch.ones(b, dtype=torch.bool)
        elif "dup" in self.parts and "dup_until" in state.memory:
            always = state.memory["dup_until"] > state.index
        checked = self.schedule.due(state.memory, state.index, b, always)
        n = int(checked.sum())
        self.cost["rows_checked"] += n
        self.cost["rows_skipped"] += b - n
        if n == b:
            sigma, ids, grad_fn = self.similarity(state, eps, "sim" in self.parts)
        else:
            sigma, ids = torch.full((b,), -math.inf), torch.zeros(b, dtype=torch.long)
            grad_fn = None
            if n:
                rows = checked.nonzero().flatten()
                s, i, g = self.similarity(state, eps, "sim" in self.parts, rows)
                sigma[rows], ids[rows] = s, i
                grad_fn = None if g is None else _scattered(g, rows, state.x_t)
        if n:
            self.schedule.after(state.memory, state.index, sigma, lam, checked)
        return sigma, ids, grad_fn, checked

    def guide(self, state: StepState):
        p, crit, s0 = self.params, state.criterion, float(state.s0)
        if crit is None:
            raise UserError("method 'amg' needs a training index criterion (--index)")
        if not getattr(crit, "differentiable", True):
            raise UserError(f"criterion {getattr(crit, 'name', crit)!r} has no differentiable "
                            "similarity, so it cannot guide amg")
        b = state.e_c.shape[0]
        diff = state.e_c - state.e_u
        eps = state.e_u + s0 * diff
        lam, lam0 = self.threshold(state.u_ref, crit)  # u on SD's schedule at this SNR
        sigma, ids, grad_fn, checked = self.checked_similarity(state, eps, lam)
        fired = sigma > lam
        cosine = self.is_cosine(crit)
        zeros = torch.zeros(b)

        # Gspe
        s1 = zeros.clone()
        if "spe" in self.parts:
            q = sigma if cosine else 1.0 / (-sigma).clamp_min(1e-8)
            s1 = (p.c1 * q).clamp(0.0, max(s0 - 1.0, 0.0))
            s1 = torch.where(fired if p.gate_spe else q > 0, s1, zeros)
            eps = eps - _bcast(s1, eps) * diff

        # Gdup
        s2 = zeros.clone()
        dup_on = torch.zeros(b, dtype=torch.bool)
        if "dup" in self.parts:
            until = state.memory.get("dup_until", torch.full((b,), -1, dtype=torch.long))
            was_on = until > state.index
            e_dup = state.extra.get("amg_dup")
            if e_dup is None:
                e_dup = state.e_u.clone()
            if "dup_emb" not in state.memory:
                state.memory["dup_emb"] = state.emb_u.clone()
            new = fired & ~was_on
            if bool(fired.any()):
                idx = fired.nonzero().flatten()
                caps = [crit.index.group_caption(int(ids[i])) for i in idx]
                with torch.no_grad():
                    emb = state.model.encode_prompts(caps)
                state.memory["dup_emb"] = state.memory["dup_emb"].put(idx, emb)
                until = torch.where(fired, torch.full_like(until, state.index + p.dup_steps),
                                    until)
            if bool(new.any()):  # first step on: evaluate the new rows now
                nidx = new.nonzero().flatten().to(state.x_t.device)
                e_dup = e_dup.clone()
                with torch.no_grad():
                    e_dup[nidx] = state.model.eps(state.x_t[nidx], state.t,
                                                  state.memory["dup_emb"][nidx]).to(e_dup)
            state.memory["dup_until"] = until
            dup_on = until > state.index
            r = sigma / lam0 if cosine else lam0 / sigma.clamp_max(-1e-8)
            room = (s0 - 1.0 - s1).clamp_min(0.0)
            s2 = torch.minimum(torch.maximum(room * r, zeros), room)
            s2 = torch.where(dup_on, s2, zeros)
            eps = eps - _bcast(s2, eps) * (e_dup - state.e_u)

        # Gsim
        sim_on = torch.zeros(b, dtype=torch.bool)
        w = zeros.clone()
        # (skipped at a flow model's sigma = 1, where x0_hat carries no image: METHODS 0)
        if "sim" in self.parts and grad_fn is not None and bool(fired.any()) \
                and state.has_signal():
            grad = grad_fn()  # the backward, only when some row fires (checked rows only)
            sim_on = fired
            if cosine:  # u_ref: u on SD's schedule at this SNR (u itself for eps families)
                w = (sigma - lam0) * math.exp((1.0 - state.u_ref) / 0.17)
            else:
                w = sigma - lam
            w = torch.where(sim_on, w, zeros)
            gain = state.gain().to(eps.device, torch.float32)
            eps = eps + self.c3(crit) * _bcast(w, eps) * _bcast(gain.reshape(-1), eps) \
                * grad.to(eps)

        trace = {"sigma": sigma, "lambda": float(lam), "fired": fired.float(),
                 "amg_spe": (s1 > 0).float(), "amg_dup": dup_on.float(),
                 "amg_sim": sim_on.float(), "s1": s1, "s2": s2, "w": w}
        if self.schedule.margin > 0:  # skipped rows: no sigma (NaN), checked 0
            trace["sigma"] = torch.where(checked, sigma, torch.full_like(sigma, math.nan))
            trace["checked"] = checked.float()
        return eps, trace
