"""Classifier-free guidance, the baseline `cfg` (Ho & Salimans 2022; METHODS.md section 3).

eps_hat = e_u + s0 (e_c - e_u), with s0 the user's scale; no extra UNet calls, no trace fields
(the sampler records `guidance_norm` = ||eps_hat - e_u|| = s0 ||e_c - e_u|| itself).
"""

from __future__ import annotations

from typing import Any

import torch

from memaudit.guidance.base import Guidance, StepState, cfg_combine


class CFG(Guidance):
    name = "cfg"

    def guide(self, state: StepState) -> tuple[torch.Tensor, dict[str, Any]]:
        return cfg_combine(state.e_u, state.e_c, state.s0), {}
