"""`gni` Gaussian noise on the text embedding (Somepalli et al. NeurIPS 2023; METHODS.md 3.3):
emb + lambda N(0, I), lambda = 0.1, on both the conditional and the unconditional embedding
(as the official code does); the noise of each row comes from its generation seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memaudit.guidance.base import Guidance
from memaudit.guidance.perturb import row_torch_generator


class GNI(Guidance):
    name = "gni"

    @dataclass
    class Params:
        lam: float = 0.1

    def prepare_embeddings(self, emb_c: torch.Tensor, emb_u: torch.Tensor, x_T: torch.Tensor,
                           seeds: list[int], model: Any, t0: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        noise_c, noise_u = [], []
        for s in seeds:
            g = row_torch_generator(s, 4)
            noise_c.append(torch.randn(tuple(emb_c.shape[1:]), generator=g))
            noise_u.append(torch.randn(tuple(emb_u.shape[1:]), generator=g))
        nc = torch.stack(noise_c).to(emb_c.device, emb_c.dtype)
        nu = torch.stack(noise_u).to(emb_u.device, emb_u.dtype)
        return emb_c + self.params.lam * nc, emb_u + self.params.lam * nu
