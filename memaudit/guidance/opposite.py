"""`opposite` and `opposite-dynamic` guidance (Jain et al. CVPR 2025; METHODS.md 3.1).

s = -s_opp (guidance away from the prompt) before the transition, then s0. Default
s_opp = 2. `opposite` uses the static transition at tau = 0.65 T (paper setting);
`opposite-dynamic` the per-sample dynamic rule of `dynamic`. Follows the paper text (the
official opposite-guidance script does not run as committed). No extra UNet calls. On flow
models magnitudes and switch points follow METHODS 0 (memaudit/guidance/transition.py):
tau = 0.65 switches at sigma 0.733, Stable Diffusion's SNR at t = 0.65 T.
"""

from __future__ import annotations

from dataclasses import dataclass

from memaudit.guidance.base import Guidance, StepState
from memaudit.guidance.transition import (
    apply_scale,
    dynamic_switch,
    scale_from_switch,
    static_switch,
)
from memaudit.models.base import COND, UNCOND


class Opposite(Guidance):
    name = "opposite"
    requires = frozenset({COND, UNCOND})

    @dataclass
    class Params:
        s_opp: float = 2.0
        tau: float = 0.65

    def guide(self, state: StepState):
        sw, trace = static_switch(state, self.params.tau)
        return apply_scale(state, scale_from_switch(sw, -self.params.s_opp, state.s0), sw,
                           trace)


class OppositeDynamic(Guidance):
    name = "opposite-dynamic"
    requires = frozenset({COND, UNCOND})

    @dataclass
    class Params:
        s_opp: float = 2.0
        min_step: int = 2
        force_u: float = 0.2

    def guide(self, state: StepState):
        sw, d, trace = dynamic_switch(state, self.params.min_step, self.params.force_u)
        scale = scale_from_switch(sw, -self.params.s_opp, state.s0)
        return apply_scale(state, scale, sw, {"d": d, **trace})
