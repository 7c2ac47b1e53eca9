"""Classifier-free guidance, the baseline `cfg` (Ho & Salimans 2022): eps_hat = e_u + s0 (e_c - e_u)."""

from __future__ import annotations

from memaudit.guidance.base import Guidance, StepState, cfg_combine


class CFG(Guidance):
    name = "cfg"

    def guide(self, state: StepState):
        return cfg_combine(state.e_u, state.e_c, state.s0), {}
