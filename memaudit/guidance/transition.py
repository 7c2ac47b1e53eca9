"""Shared rules of the transition-point family (Jain et al., "Classifier-Free Guidance inside
the Attraction Basin May Cause Memorization", CVPR 2025; METHODS.md 3.1).

All members use eps_hat = e_u + s(t) (e_c - e_u) with a per-sample scale s; only the rule for
s differs. No extra UNet calls. The transition step of each sample is kept in
`state.memory["switch_step"]` (-1 until it switches) and traced every step.
"""

from __future__ import annotations

from typing import Any

import torch

from memaudit.guidance.base import StepState, cfg_combine, per_sample_norm


def _batch(state: StepState) -> int:
    return int(state.e_c.shape[0])


def static_switch(state: StepState, tau: float) -> torch.Tensor:
    """Static transition (METHODS 3.1): a sample has switched once t <= tau T, i.e. u <= tau.

    Returns the per-sample `switch_step` [B] (long, -1 before the switch), kept in memory.
    """
    b = _batch(state)
    sw = state.memory.get("switch_step")
    if sw is None:
        sw = torch.full((b,), -1, dtype=torch.long)
    if state.u <= tau:
        sw = torch.where(sw < 0, torch.full_like(sw, state.index), sw)
    state.memory["switch_step"] = sw
    return sw


def dynamic_switch(state: StepState, min_step: int, force_u: float = 0.2
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic transition (METHODS 3.1), decided per sample.

    d_j = ||e_c - e_u||_2 per sample. A sample switches at the first step j >= max(2, min_step)
    with d_j > d_{j-1} and d_{j-2} > d_{j-1} (a strict local minimum at j-1, seen one step
    late); if it has not switched by u <= force_u (0.2) it switches there. The switch step
    itself already uses the post-transition scale. Returns (switch_step [B], d_j [B]).
    """
    d = per_sample_norm((state.e_c - state.e_u).float()).cpu()
    b = d.shape[0]
    sw = state.memory.get("switch_step")
    if sw is None:
        sw = torch.full((b,), -1, dtype=torch.long)
    d1 = state.memory.get("d_prev1")  # d_{j-1}
    d2 = state.memory.get("d_prev2")  # d_{j-2}
    j = state.index
    pending = sw < 0
    if j >= max(2, min_step) and d1 is not None and d2 is not None:
        local_min = (d > d1) & (d2 > d1)
        sw = torch.where(pending & local_min, torch.full_like(sw, j), sw)
    if state.u <= force_u:
        sw = torch.where(sw < 0, torch.full_like(sw, j), sw)
    state.memory["d_prev2"] = d1
    state.memory["d_prev1"] = d
    state.memory["switch_step"] = sw
    return sw, d


def scale_from_switch(switch_step: torch.Tensor, before: float, after: float) -> torch.Tensor:
    """s = `before` for samples that have not switched (switch_step < 0), else `after`."""
    return torch.where(switch_step >= 0, torch.tensor(float(after)), torch.tensor(float(before)))


def apply_scale(state: StepState, scale: torch.Tensor, switch_step: torch.Tensor,
                extra: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """eps_hat = e_u + s (e_c - e_u) per sample, plus the family's trace: scale, switch_step
    and d = ||e_c - e_u||_2 (the magnitude of the paper's Figures 2-3, also before a static
    switch, where guidance_norm is s * d = 0)."""
    eps = cfg_combine(state.e_u, state.e_c, scale.to(state.e_u.device))
    trace: dict[str, Any] = {"scale": scale.float(), "switch_step": switch_step.clone()}
    if not extra or "d" not in extra:
        trace["d"] = per_sample_norm((state.e_c - state.e_u).float()).cpu()
    if extra:
        trace.update(extra)
    return eps, trace
