"""The `ScreenScore` interface: one pre-generation screening score, one small object (METHODS 2,
2.1). Like the guidances (memaudit/guidance/base.py), each score is a file with a `Params`
dataclass and a registry line in memaudit/screen/__init__.py.

The driver (`memaudit.screen.screen_prompts`) owns the rows, the seeds and the batching: rows are
(prompt, seed) pairs, x_T of a row is the sampler's (`initial_noise`, times the scheduler's
`init_noise_sigma`), and a chunk of rows gets a fresh scheduler with `set_timesteps` done. A
score only turns one chunk into one value per row (`score_rows`); the prompt's score is the mean
over its seeds. Higher always means "more likely memorized".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from memaudit.common import UserError, make_params
from memaudit.models.cond import Cond


@dataclass
class ScoreInput:
    """One chunk of (prompt, seed) rows, ready to score."""

    model: Any  # the Denoiser
    x: torch.Tensor  # x_T [B, C, H, W] (the sampler's, scaled by init_noise_sigma)
    emb_c: Cond  # conditions of the prompts, B rows
    emb_u: Cond  # the null condition, B rows
    scheduler: Any  # fresh, set_timesteps(num_inference_steps) done
    steps: int  # first steps averaged (multi-step scores only)
    s0: float  # CFG scale (trajectory of multi-step scores)


class ScreenScore:
    """Base class. Subclasses set `name`, `paper` (as the report cites it),
    `Params` (defaults from METHODS.md), the cost they declare, and `score_rows`. `multi_step`
    scores accept steps > 1."""

    name: ClassVar[str] = "base"
    paper: ClassVar[str] = ""
    multi_step: ClassVar[bool] = False

    @dataclass
    class Params:
        pass

    def __init__(self, **params: Any) -> None:
        self.params = make_params(self.Params, params, f"screening score {self.name!r}")

    def check(self, model: Any, steps: int) -> None:
        """A one-line `UserError` when this score cannot run on `model` with `steps`."""
        if steps != 1 and not self.multi_step:
            raise UserError(f"screening score {self.name!r} is evaluated at x_T only: "
                            f"--steps must be 1 (got {steps})")

    def bind(self, model: Any, given: dict[str, Any] | None = None) -> None:
        """Resolve the parameters that depend on the model (e.g. anisotropy's weights per
        family) and note where they come from; `given` are the ones the user set. Called by
        `score_for` and again by `screen_prompts` (idempotent)."""

    def notes(self) -> list[str]:
        """Lines saying where parameters that are not the published ones come from (printed
        by `memaudit screen`, recorded with the scores, shown in the report)."""
        return []

    def record(self) -> dict[str, Any]:
        """What screening records of this score: its name, paper, parameters and notes."""
        from dataclasses import asdict

        return {"score": self.name, "paper": self.paper, "params": asdict(self.params),
                "notes": self.notes()}

    def forwards(self, steps: int) -> int:
        """Batched forward passes per chunk of rows (= per seed, whatever the chunk size)."""
        raise NotImplementedError

    def rows(self, steps: int) -> int:
        """UNet rows evaluated per (prompt, seed)."""
        raise NotImplementedError

    def score_rows(self, inp: ScoreInput) -> torch.Tensor:
        """The score of each row: float64 [B] on the CPU."""
        raise NotImplementedError


def cond_uncond(model: Any, x: torch.Tensor, t: torch.Tensor, emb_u: Cond, emb_c: Cond
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_u, e_c) from one batched forward of 2B rows, float32."""
    e = model.eps(torch.cat([x, x]), t, Cond.cat([emb_u, emb_c])).float()
    e_u, e_c = e.chunk(2)
    return e_u, e_c


def cfg_walk(inp: ScoreInput, last_step: bool = True):
    """Along cfg's trajectory (scale inp.s0) over the first `inp.steps` steps, per step
    (t, x_t, e_u, e_c, x_next); x_next of the last step is None unless `last_step` (a score
    that reads only the predictions need not take it)."""
    from memaudit.sampler import scale_input

    sched, x = inp.scheduler, inp.x
    for j, t in enumerate(sched.timesteps[:inp.steps]):
        e_u, e_c = cond_uncond(inp.model, scale_input(sched, x, t), t, inp.emb_u, inp.emb_c)
        nxt = (sched.step(e_u + inp.s0 * (e_c - e_u), t, x).prev_sample
               if last_step or j + 1 < inp.steps else None)
        yield t, x, e_u, e_c, nxt
        x = nxt


def row_norm(x: torch.Tensor) -> torch.Tensor:
    """|| x ||_2 per row over all other dimensions, float64 on the CPU."""
    return x.flatten(1).float().norm(dim=1).double().cpu()
