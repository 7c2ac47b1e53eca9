"""`wen`: the noise-difference magnitude (Wen et al., "Detecting, Explaining, and Mitigating
Memorization in Diffusion Models", ICLR 2024; METHODS.md 2).

Per row, m_j = ||e_c - e_u||_2 (all dimensions) at each of the first `steps` steps, averaged.
For steps > 1 the row follows the CFG trajectory (eps_hat = e_u + s0 (e_c - e_u) fed to the
scheduler). One batched forward of 2 rows per (prompt, seed) and step. m_j is the noise-
prediction magnitude on every family (METHODS 0; the model's `prediction.magnitude`): on flow
models ||(1 - sigma)(v_c - v_u)||_2, with 1 - sigma floored at 1 / T at the first step, where
sigma = 1 (memaudit/models/prediction.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memaudit.screen.base import ScoreInput, ScreenScore, cfg_walk


class Wen(ScreenScore):
    name = "wen"
    paper = "Wen et al., ICLR 2024"
    multi_step = True

    @dataclass
    class Params:
        pass

    def forwards(self, steps: int) -> int:
        return steps

    def rows(self, steps: int) -> int:
        return 2 * steps

    def score_rows(self, inp: ScoreInput) -> torch.Tensor:
        acc = torch.zeros(inp.x.shape[0], dtype=torch.float64)
        for t, _, e_u, e_c, _ in cfg_walk(inp, last_step=False):
            acc += inp.model.prediction.magnitude(e_c - e_u, t).double().cpu()
        return acc / inp.steps
