"""`dynamic` transition-point guidance (Jain et al. CVPR 2025; METHODS.md 3.1).

s = 1 (conditional only, no CFG) until the per-sample transition, then s0. The transition is
the first strict local minimum of d_j = ||e_c - e_u||_2 (seen one step late), searched from
step `min_step`, forced at u = 0.2. Decided per sample (the official script's batch-wide
norm couples samples). No extra UNet calls; the switch step is traced. On flow models d_j is
the noise-prediction magnitude ||(1 - sigma)(v_c - v_u)|| and the fallback the sigma with
Stable Diffusion's SNR at u = 0.2 (0.364), traced as `force_sigma` (METHODS 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from memaudit.guidance.base import Guidance, StepState
from memaudit.guidance.transition import apply_scale, dynamic_switch, scale_from_switch
from memaudit.models.base import COND, UNCOND


class Dynamic(Guidance):
    name = "dynamic"
    requires = frozenset({COND, UNCOND})

    @dataclass
    class Params:
        min_step: int = 2  # earliest step j at which a switch may be detected (official: 2)
        force_u: float = 0.2  # switch at u <= force_u when no minimum was found
        s_before: float = 1.0

    def guide(self, state: StepState):
        sw, d, trace = dynamic_switch(state, self.params.min_step, self.params.force_u)
        scale = scale_from_switch(sw, self.params.s_before, state.s0)
        return apply_scale(state, scale, sw, {"d": d, **trace})
