"""`wen` prompt-embedding adjustment (Wen et al., "Detecting, Explaining, and Mitigating
Memorization in Diffusion Models", ICLR 2024; METHODS.md 3.4).

At x_T only, optimise the conditional embedding e (first token frozen) to minimise, per
sample, L(e) = || eps(x_T, e) - eps(x_T, null) ||_2 with AdamW (lr 0.05), at most 10
iterations; a sample stops once L <= target, where target is `target` when given (3.0 for
SD v1 latents) else `fraction` (0.5) of its initial loss. Then sampling is plain CFG from the
same x_T with the adjusted e. Deterministic given x_T (which comes from the generation seed).
The embedding and AdamW's state are float32 whatever the model's dtype. L is the noise-
prediction magnitude on every family (METHODS.md 0, the model's `prediction.magnitude`): on
flow models (1 - sigma) ||v(x_T, e) - v(x_T, null)|| with 1 - sigma floored at 1 / T at x_T,
where sigma = 1; a constant factor there, so the minimiser is the velocity's, and the fraction
target (the default off SD v1) is unchanged by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memaudit.guidance.base import Guidance, StepState, cfg_combine
from memaudit.guidance.optim import minimise_per_row
from memaudit.models.base import TEXT, UNCOND
from memaudit.models.cond import Cond


class Wen(Guidance):
    name = "wen"
    requires = frozenset({TEXT, UNCOND})

    @dataclass
    class Params:
        lr: float = 0.05
        max_iters: int = 10
        fraction: float = 0.5  # target = fraction x initial loss (when `target` is not set)
        target: float | None = None  # absolute target, e.g. 3.0 for SD v1

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.last: dict[str, torch.Tensor] = {}

    def prepare_embeddings(self, emb_c: Cond, emb_u: Cond, x_T: torch.Tensor,
                           seeds: list[int], model: Any, t0: torch.Tensor
                           ) -> tuple[Cond, Cond]:
        p = self.params
        with torch.no_grad():
            e_null = model.eps(x_T, t0, emb_u).detach()
        first = emb_c.emb[:, :1].detach().clone()

        def freeze_grad(e: torch.Tensor) -> None:
            e.grad[:, 0] = 0

        def freeze_value(e: torch.Tensor) -> None:
            e[:, :1] = first  # the first token stays frozen

        res = minimise_per_row(
            emb_c.emb, lambda e: model.prediction.magnitude(
                model.eps(x_T, t0, emb_c.replace(emb=e)) - e_null, t0),
            p.lr, p.max_iters, p.target, p.fraction, freeze_grad, freeze_value)
        self.last = {"wen_loss0": res.loss0.cpu(), "wen_loss": res.loss.cpu(),
                     "wen_iters": res.iters, "wen_reached": res.reached.float()}
        final = res.value
        return emb_c.replace(emb=final), emb_u

    def guide(self, state: StepState):
        return cfg_combine(state.e_u, state.e_c, state.s0), dict(self.last)
