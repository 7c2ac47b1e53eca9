"""`gni` Gaussian noise on the text embedding (Somepalli et al. NeurIPS 2023; METHODS.md 3.3):
emb + lambda N(0, I), lambda = 0.1, on both the conditional and the unconditional embedding
(as the official code does); the noise of each row comes from its generation seed. Every
prompt-derived tensor of the condition (`TEXT_KEYS`: the states and, where the family has one,
the pooled embedding) is perturbed; ids and class labels are not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memaudit.guidance.base import Guidance
from memaudit.guidance.perturb import row_torch_generator
from memaudit.models.cond import TEXT_KEYS, Cond


class GNI(Guidance):
    name = "gni"

    @dataclass
    class Params:
        lam: float = 0.1

    def prepare_embeddings(self, emb_c: Cond, emb_u: Cond, x_T: torch.Tensor,
                           seeds: list[int], model: Any, t0: torch.Tensor
                           ) -> tuple[Cond, Cond]:
        keys = [k for k in TEXT_KEYS if k in emb_c]
        noise: dict[tuple[str, str], list[torch.Tensor]] = {}
        for s in seeds:  # per row: the conditional tensors' noise, then the unconditional's
            g = row_torch_generator(s, 4)
            for which, cond in (("c", emb_c), ("u", emb_u)):
                for k in keys:
                    shape = tuple(cond.tensors[k].shape[1:])
                    noise.setdefault((which, k), []).append(torch.randn(shape, generator=g))

        def perturbed(which: str, cond: Cond) -> Cond:
            return cond.replace(**{
                k: cond.tensors[k] + self.params.lam * torch.stack(noise[which, k]).to(
                    cond.tensors[k].device, cond.tensors[k].dtype) for k in keys})

        return perturbed("c", emb_c), perturbed("u", emb_u)
