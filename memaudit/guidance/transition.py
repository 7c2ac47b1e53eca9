"""Shared rules of the transition-point family (Jain et al., "Classifier-Free Guidance inside
the Attraction Basin May Cause Memorization", CVPR 2025; METHODS.md 3.1).

All members use eps_hat = e_u + s(t) (e_c - e_u) with a per-sample scale s; only the rule for
s differs. No extra UNet calls. The transition step of each sample is kept in
`state.memory["switch_step"]` (-1 until it switches) and traced every step.

Every family means the same rule (METHODS 0; memaudit/models/prediction.py): the magnitude d
is the noise-prediction magnitude (||e_c - e_u|| for eps, ||(1 - sigma)(v_c - v_u)|| for flow
matching, `state.magnitude()`), and a switch point tau (static/opposite tau, the dynamic rule's
u = 0.2 fallback) is a fraction u = t / T of a DDPM-type schedule, on flow models the sigma with
Stable Diffusion's SNR at t = tau T (`state.switch_level`: tau 0.5 -> sigma 0.618, 0.65 ->
0.733). The trace records tau (`tau`, `force_u`) and, on flow models, the sigma used
(`switch_sigma`, `force_sigma`).
"""

from __future__ import annotations

from typing import Any

import torch

from memaudit.guidance.base import StepState, cfg_combine


def _batch(state: StepState) -> int:
    return int(state.e_c.shape[0])


def switch_point(state: StepState, tau: float, name: str = "tau",
                 sigma_name: str = "switch_sigma") -> tuple[bool, dict[str, Any]]:
    """(whether this step is at or past the switch point tau, its trace): u <= tau on eps
    families, sigma <= the sigma with SD's SNR at tau on flow models (METHODS 0)."""
    level = state.switch_level(tau)
    trace: dict[str, Any] = {name: float(tau)}
    if getattr(state.prediction, "kind", "eps") == "velocity":
        trace[sigma_name] = level  # flow matching: the sigma the switch used
    return state.u <= level, trace


def static_switch(state: StepState, tau: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """Static transition (METHODS 3.1): a sample has switched once t <= tau T, i.e. u <= tau
    (flow: sigma <= the sigma with SD's SNR at tau).

    Returns the per-sample `switch_step` [B] (long, -1 before the switch), kept in memory, and
    the trace of the switch point (tau, and switch_sigma on flow models).
    """
    b = _batch(state)
    sw = state.memory.get("switch_step")
    if sw is None:
        sw = torch.full((b,), -1, dtype=torch.long)
    reached, trace = switch_point(state, tau)
    if reached:
        sw = torch.where(sw < 0, torch.full_like(sw, state.index), sw)
    state.memory["switch_step"] = sw
    return sw, trace


def dynamic_update(memory: dict[str, Any], j: int, d: torch.Tensor, min_step: int,
                   force: bool) -> torch.Tensor:
    """The dynamic rule on the magnitudes d [B] of step j, kept in `memory`: switch at the
    first j >= max(2, min_step) with d_j > d_{j-1} and d_{j-2} > d_{j-1}, or where `force`
    (the fallback point is reached) for a sample that has not. Returns switch_step [B]."""
    sw = memory.get("switch_step")
    if sw is None:
        sw = torch.full((d.shape[0],), -1, dtype=torch.long)
    d1 = memory.get("d_prev1")  # d_{j-1}
    d2 = memory.get("d_prev2")  # d_{j-2}
    pending = sw < 0
    if j >= max(2, min_step) and d1 is not None and d2 is not None:
        local_min = (d > d1) & (d2 > d1)
        sw = torch.where(pending & local_min, torch.full_like(sw, j), sw)
    if force:
        sw = torch.where(sw < 0, torch.full_like(sw, j), sw)
    memory["d_prev2"] = d1
    memory["d_prev1"] = d
    memory["switch_step"] = sw
    return sw


def dynamic_switch(state: StepState, min_step: int, force_u: float = 0.2
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Dynamic transition (METHODS 3.1), decided per sample.

    d_j = the noise-prediction magnitude of e_c - e_u per sample (`state.magnitude()`). A
    sample switches at the first step j >= max(2, min_step) with d_j > d_{j-1} and
    d_{j-2} > d_{j-1} (a strict local minimum at j-1, seen one step late); if it has not
    switched by u <= force_u (0.2; flow: the sigma with SD's SNR there) it switches there. The
    switch step itself already uses the post-transition scale. Returns (switch_step [B],
    d_j [B], the fallback's trace: force_u, and force_sigma on flow models).
    """
    d = state.magnitude()
    force, trace = switch_point(state, force_u, "force_u", "force_sigma")
    return dynamic_update(state.memory, state.index, d, min_step, force), d, trace


def scale_from_switch(switch_step: torch.Tensor, before: float, after: float) -> torch.Tensor:
    """s = `before` for samples that have not switched (switch_step < 0), else `after`."""
    return torch.where(switch_step >= 0, torch.tensor(float(after)), torch.tensor(float(before)))


def apply_scale(state: StepState, scale: torch.Tensor, switch_step: torch.Tensor,
                extra: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """eps_hat = e_u + s (e_c - e_u) per sample, plus the family's trace: scale, switch_step
    and d = the noise-prediction magnitude of e_c - e_u (the magnitude of the paper's Figures
    2-3, also before a static switch, where guidance_norm is s * d = 0)."""
    eps = cfg_combine(state.e_u, state.e_c, scale.to(state.e_u.device))
    trace: dict[str, Any] = {"scale": scale.float(), "switch_step": switch_step.clone()}
    if not extra or "d" not in extra:
        trace["d"] = state.magnitude()
    if extra:
        trace.update(extra)
    return eps, trace
