"""Pre-generation screening (METHODS.md 2, 2.1): score prompts before generating, flag those above
a threshold calibrated on prompts known to be clean. Scores are a registry like the guidances;
adding one is a file here and one registry line below.

`screen_prompts(model, prompts, score=..., seeds=4)` -> float64 [len(prompts)]: rows are
(prompt, seed) pairs, `batch_size` at a time, x_T the sampler's per seed; a prompt's score is
the mean over its seeds of the score's per-row value.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from memaudit.common import UserError, progress_bar, require_finite
from memaudit.models.base import CAPABILITIES, TEXT, UNCOND
from memaudit.models.cond import as_cond
from memaudit.sampler import initial_noise
from memaudit.screen.anisotropy import Anisotropy
from memaudit.screen.attention_entropy import AttentionEntropy
from memaudit.screen.base import ScoreInput, ScreenScore
from memaudit.screen.stats import auc, calibrate_threshold, tpr_at_fpr
from memaudit.screen.update_norm import UpdateNorm
from memaudit.screen.wen import Wen

REGISTRY: dict[str, type[ScreenScore]] = {
    "wen": Wen,
    "anisotropy": Anisotropy,
    "attention-entropy": AttentionEntropy,
    "update-norm": UpdateNorm,
}

#: The score `memaudit screen`, a plan's [screen], `gate --screen` and `auto` use by default:
#: anisotropy, the best on the canary's labelled split at one batched pass per seed with its
#: tuned weights, and published as better than Wen's magnitude on SD 1.4 / 2 with the official
#: ones (docs/mitigations.md "Screening scores"); families without tuned weights fall back to
#: SD 1.x's and say so.
DEFAULT_SCORE = "anisotropy"


def make_score(name: str | None = None, **params: Any) -> ScreenScore:
    """Instantiate a registered screening score (None: the default); unknown names are a
    one-line error."""
    name = name or DEFAULT_SCORE
    if name not in REGISTRY:
        raise UserError(f"unknown screening score {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name](**params)


def _seed_list(seeds: int | list[int]) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise UserError("--seeds must be >= 1")
        return list(range(seeds))
    if not seeds:
        raise UserError("give at least one seed")
    return [int(s) for s in seeds]


@torch.no_grad()
def screen_prompts(model: Any, prompts: list[str], steps: int = 1, seeds: int | list[int] = 4,
                   guidance_scale: float | None = None, batch_size: int = 32,
                   num_inference_steps: int | None = None, scheduler: str | None = None,
                   score: str | ScreenScore | None = None, params: dict[str, Any] | None = None,
                   progress: bool = True) -> np.ndarray:
    """The screening score of each prompt (METHODS 2): float64 [len(prompts)].

    `score` is a registered name (default `DEFAULT_SCORE`) or a `ScreenScore`; `params` its
    parameters over the model's own (`Denoiser.screen_params`). `seeds` is a count (seeds
    0..n-1) or a list; `steps` (multi-step scores only, i.e. wen) and `guidance_scale` (the CFG
    trajectory for steps > 1) as in METHODS 2. `progress=False` shows no progress bar (for
    callers inside another one, e.g. `auto`).
    """
    sc = score if isinstance(score, ScreenScore) else score_for(model, score, params)
    if steps < 1:
        raise UserError("--steps must be >= 1")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    missing = [c for c in (TEXT, UNCOND) if c not in getattr(model, "capabilities", (TEXT, UNCOND))]
    if missing:
        raise UserError(f"screening does not apply to {getattr(model, 'family', '')} model "
                        f"{getattr(model, 'name', '')}: it needs "
                        f"{' and '.join(CAPABILITIES[c] for c in missing)}")
    sc.check(model, steps)
    seed_list = _seed_list(seeds)
    n_inf = int(num_inference_steps or getattr(model, "default_steps", 50))
    if steps > n_inf:
        raise UserError(f"--steps {steps} exceeds the {n_inf}-step schedule")
    s0 = float(model.default_guidance_scale if guidance_scale is None else guidance_scale)
    rows = [(i, s) for i in range(len(prompts)) for s in seed_list]
    total = np.zeros(len(prompts), dtype=np.float64)
    bar = progress_bar(f"screen ({sc.name})", total=len(rows), unit="rows") if progress \
        else nullcontext(lambda n=1: None)
    with bar as advance:
        for start in range(0, len(rows), max(1, batch_size)):
            chunk = rows[start:start + batch_size]
            pidx = [i for i, _ in chunk]
            emb_c = as_cond(model.encode_prompts([prompts[i] for i in pidx]))
            emb_u = as_cond(model.null_embedding(len(chunk)))
            sched = model.scheduler(scheduler, n_inf)  # None: the family's (euler for flow)
            x = initial_noise(model, [s for _, s in chunk],
                              float(getattr(sched, "init_noise_sigma", 1.0)))
            vals = sc.score_rows(ScoreInput(model=model, x=x, emb_c=emb_c, emb_u=emb_u,
                                            scheduler=sched, steps=steps, s0=s0))
            np.add.at(total, np.array(pidx), vals.double().cpu().numpy())
            advance(len(chunk))
    scores = total / len(seed_list)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:  # an error, never a score below any threshold
        require_finite(scores, f"the {sc.name} screening score of {bad.size} prompt(s) "
                       f"(first: {prompts[int(bad[0])]!r})")
    return scores


def score_for(model: Any, name: str | None = None, params: dict[str, Any] | None = None
              ) -> ScreenScore:
    """The score `name` with the model's calibrated parameters (`Denoiser.screen_params`,
    e.g. the canary's anisotropy weights) under the explicit `params`, bound to the model
    (`ScreenScore.bind`: model-dependent defaults such as anisotropy's weights per family,
    and `notes()` saying where they come from)."""
    name = name or DEFAULT_SCORE
    own = dict((getattr(model, "screen_params", None) or {}).get(name, {}))
    sc = make_score(name, **{**own, **(params or {})})
    sc.bind(model, dict(params or {}))
    return sc


__all__ = ["DEFAULT_SCORE", "REGISTRY", "ScoreInput", "ScreenScore", "auc",
           "calibrate_threshold", "initial_noise", "make_score", "score_for", "screen_prompts",
           "tpr_at_fpr"]
