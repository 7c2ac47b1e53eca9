"""`update-norm`: the size of the sampler's first latent updates (after the idea of Huang, Zhang,
Chen, Li, Hong, You, Yang, "Broken Memories: Detecting and Mitigating Memorization in Diffusion
Models with Degraded Generations", KDD 2026, arXiv 2605.22050: memorized generations are
numerically unstable, seen in the norms of the latent updates x_{j+1} - x_j).

memaudit's screening reading of that idea (the paper's stability regions are fitted over whole
generations; its code was not available here): per row, the mean over the first `steps` steps
of ||x_{j+1} - x_j||_2 (all dimensions), x_{j+1} the scheduler's step with the CFG prediction
e_u + s0 (e_c - e_u), i.e. the CFG trajectory the `wen` score follows. It needs no pass beyond
Wen's: one batched forward of 2 rows per (prompt, seed) and step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memaudit.screen.base import ScoreInput, ScreenScore, cfg_walk, row_norm


class UpdateNorm(ScreenScore):
    name = "update-norm"
    paper = "after Huang et al., KDD 2026"
    multi_step = True

    @dataclass
    class Params:
        pass

    def forwards(self, steps: int) -> int:
        return steps

    def rows(self, steps: int) -> int:
        return 2 * steps

    def score_rows(self, inp: ScoreInput) -> torch.Tensor:
        acc = torch.zeros(inp.x.shape[0], dtype=torch.float64)
        for _, x, _, _, nxt in cfg_walk(inp):
            acc += row_norm(nxt - x)
        return acc / inp.steps
