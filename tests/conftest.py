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


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory, pipe_dir):
    """name -> a tiny random pipeline folder of that family (tests/family_tiny.py), each built
    once per session on first use ("sd" is `pipe_dir`)."""
    from family_tiny import FAMILY_BUILDERS

    built = {"sd": pipe_dir}

    def get(name: str):
        if name not in built:
            built[name] = FAMILY_BUILDERS[name](tmp_path_factory.mktemp(name) / name)
        return built[name]

    return get
