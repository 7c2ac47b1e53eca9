"""`anisotropy`: norm plus angular alignment at x_T (Asthana & Belagiannis, "Detecting and
Mitigating Memorization in Diffusion Models through Anisotropy of the Log-Probability",
ICLR 2026; official code rohanasthana/memorization-anisotropy; METHODS.md 2.1).

On the same x_T, with t_T the first and t_low the `low_index`-th (default -3: third to last)
timestep of the inference schedule:
  N = ||e_c(x_T, t_T) - e_u(x_T, t_T)||_2                        (isotropic term, all dims)
  A = mean over pixels of cos(e_u(x_T, t_low), e_c(x_T, t_low) - e_u(x_T, t_low))
      (the cosine over channels at each pixel; the anisotropic term)
  score = g1 N + g2 A, g = (1, 2) for SD 1.x (official), (1, 0.1) for SD 2.x.
The four predictions come from ONE batched forward of 4 rows per (prompt, seed) with per-row
timesteps [t_T, t_T, t_low, t_low] (the official code makes two forwards of 2 rows); no
gradients. eps throughout: v-prediction models are converted at the adapter (the official
SD 2 code takes the norm on the score, the cosine on v).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memaudit.models.cond import Cond
from memaudit.screen.base import ScoreInput, ScreenScore, row_norm


class Anisotropy(ScreenScore):
    name = "anisotropy"

    @dataclass
    class Params:
        g1: float = 1.0  # weight of the norm at t_T
        g2: float = 2.0  # weight of the cosine at t_low (SD 1.x; 0.1 for SD 2.x)
        low_index: int = -3  # t_low = scheduler.timesteps[low_index]

    def forwards(self, steps: int) -> int:
        return 1

    def rows(self, steps: int) -> int:
        return 4

    def terms(self, inp: ScoreInput) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, A) per row, float64 on the CPU."""
        sched, x, b = inp.scheduler, inp.x, inp.x.shape[0]
        t_hi, t_lo = sched.timesteps[0], sched.timesteps[self.params.low_index]
        x_hi, x_lo = sched.scale_model_input(x, t_hi), sched.scale_model_input(x, t_lo)
        t = torch.cat([t_hi.reshape(1).expand(2 * b), t_lo.reshape(1).expand(2 * b)])
        e = inp.model.eps(torch.cat([x_hi, x_hi, x_lo, x_lo]), t,
                          Cond.cat([inp.emb_u, inp.emb_c, inp.emb_u, inp.emb_c])).float()
        e_u, e_c, l_u, l_c = e.chunk(4)
        cos = F.cosine_similarity(l_u, l_c - l_u, dim=1)  # [B, H, W]
        return row_norm(e_c - e_u), cos.flatten(1).mean(1).double().cpu()

    def score_rows(self, inp: ScoreInput) -> torch.Tensor:
        n, a = self.terms(inp)
        return self.params.g1 * n + self.params.g2 * a
