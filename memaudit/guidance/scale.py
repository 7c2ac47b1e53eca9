"""Which magnitude constants a mitigation uses on a model (METHODS.md 3.5).

The newer mitigations compare the noise-difference magnitude m = ||e_c - e_u||_2 (all
dimensions of one sample) with absolute constants that their authors set on Stable Diffusion
1.4 at 512 pixels, i.e. on 4x64x64 VAE latents: init-noise's target 0.9 and rho 50
(hygnhan/init_noise_diffusion_memorization), reanchor's trigger 1 and L = 3, M = 5
(chenchen-usyd/BE-PRSS). A norm over all dimensions scales with the model (latent size,
channels, pixel space), so memaudit uses those constants exactly where they were set
(`sd_latents`: the SD 1.x/2.x family with 4x64x64 latents) and, elsewhere, constants of the
model's own scale: memaudit's stated defaults (init-noise) or a threshold calibrated on prompts
known to be clean (`calibrated_magnitude`; reanchor), never a fraction of a sample's own
magnitude as a trigger. m is the noise prediction's on every family (METHODS 0, the model's
`prediction.magnitude`): on flow models ||(1 - sigma)(v_c - v_u)||.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from memaudit.common import UserError

#: The latent shape the official constants were set on (SD 1.4 at 512 x 512).
SD_LATENT_SHAPE = (4, 64, 64)


def sd_latents(model: Any) -> bool:
    """True where the official constants apply: a Stable Diffusion 1.x/2.x model sampling
    4x64x64 latents (512 pixels)."""
    return getattr(model, "family", None) == "sd" and bool(getattr(model, "is_latent", True)) \
        and tuple(getattr(model, "latent_shape", ())) == SD_LATENT_SHAPE


def clean_prompts(model: Any, path: str | None) -> tuple[list[str], str]:
    """The clean prompts to calibrate on and how to name them: the file `path` when given,
    else the model's own generic prompts (`Denoiser.generic_prompts`, e.g. the canary's digit
    and face captions); a one-line error when there are none."""
    if path is not None:
        from memaudit.data.prompts import read_prompts

        prompts = [r.text for r in read_prompts(path)]
        if not prompts:
            raise UserError(f"{path}: no prompts to calibrate on")
        return prompts, str(path)
    own = list(getattr(model, "generic_prompts", ()) or ())
    if not own:
        return [], ""
    return own, f"the {getattr(model, 'family', 'model')} model's generic prompts"


@torch.no_grad()
def calibrated_magnitude(model: Any, prompts: list[str], seeds: int, fpr: float,
                         t0: torch.Tensor, batch_size: int = 32) -> float:
    """The initial magnitude m(x_T) (the noise prediction's, METHODS 0) that at most `fpr` of
    the (clean prompt, seed 0..seeds-1) rows exceed (`memaudit.screen.calibrate_threshold`
    over rows), at the run's first timestep t0 and with the sampler's x_T of each seed."""
    from memaudit.models.cond import Cond, as_cond
    from memaudit.sampler import initial_noise
    from memaudit.screen import calibrate_threshold

    if seeds < 1:
        raise UserError("calibration needs at least one seed")
    sched = model.scheduler(None, int(getattr(model, "default_steps", 50)))
    sigma = float(getattr(sched, "init_noise_sigma", 1.0))  # independent of the step count
    rows = [(p, s) for p in prompts for s in range(seeds)]
    vals = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        x = initial_noise(model, [s for _, s in chunk], sigma)
        c = as_cond(model.encode_prompts([p for p, _ in chunk]))
        u = as_cond(model.null_embedding(len(chunk)))
        e_u, e_c = model.eps(torch.cat([x, x]), t0, Cond.cat([u, c])).float().chunk(2)
        vals.append(model.prediction.magnitude(e_c - e_u, t0).double().cpu().numpy())
    return calibrate_threshold(np.concatenate(vals), fpr)
