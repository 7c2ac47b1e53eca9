"""`static` transition-point guidance (Jain et al. CVPR 2025; METHODS.md 3.1).

s(t) = s_before while t > tau T, then s0 (defaults tau = 0.5, s_before = 0: unconditional
first, then full CFG). No extra UNet calls. On flow models (SD3, FLUX) the switch is at the
sigma with Stable Diffusion's SNR at t = tau T (0.618 for tau = 0.5; METHODS 0), recorded
beside tau in the trace (`tau`, `switch_sigma`).
"""

from __future__ import annotations

from dataclasses import dataclass

from memaudit.guidance.base import Guidance, StepState
from memaudit.guidance.transition import apply_scale, scale_from_switch, static_switch
from memaudit.models.base import COND, UNCOND


class Static(Guidance):
    name = "static"
    requires = frozenset({COND, UNCOND})

    @dataclass
    class Params:
        tau: float = 0.5  # transition at t = tau T
        s_before: float = 0.0

    def guide(self, state: StepState):
        sw, trace = static_switch(state, self.params.tau)
        return apply_scale(state, scale_from_switch(sw, self.params.s_before, state.s0), sw,
                           trace)
