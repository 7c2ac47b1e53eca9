"""`anisotropy`: norm plus angular alignment at x_T (Asthana & Belagiannis, "Detecting and
Mitigating Memorization in Diffusion Models through Anisotropy of the Log-Probability",
ICLR 2026; official code rohanasthana/memorization-anisotropy; METHODS.md 2.1).

On the same x_T, with t_T the first and t_low the `low_index`-th (default -3: third to last)
timestep of the inference schedule:
  N = ||e_c(x_T, t_T) - e_u(x_T, t_T)||_2                        (isotropic term, all dims)
  A = mean over pixels of cos(p_u(x_T, t_low), p_c(x_T, t_low) - p_u(x_T, t_low))
      (the cosine over channels at each pixel; the anisotropic term)
  score = g1 N + g2 A.
N is the noise-prediction magnitude (METHODS 0, the model's `prediction.magnitude`): on eps
(v-prediction converted), on flow models ||(1 - sigma)(v_c - v_u)|| (1 - sigma floored at 1 / T
at sigma = 1). p is what the adapter returns (eps; velocity on flow models, noted as "cosine on
velocity"), except on v-prediction models, where the official SD 2 branch
(`local_model/pipe.py`) takes the cosine on the raw v outputs and g2 = 0.1 was tuned that way:
there p = v, recovered exactly from the adapter's eps (v = (eps - sqrt(1 - abar) x) /
sqrt(abar)). The official SD 2 N is ||e_c - e_u|| / (1 - abar_T) (its "score" difference);
memaudit keeps eps magnitudes (a factor 1.005 on SD 2 at t_T).

Weights per family (`family_weights`; docs/mitigations.md "Screening"): SD 1.x (1, 2) and SD
2.x v-prediction (1, 0.1), the official `detect_eval.py`; an eps SD 2.x uses SD 2's (1, 0.1),
untuned; a model's own `screen_params` (the canary's, tuned on it) come next; every other
family (SDXL, SD3, FLUX, DDPMs) falls back to SD 1.x's (1, 2) and says so (`notes`).
The four predictions come from ONE batched forward of 4 rows per (prompt, seed) with per-row
timesteps [t_T, t_T, t_low, t_low] (the official code makes two forwards of 2 rows); no
gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from memaudit.models.cond import Cond
from memaudit.sampler import scale_input
from memaudit.screen.base import ScoreInput, ScreenScore

SD1 = (1.0, 2.0)  # detect_eval.py, sd_ver 1 (Stable Diffusion 1.4)
SD2 = (1.0, 0.1)  # detect_eval.py, sd_ver 2 (stabilityai/stable-diffusion-2, v-prediction)


def is_v_prediction(model: Any) -> bool:
    """A v-prediction network whose outputs the adapter converts to eps (SD 2.x 768)."""
    return getattr(model, "prediction_type", "epsilon") == "v_prediction" \
        and getattr(getattr(model, "prediction", None), "kind", "eps") == "eps"


def family_weights(model: Any) -> tuple[float, float, str]:
    """(g1, g2, where they come from) for `model` when the user gives none."""
    family = str(getattr(model, "family", "unknown"))
    own = dict((getattr(model, "screen_params", None) or {}).get("anisotropy", {}))
    if own:
        g1, g2 = float(own.get("g1", 1.0)), float(own.get("g2", SD1[1]))
        why = ("tuned on the canary (python -m memaudit.screen.bench; docs/mitigations.md)"
               if family == "canary" else f"the model's own screen_params ({family})")
        return g1, g2, why
    if family == "sd":
        if is_v_prediction(model):
            return (*SD2, "official SD 2.x weights (v-prediction, cosine on v; "
                          "detect_eval.py sd_ver 2)")
        enc = getattr(model, "text_encoder", None)
        width = int(getattr(getattr(enc, "config", None), "hidden_size", 768) or 768)
        if width > 768:
            return (*SD2, "SD 2.x's official weights, tuned on the v-prediction SD 2; this "
                          "eps-prediction SD 2.x uses them untuned (cosine on eps)")
        return (*SD1, "official SD 1.x weights (detect_eval.py sd_ver 1)")
    return (*SD1, f"fallback: SD 1.x's official weights, not tuned for {family} models")


def low_index(index: int, n: int) -> int:
    """`index` into n timesteps, clamped to the schedule (the earliest step when it is short:
    -10 on a 3-step schedule is -3)."""
    return max(-n, min(index, n - 1))


class Anisotropy(ScreenScore):
    name = "anisotropy"
    paper = "Asthana & Belagiannis, ICLR 2026"

    @dataclass
    class Params:
        g1: float | None = None  # weight of the norm at t_T (None: the family's, see above)
        g2: float | None = None  # weight of the cosine at t_low (None: the family's)
        low_index: int = -3  # t_low = scheduler.timesteps[low_index]

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.source = ""
        self.given = {k for k in ("g1", "g2") if params.get(k) is not None}
        self.cosine_on = "eps"

    def bind(self, model: Any, given: dict[str, Any] | None = None) -> None:
        if given is not None:
            self.given = {k for k in ("g1", "g2") if given.get(k) is not None}
        g1, g2, why = family_weights(model)
        fam = "given" if self.given == {"g1", "g2"} else why
        if self.given and self.given != {"g1", "g2"}:
            fam = f"{', '.join(sorted(self.given))} given; the other from: {why}"
        if "g1" not in self.given:
            self.params.g1 = g1
        if "g2" not in self.given:
            self.params.g2 = g2
        self.source = fam
        self.cosine_on = "v" if is_v_prediction(model) else \
            ("velocity" if getattr(getattr(model, "prediction", None), "kind", "") == "velocity"
             else "eps")

    def check(self, model: Any, steps: int) -> None:
        super().check(model, steps)
        self.bind(model)

    def notes(self) -> list[str]:
        if not self.source:
            return []
        low = "" if self.params.low_index == -3 else \
            f"; t_low = timesteps[{self.params.low_index}] (official: [-3])"
        if getattr(self, "clamped", None):
            low += (f"; t_low = timesteps[{self.clamped[1]}]: the schedule has fewer than "
                    f"{-self.clamped[0]} steps")
        return [f"anisotropy weights (g1, g2) = ({self.params.g1:g}, {self.params.g2:g}): "
                f"{self.source}; cosine on {self.cosine_on}{low}"]

    def forwards(self, steps: int) -> int:
        return 1

    def rows(self, steps: int) -> int:
        return 4

    def terms(self, inp: ScoreInput) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, A) per row, float64 on the CPU."""
        sched, x, b = inp.scheduler, inp.x, inp.x.shape[0]
        low = low_index(self.params.low_index, len(sched.timesteps))
        if low != self.params.low_index:
            self.clamped = (self.params.low_index, low)
        t_hi, t_lo = sched.timesteps[0], sched.timesteps[low]
        x_hi, x_lo = scale_input(sched, x, t_hi), scale_input(sched, x, t_lo)
        t = torch.cat([t_hi.reshape(1).expand(2 * b), t_lo.reshape(1).expand(2 * b)])
        e = inp.model.eps(torch.cat([x_hi, x_hi, x_lo, x_lo]), t,
                          Cond.cat([inp.emb_u, inp.emb_c, inp.emb_u, inp.emb_c])).float()
        e_u, e_c, l_u, l_c = e.chunk(4)
        if is_v_prediction(inp.model):  # the official SD 2 cosine is on the raw v outputs
            abar = inp.model.prediction.alpha_bar(t_lo).to(e).reshape(())
            l_u, l_c = ((p - (1 - abar).sqrt() * x_lo.float()) / abar.sqrt() for p in (l_u, l_c))
        cos = F.cosine_similarity(l_u, l_c - l_u, dim=1)  # [B, H, W]
        n = inp.model.prediction.magnitude(e_c - e_u, t_hi)  # METHODS 0: noise prediction's
        return n.double().cpu(), cos.flatten(1).mean(1).double().cpu()

    def score_rows(self, inp: ScoreInput) -> torch.Tensor:
        if self.params.g1 is None or self.params.g2 is None:
            self.bind(inp.model)
        n, a = self.terms(inp)
        return self.params.g1 * n + self.params.g2 * a
