"""Classifier-free guidance, the baseline `cfg` (Ho & Salimans 2022; METHODS.md section 3).

eps_hat = e_u + s0 (e_c - e_u), with s0 the user's scale; no extra UNet calls, no trace fields
(the sampler records `guidance_norm` = ||eps_hat - e_u|| = s0 ||e_c - e_u|| itself).
"""

from __future__ import annotations

from memaudit.guidance.base import Guidance


class CFG(Guidance):
    name = "cfg"
