"""The `Guidance` interface: one mitigation, one small object (DESIGN.md "Core abstractions").

The sampler owns the timestep loop and batches UNet calls; a guidance never loops over
timesteps. Per step the sampler:
  1. asks `extra_conditions(state)` for extra embeddings to evaluate in the same batched
     forward as the unconditional and conditional rows (AMG's Gdup caption);
  2. fills `state.e_u`, `state.e_c`, `state.extra` and calls `guide(state)`, which returns
     eps_hat [B, ...] and a per-sample trace dict (values: tensors of shape [B] or floats).
Before the loop, `prepare_prompts` may rewrite the prompt text (rna, rta, cwr),
`prepare_embeddings` may change the conditions (gni, wen) and `prepare_noise` the initial
sample x_T (init-noise), all per sample. Conditions are `Cond`s (memaudit/models/cond.py), so a
guidance never learns the model family.

Every rule is per sample: `state.memory` holds per-sample tensors across steps.

Predictions are in the model's guidance space (eps, or velocity for flow matching; METHODS.md
0): `e_u`, `e_c`, eps_hat are whatever `model.eps` returns, and a guidance that needs the x0
estimate or turns a gradient into a prediction change uses `state.x0_hat(pred)` and
`state.gain()`, a magnitude `state.magnitude(d)` (the noise prediction's on every family) and
a switch point `state.switch_level(tau)` (matched by SNR on flow models), never schedule
formulas or norms of its own. A guidance declares the model capabilities
it needs in `requires` (memaudit.models.base.CAPABILITIES); `check_supported` refuses a
method a model cannot run in one line, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from memaudit.models.cond import Cond
from memaudit.models.prediction import EpsPrediction

_EPS_RULES = EpsPrediction()  # METHODS 0 rules of eps-prediction, for states without a model


@dataclass
class StepState:
    """Everything a guidance may read at one step."""

    index: int  # step index j, 0-based
    num_steps: int
    t: torch.Tensor  # scalar timestep
    u: float  # t / T in [0, 1], 1 = pure noise
    x_t: torch.Tensor  # [B, C, H, W]
    alpha_bar: torch.Tensor | None  # scalar abar_t (eps families; None for flow matching)
    s0: float  # the user's CFG scale
    model: Any  # the Denoiser adapter
    criterion: Any = None  # a Criterion when the guidance needs one (AMG)
    e_u: torch.Tensor | None = None
    e_c: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    emb_u: Cond | None = None  # conditions used this step
    emb_c: Cond | None = None
    memory: dict[str, Any] = field(default_factory=dict)  # per-sample state across steps
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    def x0_hat(self, pred: torch.Tensor, x_t: torch.Tensor | None = None) -> torch.Tensor:
        """The model's x0 estimate from a prediction (default at this step's x_t; pass an x_t
        that requires grad to differentiate through it)."""
        return self.model.x0_estimate(self.x_t if x_t is None else x_t, pred, self.t)

    def gain(self) -> torch.Tensor:
        """AMG's Gsim gain at this step (sqrt(1 - abar_t) for eps, sigma / (1 - sigma)^2 for
        velocity, 0 at sigma = 1; memaudit/models/prediction.py)."""
        return self.model.guidance_gain(self.t)

    # --- METHODS 0: one meaning on every family (memaudit/models/prediction.py) -----------
    @property
    def prediction(self) -> Any:
        """The model's prediction object; a state without a model (hand-made in tests) is
        eps-prediction."""
        return getattr(self.model, "prediction", None) or _EPS_RULES

    def magnitude(self, d: torch.Tensor | None = None) -> torch.Tensor:
        """The noise-prediction magnitude [B] (CPU) of a prediction difference d at this x_t
        (default e_c - e_u): ||d|| for eps, ||(1 - sigma) d|| for velocity."""
        d = self.e_c - self.e_u if d is None else d
        return self.prediction.magnitude(d, self.t).cpu()

    def switch_level(self, tau: float) -> float:
        """A switch point tau of METHODS 3.1 as a level of `u`: tau for eps, the sigma with
        SD's SNR at tau for velocity. The step has switched once u <= switch_level(tau)."""
        return float(self.prediction.switch_level(tau))

    @property
    def u_ref(self) -> float:
        """u on SD's schedule with this step's SNR (u itself for eps families)."""
        return float(self.prediction.ref_u(self.u))

    def has_signal(self) -> bool:
        """Whether x0_hat depends on the image at this step (not at a flow sigma of 1)."""
        return bool(torch.as_tensor(self.prediction.has_signal(self.t)).all())


class Guidance:
    """Base class: classifier-free guidance with a per-sample scale hook.

    Subclasses set `name`, a `Params` dataclass (defaults from METHODS.md) and override what
    they change. `needs_criterion` tells the sampler to pass the index criterion; `requires`
    names the model capabilities the method needs (memaudit.models.base.CAPABILITIES).
    """

    name: ClassVar[str] = "base"
    needs_criterion: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset()
    uses_criterion: ClassVar[bool] = False  # takes the criterion when one is given (auto)

    @dataclass
    class Params:
        pass

    def __init__(self, **params: Any) -> None:
        from memaudit.common import make_params

        self.params = make_params(self.Params, params, f"method {self.name!r}")

    def required(self) -> dict[str, str]:
        """capability -> why this method needs it (a guidance whose needs depend on its
        parameters, e.g. AMG's parts, overrides this)."""
        return {c: f"method {self.name!r}" for c in self.requires}

    # --- before the loop -------------------------------------------------------------
    def prepare_prompts(self, prompts: list[str], seeds: list[int], model: Any) -> list[str]:
        return prompts

    def prepare_embeddings(self, emb_c: Cond, emb_u: Cond, x_T: torch.Tensor,
                           seeds: list[int], model: Any, t0: torch.Tensor
                           ) -> tuple[Cond, Cond]:
        return emb_c, emb_u

    def prepare_noise(self, x_T: torch.Tensor, emb_c: Cond, emb_u: Cond, seeds: list[int],
                      model: Any, t0: torch.Tensor) -> torch.Tensor:
        """The initial sample the loop starts from (default: x_T unchanged)."""
        return x_T

    def generation_record(self, prompt: str, seed: int) -> dict[str, Any]:
        """Per-generation facts to record beside the image (auto's decision); default none."""
        return {}

    # --- each step --------------------------------------------------------------------
    def extra_conditions(self, state: StepState) -> dict[str, Cond]:
        return {}

    def guide(self, state: StepState) -> tuple[torch.Tensor, dict[str, Any]]:
        """eps_hat and a trace; the default is plain CFG, which mitigations that only change
        the prompt or the embeddings (rna, rta, cwr, gni) keep."""
        return cfg_combine(state.e_u, state.e_c, state.s0), {}


def check_supported(guidance: Guidance, model: Any, label: str | None = None) -> None:
    """A one-line `UserError` when `model` lacks a capability `guidance` requires."""
    from memaudit.common import UserError
    from memaudit.models.base import CAPABILITIES

    have = set(getattr(model, "capabilities", CAPABILITIES))
    required = guidance.required() if hasattr(guidance, "required") else {}
    missing = {c: why for c, why in required.items() if c not in have}
    if missing:
        what = "; ".join(f"{why} needs {CAPABILITIES.get(c, c)}" for c, why in missing.items())
        family = getattr(model, "family", type(model).__name__)
        raise UserError(f"method {label or guidance.name!r} does not apply to {family} model "
                        f"{getattr(model, 'name', '')}: {what}")


def cfg_combine(e_u: torch.Tensor, e_c: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """eps_hat = e_u + s (e_c - e_u) with s a float or a per-sample [B] tensor."""
    if torch.is_tensor(scale) and scale.ndim == 1:
        scale = scale.view(-1, *([1] * (e_u.ndim - 1))).to(e_u)
    return e_u + scale * (e_c - e_u)


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """|| x ||_2 over all dimensions of each sample: [B, ...] -> [B]."""
    return x.flatten(1).norm(dim=1)
