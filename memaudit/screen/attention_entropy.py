"""`attention-entropy`: entropy of the cross-attention over the prompt's tokens at the first step
(Ren et al., "Unveiling and Mitigating Memorization in Text-to-image Diffusion Models through
Cross Attention", ECCV 2024; official code renjie3/MemAttn, detection mode "E"; METHODS.md 2.1).

One forward of the conditional rows only (1 row per (prompt, seed)) at t_T on x_T, with the
cross-attention probabilities read through attention processors
(memaudit/screen/attention.py). Per cross-attention layer l (in execution order), p_l = the
attention averaged over heads and query positions, a distribution over the L_k tokens
(padding included, as the official code does); H_l = -sum_k p_l,k log p_l,k. Score = H of
layer `layer` (official: 3, the fourth of Stable Diffusion 1's 16 layers), or the mean of H_l
over all layers with `layer = -1`. The official detector scores higher entropy as memorized
(its AUC takes the raw entropy with memorized prompts as positives); memaudit keeps that sign.
Models without cross-attention (`Denoiser.attention_model()` is None) refuse the score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memaudit.common import UserError
from memaudit.screen.attention import capture_cross_attention, cross_attention_layers
from memaudit.screen.base import ScoreInput, ScreenScore


def token_entropy(probs: torch.Tensor) -> torch.Tensor:
    """[B, heads, L_q, L_k] attention -> entropy of its head-and-query mean over L_k: [B]."""
    p = probs.double().mean(dim=(1, 2))
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


class AttentionEntropy(ScreenScore):
    name = "attention-entropy"

    @dataclass
    class Params:
        layer: int = 3  # cross-attention layer in execution order; -1: mean over all layers

    def _module(self, model: Any) -> torch.nn.Module:
        hook = getattr(model, "attention_model", None)
        module = hook() if hook is not None else None
        if module is None or not cross_attention_layers(module):
            raise UserError(f"screening score 'attention-entropy' needs cross-attention; "
                            f"{getattr(model, 'name', type(model).__name__)} has none")
        return module

    def check(self, model: Any, steps: int) -> None:
        super().check(model, steps)
        n = len(cross_attention_layers(self._module(model)))
        if not -1 <= self.params.layer < n:
            raise UserError(f"attention-entropy.layer {self.params.layer} is out of range: the "
                            f"model has {n} cross-attention layers (0..{n - 1}, or -1 for all)")

    def forwards(self, steps: int) -> int:
        return 1

    def rows(self, steps: int) -> int:
        return 1

    def layer_entropies(self, inp: ScoreInput) -> torch.Tensor:
        """H_l per row and layer: float64 [B, layers], layers in execution order."""
        sched = inp.scheduler
        t = sched.timesteps[0]
        with capture_cross_attention(self._module(inp.model)) as seen:
            inp.model.eps(sched.scale_model_input(inp.x, t), t, inp.emb_c)
        return torch.stack([token_entropy(p) for _, p in seen], dim=1)

    def score_rows(self, inp: ScoreInput) -> torch.Tensor:
        h = self.layer_entropies(inp)
        return h.mean(1) if self.params.layer == -1 else h[:, self.params.layer]
