"""What a family's prediction means: the x0 estimate and the guidance gain (METHODS.md 0, 3.2).

Every guidance works on the prediction the adapter returns from `Denoiser.eps` and never on
schedule formulas of its own. Two parameterisations cover every supported family:

* `EpsPrediction` (DDPM-style: SD 1/2/XL, DDPMs, the canary; v- and x0-prediction networks are
  converted to eps at the adapter): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n,
  x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).
* `FlowPrediction` (rectified flow: SD3, FLUX): x_t = (1 - sigma) x0 + sigma n, the network
  predicts v = n - x0 and the adapter keeps it; sigma = t / T, x0_hat = x_t - sigma v.

`gain(t)` is the factor that turns a gradient of a log-likelihood in x_t into a change of the
prediction, -d prediction / d score (classifier guidance, Dhariwal & Nichol 2021, eq. 14):
sqrt(1 - abar_t) for eps (eps = -sqrt(1 - abar_t) score); for velocity,
v = (-sigma score - x_t) / (1 - sigma), so sigma / (1 - sigma). AMG's Gsim,
eps += c3 w(t) sqrt(1 - abar_t) grad sigma_t, is `pred += c3 w(t) gain(t) grad sigma_t`. A flow
schedule starts at sigma = 1 (zero signal), where the conversion diverges; 1 - sigma is floored
at 1 / T there (one training timestep).
"""

from __future__ import annotations

import torch


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] tensor broadcast over the dimensions of `like` [B, ...]."""
    v = v.to(like.device, torch.float32)
    return v.view(-1, *([1] * (like.ndim - 1))) if v.ndim == 1 else v


class EpsPrediction:
    """eps-prediction over a DDPM training schedule abar_t (indexed by the integer timestep)."""

    kind = "eps"

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        self.alphas_cumprod = alphas_cumprod.detach().float().cpu()

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t).detach().cpu().long()
        return self.alphas_cumprod[t]

    def x0(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        abar = _view(self.alpha_bar(t), x_t)
        return (x_t.float() - (1 - abar).sqrt() * pred.float()) / abar.sqrt()

    def gain(self, t: torch.Tensor | int) -> torch.Tensor:
        return (1 - self.alpha_bar(t)).sqrt()

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

    def gain(self, t: torch.Tensor | float) -> torch.Tensor:
        s = self.sigma(t)
        return s / (1 - s).clamp_min(1.0 / self.T)
