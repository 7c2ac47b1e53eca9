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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from memaudit.models.cond import Cond


@dataclass
class StepState:
    """Everything a guidance may read at one step."""

    index: int  # step index j, 0-based
    num_steps: int
    t: torch.Tensor  # scalar timestep
    u: float  # t / T in [0, 1], 1 = pure noise
    x_t: torch.Tensor  # [B, C, H, W]
    alpha_bar: torch.Tensor  # scalar abar_t
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


class Guidance:
    """Base class: classifier-free guidance with a per-sample scale hook.

    Subclasses set `name`, a `Params` dataclass (defaults from METHODS.md) and override what
    they change. `needs_criterion` tells the sampler to pass the index criterion.
    """

    name: ClassVar[str] = "base"
    needs_criterion: ClassVar[bool] = False
    uses_criterion: ClassVar[bool] = False  # takes the criterion when one is given (auto)

    @dataclass
    class Params:
        pass

    def __init__(self, **params: Any) -> None:
        from memaudit.common import make_params

        self.params = make_params(self.Params, params, f"method {self.name!r}")

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


def cfg_combine(e_u: torch.Tensor, e_c: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """eps_hat = e_u + s (e_c - e_u) with s a float or a per-sample [B] tensor."""
    if torch.is_tensor(scale) and scale.ndim == 1:
        scale = scale.view(-1, *([1] * (e_u.ndim - 1))).to(e_u)
    return e_u + scale * (e_c - e_u)


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """|| x ||_2 over all dimensions of each sample: [B, ...] -> [B]."""
    return x.flatten(1).norm(dim=1)
