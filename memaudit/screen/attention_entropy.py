"""`attention-entropy`: entropy of the cross-attention over the prompt's tokens at the first step
(Ren et al., "Unveiling and Mitigating Memorization in Text-to-image Diffusion Models through
Cross Attention", ECCV 2024; official code renjie3/MemAttn; METHODS.md 2.1).

One forward of the conditional rows only (1 row per (prompt, seed)) at t_T on x_T, with the
cross-attention probabilities read through attention processors
(memaudit/screen/attention.py). Per cross-attention layer l (in execution order), p_l = the
attention averaged over heads and query positions, a distribution over the L_k tokens
(padding included, as the official code does); H(p) = -sum_k p_k log p_k. `aggregate`:
- "layer" (default; official detection mode "E", `detect.py`): H(p_l) of layer `layer`
  (official 3, the fourth of Stable Diffusion 1's 16 layers);
- "all" (the official all-layer aggregate, `detect.py` without `use_special_layer`):
  H(mean over layers of p_l), the entropy of the layer- and head-averaged attention;
- "mean" (memaudit's own variant, not in the paper or the code): the mean over layers of
  H(p_l).
The official evaluation scores higher entropy as memorized (its AUC takes the raw entropy with
memorized prompts as positives); memaudit keeps that sign for every aggregate. Models without
cross-attention (`Denoiser.attention_model()` is None) refuse the score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memaudit.common import UserError
from memaudit.sampler import scale_input
from memaudit.screen.attention import capture_cross_attention, cross_attention_layers
from memaudit.screen.base import ScoreInput, ScreenScore

AGGREGATES = ("layer", "all", "mean")


def head_query_mean(probs: torch.Tensor) -> torch.Tensor:
    """[B, heads, L_q, L_k] attention -> its mean over heads and queries, [B, L_k] float64."""
    return probs.double().mean(dim=(1, 2))


def entropy(p: torch.Tensor) -> torch.Tensor:
    """-sum_k p_k log p_k over the last dimension (0 log 0 = 0)."""
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def token_entropy(probs: torch.Tensor) -> torch.Tensor:
    """[B, heads, L_q, L_k] attention -> entropy of its head-and-query mean over L_k: [B]."""
    return entropy(head_query_mean(probs))


def aggregate_entropy(layers: list[torch.Tensor], aggregate: str, layer: int) -> torch.Tensor:
    """The score per row from each layer's [B, heads, L_q, L_k] attention (execution order)."""
    means = torch.stack([head_query_mean(p) for p in layers], dim=1)  # [B, layers, L_k]
    if aggregate == "layer":
        return entropy(means[:, layer])
    if aggregate == "all":
        return entropy(means.mean(1))
    return entropy(means).mean(1)


class AttentionEntropy(ScreenScore):
    name = "attention-entropy"
    paper = "Ren et al., ECCV 2024"

    @dataclass
    class Params:
        aggregate: str = "layer"  # layer (official E) | all (official aggregate) | mean (own)
        layer: int = 3  # with aggregate = layer: the layer in execution order (official 3)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params.aggregate not in AGGREGATES:
            raise UserError(f"attention-entropy.aggregate must be one of {', '.join(AGGREGATES)}"
                            f", got {self.params.aggregate!r}")

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
        if self.params.aggregate == "layer" and not 0 <= self.params.layer < n:
            raise UserError(f"attention-entropy.layer {self.params.layer} is out of range: the "
                            f"model has {n} cross-attention layers (0..{n - 1}; or aggregate "
                            f"= all / mean)")

    def notes(self) -> list[str]:
        if self.params.aggregate == "mean":
            return ["attention-entropy aggregate 'mean' (mean of per-layer entropies) is "
                    "memaudit's own variant, not the paper's"]
        return []

    def forwards(self, steps: int) -> int:
        return 1

    def rows(self, steps: int) -> int:
        return 1

    def probabilities(self, inp: ScoreInput) -> list[torch.Tensor]:
        """Each cross-attention layer's [B, heads, L_q, L_k] attention, execution order."""
        sched = inp.scheduler
        t = sched.timesteps[0]
        with capture_cross_attention(self._module(inp.model)) as seen:
            inp.model.eps(scale_input(sched, inp.x, t), t, inp.emb_c)
        return [p for _, p in seen]

    def layer_entropies(self, inp: ScoreInput) -> torch.Tensor:
        """H(p_l) per row and layer: float64 [B, layers], layers in execution order."""
        return torch.stack([token_entropy(p) for p in self.probabilities(inp)], dim=1)

    def score_rows(self, inp: ScoreInput) -> torch.Tensor:
        return aggregate_entropy(self.probabilities(inp), self.params.aggregate,
                                 self.params.layer)
