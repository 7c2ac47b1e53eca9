"""`reanchor`: prompt re-anchoring, PR (Chen, Liu, Shah, Xu, "Enhancing Privacy-Utility
Trade-offs to Mitigate Memorization in Diffusion Models", CVPR 2025; official code
chenchen-usyd/BE-PRSS, `LocalStableDiffusionPipeline.__call__` with `l_target_pr`;
METHODS.md 3.5).

The modified prompt is Wen et al.'s embedding adjustment at x_T (`wen`, METHODS 3.4: the
official PR run uses the same `aug_prompt`); a sample is *triggered* when that adjustment ran,
i.e. its initial loss was above its target tau (absolute `target`, 1 on SD v1 in the official
run, else `fraction` x the initial loss). Each step, for a triggered sample, with e_m the
prediction of the adjusted embedding, e_o that of the original prompt (one more batched row),
m = ||e_m - e_u||_2 per sample, L = low tau, M = high tau (official L = 3, M = 5 with tau = 1)
and s the CFG scale (s > 1):
  m > L:  c = (s L - M) / (s - 1),  s_pr = min(s (m - c) / (M - c), s),
          eps_hat = e_o + s_pr (e_m - e_o) + (s - s_pr) (e_m - e_u)
  else:   eps_hat = e_u + s (e_m - e_u)  (plain CFG on the adjusted embedding)
s_pr is 1 at m = L (where both branches agree) and s from m = M on: the original prompt, not
the null one, becomes the anchor of the guidance. The official code takes m over the whole
batch; memaudit decides per sample. Trace: Wen's fields plus reanchor_m, reanchor_s,
reanchor_on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memaudit.common import UserError
from memaudit.guidance.base import StepState, cfg_combine, per_sample_norm
from memaudit.guidance.wen import Wen
from memaudit.models.cond import Cond


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1))).to(like)


class Reanchor(Wen):
    name = "reanchor"

    @dataclass
    class Params(Wen.Params):
        low: float = 3.0  # L = low x tau (official l_target_pr 3 with tau 1)
        high: float = 5.0  # M = high x tau (official mag_thres_pr 5 with tau 1)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if not 0 < self.params.low < self.params.high:
            raise UserError(f"reanchor needs 0 < low < high, got low {self.params.low}, "
                            f"high {self.params.high}")
        self.original: Cond | None = None
        self.triggered = torch.zeros(0, dtype=torch.bool)
        self.tau = torch.zeros(0)

    def prepare_embeddings(self, emb_c: Cond, emb_u: Cond, x_T: torch.Tensor,
                           seeds: list[int], model: Any, t0: torch.Tensor
                           ) -> tuple[Cond, Cond]:
        self.original = emb_c.detach().clone()
        new_c, new_u = super().prepare_embeddings(emb_c, emb_u, x_T, seeds, model, t0)
        loss0 = self.last["wen_loss0"].float()
        p = self.params
        self.tau = torch.full_like(loss0, p.target) if p.target is not None \
            else p.fraction * loss0
        self.triggered = loss0 > self.tau
        return new_c, new_u

    def extra_conditions(self, state: StepState) -> dict[str, Cond]:
        if self.original is None or not bool(self.triggered.any()):
            return {}
        return {"reanchor_original": self.original}

    def guide(self, state: StepState):
        s = float(state.s0)
        e_u, e_m = state.e_u, state.e_c
        eps = cfg_combine(e_u, e_m, s)
        m = per_sample_norm(e_m - e_u).cpu()
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
