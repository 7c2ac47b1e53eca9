"""Shared fixtures: the tiny random Stable Diffusion pipeline, built once per test session."""

from __future__ import annotations

import pytest
from sd_tiny import build_tiny_pipeline

from memaudit.models import load_model


@pytest.fixture(scope="session")
def pipe_dir(tmp_path_factory):
    """A tiny random SD pipeline saved with save_pretrained (tests only read it)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def model(pipe_dir):
    """That pipeline loaded by path, as a user's checkpoint is (fresh per test module)."""
    return load_model(pipe_dir, device="cpu")
