"""Shared helpers of the family tests: loading a tiny family pipeline the way a user would,
prompts that fit its conditioning, and an always-firing stand-in criterion for AMG."""

from __future__ import annotations

import os

import torch

from memaudit.models import load_model

#: MEMAUDIT_TEST_DEVICE=cuda runs the family tests on a GPU (docs/generate.md); CI: the CPU
DEVICE = os.environ.get("MEMAUDIT_TEST_DEVICE", "cpu")

FAMILIES = ["sd", "sdxl", "sd3", "flux", "ddpm", "ddpm-class"]
TEXT_FAMILIES = {"sd", "sdxl", "sd3", "flux"}


def load_family(family_dir, name: str, **kw):
    """The tiny pipeline loaded by path (FLUX at 16 px; short T5 sequences for speed), fp32
    unless `dtype` is given."""
    kw.setdefault("dtype", "fp32")
    m = load_model(family_dir(name), device=DEVICE,
                   resolution=16 if name == "flux" else None, **kw)
    if name in ("sd3", "flux"):
        m.max_sequence_length = 8
    return m


def method_params(spec: str) -> dict:
    """Run parameters a method needs to run at all here: `auto` a screening threshold (0:
    every prompt flagged, so its mitigation runs); `reanchor` a trigger (tiny models have
    neither the official SD-latent scale nor generic prompts to calibrate on)."""
    return {"auto": {"threshold": 0.0}} if spec == "auto" else \
        {"reanchor": {"trigger": 0.0}} if spec == "reanchor" else {}


def prompts_for(name: str) -> list[str]:
    if name == "ddpm":
        return ["", ""]
    if name == "ddpm-class":
        return ["cat", "2"]
    return ["a photo of a cat", "a red car"]


class FiringCriterion:
    """Cosine-like similarity 0.9 - 0.1 rmse(image, grey): above AMG's SSCD threshold
    (<= 0.4) everywhere, so every AMG part fires; differentiable in the image."""

    higher_is_more_similar = True
    calibrated_threshold = None

    def __init__(self):
        self.index = self

    def group_caption(self, gid):
        return "a photo of a dog"

    def similarity_tensor(self, images):
        rmse = ((images - 0.5) ** 2).flatten(1).mean(1).sqrt()
        return 0.9 - 0.1 * rmse, torch.zeros(images.shape[0], dtype=torch.long)
