"""What a family's prediction means (METHODS.md 0, 3.1, 3.2): the x0 estimate, magnitudes,
switch points and the Gsim gain, computed here and nowhere else.

Every guidance and screening score works on the prediction the adapter returns from
`Denoiser.eps` and never on schedule formulas of its own. Two parameterisations cover every
supported family:

* `EpsPrediction` (DDPM-style: SD 1/2/XL, DDPMs, the canary; v- and x0-prediction networks are
  converted to eps at the adapter): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n,
  x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).
* `FlowPrediction` (rectified flow: SD3, FLUX): x_t = (1 - sigma) x0 + sigma n, the network
  predicts v = n - x0 and the adapter keeps it; sigma = t / T, x0_hat = x_t - sigma v.

The rules of METHODS 0 that make every rule mean the same on every family:

* `magnitude(d, t)`: a difference d of two predictions at the same x_t (e_c - e_u, eps_hat -
  e_u) as the noise-prediction difference's norm. Eps: ||d||. Flow: the noise estimate at fixed
  x_t is n_hat = x_t + (1 - sigma) v, so ||(1 - sigma) d||; the velocity's own norm is
  1 / (1 - sigma) larger (1000, 79, 39, 25 ... on SD3's first steps) and would move or erase
  the local minimum the dynamic rule looks for. At sigma = 1 exactly (the first step of SD3's
  and FLUX's schedules) n_hat = x_t for every prompt and the difference is 0; 1 - sigma is
  floored at one training timestep, 1 / T, there, so the rules evaluated at x_T (Wen's
  one-step screen, init-noise, reanchor's trigger) rank rows by 1/T ||d|| instead of all
  reading 0, while across steps that first step weighs next to nothing.
* `switch_level(tau)`: a switch point tau of METHODS 3.1 (static/opposite tau, the dynamic
  rule's u = 0.2 fallback) in the step coordinate `u` of `StepState` (t / T; = sigma for flow),
  a step having switched once u <= switch_level(tau). Eps: tau, a fraction u = t / T of the
  family's own DDPM-type schedule. Flow: the sigma whose SNR ((1 - sigma) / sigma)^2 equals
  Stable Diffusion's abar / (1 - abar) at t = tau T (scaled-linear betas 0.00085..0.012,
  T = 1000; tau 0.5 -> sigma 0.6181, 0.65 -> 0.7330); `ref_u(u)` is the inverse, the u on SD's
  schedule with the SNR of a step (AMG's weight schedule).
* `gain(t)`: AMG's Gsim (METHODS 3.2) on the prediction, derived in `FlowPrediction.gain`.
"""

from __future__ import annotations

import numpy as np
import torch

#: Stable Diffusion's training schedule, the reference of SNR-matched switch points
#: (METHODS 0): scaled-linear betas from 0.00085 to 0.012 over T = 1000 timesteps.
SD_T = 1000
_SD_BETAS = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, SD_T, dtype=np.float64) ** 2
_SD_ABAR = np.cumprod(1.0 - _SD_BETAS)
#: SD's SNR abar_t / (1 - abar_t) at t = 0 .. T (SNR 0 at t = T, pure noise), decreasing in t
_SD_SNR = np.append(_SD_ABAR / (1.0 - _SD_ABAR), 0.0)


def sd_snr(u: float) -> float:
    """SD's SNR at t = u T, linear between integer timesteps (0 at u = 1)."""
    return float(np.interp(min(max(float(u), 0.0), 1.0) * SD_T, np.arange(SD_T + 1), _SD_SNR))


def sd_u(snr: float) -> float:
    """The u = t / T on SD's schedule where the SNR is `snr` (inverse of `sd_snr`)."""
    return float(np.interp(float(snr), _SD_SNR[::-1], np.arange(SD_T + 1)[::-1])) / SD_T


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] tensor broadcast over the dimensions of `like` [B, ...]."""
    v = v.to(like.device, torch.float32)
    return v.view(-1, *([1] * (like.ndim - 1))) if v.ndim == 1 else v


def _row_norm(d: torch.Tensor) -> torch.Tensor:
    """||d||_2 over every dimension of each row: [B, ...] -> [B] (float32, d's device)."""
    return d.float().flatten(1).norm(dim=1)


class EpsPrediction:
    """eps-prediction over a DDPM training schedule abar_t (indexed by the integer timestep)."""

    kind = "eps"

    def __init__(self, alphas_cumprod: torch.Tensor | None = None) -> None:
        """alphas_cumprod None: no schedule (magnitudes and switch levels only)."""
        self.alphas_cumprod = None if alphas_cumprod is None else \
            alphas_cumprod.detach().float().cpu()

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t).detach().cpu().long()
        return self.alphas_cumprod[t]

    def x0(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        abar = _view(self.alpha_bar(t), x_t)
        return (x_t.float() - (1 - abar).sqrt() * pred.float()) / abar.sqrt()

    def magnitude(self, d: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """||d||_2 per row: eps differences are noise-prediction differences."""
        return _row_norm(d)

    def switch_level(self, tau: float) -> float:
        """tau itself: a fraction u = t / T of this model's own schedule (METHODS 3.1)."""
        return float(tau)

    def ref_u(self, u: float) -> float:
        return float(u)

    def gain(self, t: torch.Tensor | int) -> torch.Tensor:
        """sqrt(1 - abar_t): AMG's eps += c3 w sqrt(1 - abar_t) grad_{x_t} sim (METHODS 3.2)."""
        return (1 - self.alpha_bar(t)).sqrt()

    def has_signal(self, t: torch.Tensor | int) -> torch.Tensor:
        """Whether x0_hat at t depends on the image (abar_t > 0), per timestep."""
        return torch.tensor(True) if self.alphas_cumprod is None else self.alpha_bar(t) > 0

    @staticmethod
    def to_eps(out: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, kind: str
               ) -> torch.Tensor:
        """A network output of prediction type `kind` as eps (float32). v-prediction
        (Salimans & Ho 2022, v = sqrt(abar) eps - sqrt(1 - abar) x0):
        eps = sqrt(abar) v + sqrt(1 - abar) x_t; x0 ("sample"):
        eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
        out, x_t = out.float(), x_t.float()
        if kind == "epsilon":
            return out
        abar = _view(abar, x_t)
        if kind == "v_prediction":
            return abar.sqrt() * out + (1 - abar).sqrt() * x_t
        if kind == "sample":
            return (x_t - abar.sqrt() * out) / (1 - abar).sqrt()
        raise ValueError(f"prediction type {kind!r}")


class FlowPrediction:
    """Velocity v = n - x0 of rectified flow, sigma = t / T (T = num_train_timesteps)."""

    kind = "velocity"

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.T = float(num_train_timesteps)

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(t).detach().float().cpu() / self.T

    def alpha_bar(self, t: torch.Tensor | float) -> None:
        return None  # no DDPM schedule: use x0() and gain()

    def x0(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return x_t.float() - _view(self.sigma(t), x_t) * pred.float()

    def magnitude(self, d: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """||(1 - sigma) d||_2 per row, 1 - sigma floored at 1 / T (module docstring)."""
        scale = (1 - self.sigma(t)).clamp_min(1.0 / self.T).to(d.device)
        return scale.reshape(-1) * _row_norm(d) if scale.ndim else scale * _row_norm(d)

    def switch_level(self, tau: float) -> float:
        """The sigma with SD's SNR at t = tau T: sigma = 1 / (1 + sqrt(SNR)) (tau 1 -> 1)."""
        return 1.0 / (1.0 + sd_snr(tau) ** 0.5)

    def ref_u(self, u: float) -> float:
        """The u on SD's schedule with the SNR of sigma = u (the inverse of switch_level)."""
        sigma = float(u)
        return 1.0 if sigma >= 1.0 else sd_u(((1.0 - sigma) / sigma) ** 2)

    def gain(self, t: torch.Tensor | float) -> torch.Tensor:
        """AMG's Gsim on v: v += c3 w gain grad_{x_t} sim with gain = sigma / (1 - sigma)^2,
        0 where sigma = 1 (skipped there: `has_signal`).

        Derivation (the eps rule at the same SNR). With v held fixed, x0_hat = x_t - sigma v,
        so grad_{x_t} sim = g, the gradient in x0_hat, and a change dv moves x0_hat by
        -sigma dv. The eps rule at abar with abar / (1 - abar) = SNR = ((1 - sigma) / sigma)^2:
        there x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar), so grad_{x_t} sim =
        g / sqrt(abar), and eps += c3 w sqrt(1 - abar) g / sqrt(abar) moves x0_hat by
        -(sqrt(1 - abar) / sqrt(abar)) deps = -c3 w g / SNR. Equal moves:
        sigma dv = c3 w g (sigma / (1 - sigma))^2, dv = c3 w g sigma / (1 - sigma)^2. The noise
        estimate then moves by (1 - sigma) dv, as eps does, so the Euler step moves as DDIM's
        (tests/test_flow_rules.py checks it against autograd in eps coordinates). At sigma = 1
        x0_hat = x_t - v does not depend on the image (SNR 0) and the rule diverges: skipped,
        where a floored 1 - sigma would set the kick by a constant (METHODS 0)."""
        s = self.sigma(t)
        return torch.where(s < 1, s / (1 - s).clamp_min(1e-12) ** 2, torch.zeros_like(s))

    def has_signal(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma < 1: x0_hat depends on the image (Gsim is skipped elsewhere)."""
        return self.sigma(t) < 1
