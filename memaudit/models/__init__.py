"""Denoiser adapters: what every mitigation needs from a model, nothing more."""

from memaudit.models.base import Denoiser, load_model

__all__ = ["Denoiser", "load_model"]
