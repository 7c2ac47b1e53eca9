"""Pre-generation screening (Wen et al., "Detecting, Explaining, and Mitigating Memorization in
Diffusion Models", ICLR 2024; METHODS.md 2).

Score of a prompt = mean over seeds (default 4) and the first `steps` steps (default 1) of
m_j = ||e_c - e_u||_2 per sample (all dimensions). For steps > 1 the samples follow the CFG
trajectory (eps_hat = e_u + s0 (e_c - e_u) fed to the scheduler). One batched UNet call per
step of 2 rows per (prompt, seed); no image is generated. A prompt is flagged when its score
exceeds a threshold, calibrated on prompts known to be clean (`calibrate_threshold`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from memaudit.common import UserError, progress_bar
from memaudit.models.cond import Cond, as_cond
from memaudit.sampler import initial_noise

__all__ = ["auc", "calibrate_threshold", "initial_noise", "screen_prompts", "tpr_at_fpr"]


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
                   num_inference_steps: int | None = None, scheduler: str = "ddim"
                   ) -> np.ndarray:
    """Wen et al.'s screening score per prompt (METHODS 2): float64 [len(prompts)].

    `steps` first steps of a `num_inference_steps` (default: the model's) schedule are run;
    `seeds` is a count (seeds 0..n-1) or a list. Rows are (prompt, seed) pairs, `batch_size`
    at a time, each step one model.eps over 2 x batch rows (unconditional + conditional).
    """
    if steps < 1:
        raise UserError("--steps must be >= 1")
    seed_list = _seed_list(seeds)
    n_inf = int(num_inference_steps or getattr(model, "default_steps", 50))
    if steps > n_inf:
        raise UserError(f"--steps {steps} exceeds the {n_inf}-step schedule")
    s0 = float(model.default_guidance_scale if guidance_scale is None else guidance_scale)
    rows = [(i, s) for i in range(len(prompts)) for s in seed_list]
    total = np.zeros(len(prompts), dtype=np.float64)
    with progress_bar("screen", total=len(rows), unit="rows") as advance:
        for start in range(0, len(rows), max(1, batch_size)):
            chunk = rows[start:start + batch_size]
            pidx = [i for i, _ in chunk]
            emb_c = as_cond(model.encode_prompts([prompts[i] for i in pidx]))
            emb = Cond.cat([as_cond(model.null_embedding(len(chunk))), emb_c])
            sched = model.make_scheduler(scheduler)
            sched.set_timesteps(n_inf, device=model.device)
            x = initial_noise(model, [s for _, s in chunk], float(sched.init_noise_sigma))
            acc = torch.zeros(len(chunk), dtype=torch.float64)
            for j, t in enumerate(sched.timesteps[:steps]):
                xin = sched.scale_model_input(torch.cat([x, x]), t)
                e = model.eps(xin, t, emb)
                e_u, e_c = e.chunk(2)
                acc += (e_c - e_u).flatten(1).float().norm(dim=1).double().cpu()
                if j + 1 < steps:
                    x = sched.step(e_u + s0 * (e_c - e_u), t, x).prev_sample
            np.add.at(total, np.array(pidx), acc.numpy())
            advance(len(chunk))
    return total / (len(seed_list) * steps)


def calibrate_threshold(clean_scores: np.ndarray, fpr: float = 0.01) -> float:
    """Smallest threshold among the clean scores with at most `fpr` of them strictly above it
    (a prompt is flagged when score > threshold): the (floor(fpr n) + 1)-th largest."""
    s = np.sort(np.asarray(clean_scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise UserError("no clean prompts to calibrate the screening threshold on")
    if not 0 <= fpr < 1:
        raise UserError(f"--fpr must be in [0, 1), got {fpr}")
    k = int(np.floor(fpr * s.size + 1e-9))
    return float(s[min(k, s.size - 1)])


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC = P(pos > neg) + 0.5 P(pos == neg) (Mann-Whitney U with ties as halves)."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        raise UserError("AUC needs at least one positive and one negative score")
    allv = np.concatenate([pos, neg])
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # average rank of each distinct value (1-based)
    avg_rank = upper - (counts - 1) / 2.0
    ranks = avg_rank[inv]
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    """Share of positives flagged (score > threshold) at the threshold calibrated on `neg`."""
    thr = calibrate_threshold(neg, fpr)
    return float(np.mean(np.asarray(pos, dtype=np.float64) > thr))
