"""`wen` prompt-embedding adjustment (Wen et al., "Detecting, Explaining, and Mitigating
Memorization in Diffusion Models", ICLR 2024; METHODS.md 3.4).

At x_T only, optimise the conditional embedding e (first token frozen) to minimise, per
sample, L(e) = || eps(x_T, e) - eps(x_T, null) ||_2 with AdamW (lr 0.05), at most 10
iterations; a sample stops once L <= target, where target is `target` when given (3.0 for
SD v1 latents) else `fraction` (0.5) of its initial loss. Then sampling is plain CFG from the
same x_T with the adjusted e. Deterministic given x_T (which comes from the generation seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memaudit.guidance.base import Guidance, StepState, cfg_combine, per_sample_norm
from memaudit.models.cond import Cond


class Wen(Guidance):
    name = "wen"

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
        with torch.enable_grad():
            e = emb_c.emb.detach().clone().requires_grad_(True)
            first = emb_c.emb[:, :1].detach().clone()
            opt = torch.optim.AdamW([e], lr=p.lr)
            b = len(emb_c)
            done = torch.zeros(b, dtype=torch.bool, device=e.device)
            frozen = e.detach().clone()
            loss0 = None
            loss = None
            iters = torch.zeros(b, dtype=torch.long)
            for it in range(p.max_iters + 1):
                loss = per_sample_norm(model.eps(x_T, t0, emb_c.replace(emb=e)) - e_null)
                if loss0 is None:
                    loss0 = loss.detach().clone()
                    target = (torch.full_like(loss0, p.target) if p.target is not None
                              else p.fraction * loss0)
                newly = (loss.detach() <= target) & ~done
                frozen[newly] = e.detach()[newly]
                done = done | newly
                if bool(done.all()) or it == p.max_iters:
                    break
                iters += (~done).long().cpu()
                opt.zero_grad()
                (loss * (~done).float()).sum().backward()
                e.grad[:, 0] = 0
                opt.step()
                with torch.no_grad():
                    e[:, :1] = first  # the first token stays frozen
                    e[done] = frozen[done]  # stopped samples keep the embedding that met the target
        final = e.detach()
        final[done] = frozen[done]
        self.last = {"wen_loss0": loss0.detach().cpu(), "wen_loss": loss.detach().cpu(),
                     "wen_iters": iters, "wen_reached": done.cpu().float()}
        return emb_c.replace(emb=final), emb_u

    def guide(self, state: StepState):
        return cfg_combine(state.e_u, state.e_c, state.s0), dict(self.last)
