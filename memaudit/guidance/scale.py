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
magnitude as a trigger.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


def calibrated_magnitude(model: Any, prompts: list[str], seeds: int, fpr: float) -> float:
    """The initial magnitude m(x_T) that at most `fpr` of the (clean prompt, seed) rows exceed
    (`memaudit.screen.calibrate_threshold` over rows; seeds 0..seeds-1, the model's default
    schedule, magnitudes as the `wen` screening score takes them at x_T)."""
    from memaudit.screen import calibrate_threshold, screen_prompts

    if seeds < 1:
        raise UserError("calibration needs at least one seed")
    rows = np.concatenate([screen_prompts(model, prompts, steps=1, seeds=[s], score="wen",
                                          progress=False) for s in range(seeds)])
    return calibrate_threshold(rows, fpr)
