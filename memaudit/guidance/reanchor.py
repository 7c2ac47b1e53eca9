"""`reanchor`: prompt re-anchoring, PR (Chen, Liu, Shah, Xu, "Enhancing Privacy-Utility
Trade-offs to Mitigate Memorization in Diffusion Models", CVPR 2025; official code
chenchen-usyd/BE-PRSS, `LocalStableDiffusionPipeline.__call__` with `l_target_pr`;
METHODS.md 3.5).

memaudit's pairing, "PR on Wen's embedding": the modified prompt is Wen et al.'s embedding
adjustment at x_T (`wen`, METHODS 3.4; BE-PRSS `aug_prompt`, the code's PR-with-Wen path). The
paper's runs are PRSS, whose modified prompt is an alternative caption found by semantic search
(`aug_prompt_ss`: the first of the prompt's dataset captions whose magnitude is under the
target); memaudit has no alternative captions per prompt and does not implement that half
(docs/mitigations.md "reanchor").
A sample is *triggered* when its initial magnitude m0 = ||e_c(x_T) - e_u(x_T)||_2 exceeds the
trigger tau, never a fraction of its own m0. Every magnitude here (m0, m, the calibration) is
the noise prediction's (METHODS 0, `prediction.magnitude` / `StepState.magnitude`): on flow
models ||(1 - sigma)(v_c - v_u)||, so tau, L and M mean the same on every family.
tau (`trigger`; also Wen's target, as in the code where one value is both): given; else the
official 1 on SD latents (memaudit/guidance/scale.py); else calibrated, the m0 that at most
`fpr` of the (clean prompt, seed 0..calibrate_seeds-1) rows exceed, on `calibrate` (a prompt
file) or the model's own generic prompts (`Denoiser.generic_prompts`, e.g. the canary's); else
a one-line error.
Each step, for a triggered sample, with e_m the prediction of the adjusted embedding, e_o that
of the original prompt (one more batched row), m = ||e_m - e_u||_2 per sample, L = low tau,
M = high tau (official 3 and 5 with tau = 1) and s the CFG scale (s > 1):
  m > L:  c = (s L - M) / (s - 1),  s_pr = min(s (m - c) / (M - c), s),
          eps_hat = e_o + s_pr (e_m - e_o) + (s - s_pr) (e_m - e_u)
  else:   eps_hat = e_u + s (e_m - e_u)  (plain CFG on the adjusted embedding)
s_pr is 1 at m = L (where both branches agree) and s from m = M on: the original prompt, not
the null one, becomes the anchor of the guidance. The official code takes m over the whole
batch; memaudit decides per sample. Trace: Wen's fields plus reanchor_m, reanchor_s,
reanchor_on; `generation_record`: tau, L, M and where tau comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memaudit.common import UserError
from memaudit.guidance.base import StepState, cfg_combine
from memaudit.guidance.scale import calibrated_magnitude, clean_prompts, sd_latents
from memaudit.guidance.wen import Wen
from memaudit.models.cond import Cond


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1))).to(like)


#: Official constants on SD 1.4's 4x64x64 latents (BE-PRSS README, PRSS command).
OFFICIAL_TRIGGER, OFFICIAL_LOW, OFFICIAL_HIGH = 1.0, 3.0, 5.0


class Reanchor(Wen):
    name = "reanchor"

    @dataclass
    class Params(Wen.Params):
        fraction: float | None = None  # not allowed: a self-relative trigger fires on every row
        trigger: float | None = None  # tau (also Wen's target); None: official or calibrated
        calibrate: str | None = None  # clean prompt file for tau (default: the model's own)
        fpr: float = 0.01  # share of clean (prompt, seed) rows whose m0 may exceed tau
        calibrate_seeds: int = 4  # seeds 0..n-1 of that calibration
        low: float = OFFICIAL_LOW  # L = low x tau (official l_target_pr 3 with tau 1)
        high: float = OFFICIAL_HIGH  # M = high x tau (official mag_thres_pr 5 with tau 1)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        if not 0 < p.low < p.high:
            raise UserError(f"reanchor needs 0 < low < high, got low {p.low}, high {p.high}")
        if p.fraction is not None or p.target is not None:
            raise UserError("reanchor's trigger is absolute (METHODS 3.5): give "
                            "reanchor.trigger=X (it is also Wen's target), not fraction/target")
        if not 0 <= p.fpr < 1:
            raise UserError(f"reanchor.fpr must be in [0, 1), got {p.fpr:g}")
        self.original: Cond | None = None
        self.triggered = torch.zeros(0, dtype=torch.bool)
        self.tau = torch.zeros(0)
        self.trigger: float | None = None
        self.trigger_source = ""

    def resolve_trigger(self, model: Any, t0: torch.Tensor) -> float:
        """tau for `model` (once per run): given, official on SD latents, else calibrated at
        the run's first timestep t0."""
        if self.trigger is not None:
            return self.trigger
        p = self.params
        if p.trigger is not None:
            self.trigger, self.trigger_source = float(p.trigger), "reanchor.trigger"
        elif sd_latents(model) and p.calibrate is None:
            self.trigger = OFFICIAL_TRIGGER
            self.trigger_source = "official (SD latents; BE-PRSS)"
        else:
            prompts, name = clean_prompts(model, p.calibrate)
            if not prompts:
                raise UserError(
                    f"reanchor needs a trigger threshold for {getattr(model, 'family', '')} "
                    f"model {getattr(model, 'name', '')} (the official 1 holds on SD 1.x/2.x "
                    f"4x64x64 latents only): give reanchor.trigger=X or "
                    f"reanchor.calibrate=CLEAN_PROMPTS")
            self.trigger = calibrated_magnitude(model, prompts, p.calibrate_seeds, p.fpr, t0)
            self.trigger_source = (f"calibrated on {name} (seeds 0-{p.calibrate_seeds - 1}, "
                                   f"FPR {p.fpr:g})")
        return self.trigger

    def prepare_embeddings(self, emb_c: Cond, emb_u: Cond, x_T: torch.Tensor,
                           seeds: list[int], model: Any, t0: torch.Tensor
                           ) -> tuple[Cond, Cond]:
        tau = self.resolve_trigger(model, t0)
        self.original = emb_c.detach().clone()
        self.params.target = tau  # Wen's adjustment stops at the trigger, as in the code
        try:
            new_c, new_u = super().prepare_embeddings(emb_c, emb_u, x_T, seeds, model, t0)
        finally:
            self.params.target = None
        loss0 = self.last["wen_loss0"].float()
        self.tau = torch.full_like(loss0, tau)
        self.triggered = loss0 > self.tau
        return new_c, new_u

    def generation_record(self, prompt: str, seed: int) -> dict[str, Any]:
        if self.trigger is None:
            return {}
        p = self.params
        return {"reanchor": {"trigger": self.trigger, "low": p.low * self.trigger,
                             "high": p.high * self.trigger, "source": self.trigger_source}}

    def extra_conditions(self, state: StepState) -> dict[str, Cond]:
        if self.original is None or not bool(self.triggered.any()):
            return {}
        return {"reanchor_original": self.original}

    def guide(self, state: StepState):
        s = float(state.s0)
        e_u, e_m = state.e_u, state.e_c
        eps = cfg_combine(e_u, e_m, s)
        m = state.magnitude(e_m - e_u)  # the noise prediction's on every family (METHODS 0)
        low, high = self.params.low * self.tau, self.params.high * self.tau
        on = self.triggered & (m > low)
        s_pr = torch.full_like(m, s)
        if bool(on.any()):
            if s <= 1:
                raise UserError(f"reanchor needs a CFG scale > 1 (got {s})")
            c = (s * low - high) / (s - 1)
            s_pr = torch.minimum(s * (m - c) / (high - c), torch.full_like(m, s))
            e_o = state.extra["reanchor_original"]
            sp = _bcast(s_pr, e_m)
            pr = e_o + sp * (e_m - e_o) + (s - sp) * (e_m - e_u)
            eps = torch.where(_bcast(on, e_m).bool(), pr, eps)
        trace = dict(self.last)
        trace.update({"reanchor_m": m, "reanchor_s": torch.where(on, s_pr, torch.full_like(m, s)),
                      "reanchor_on": on.float()})
        return eps, trace
