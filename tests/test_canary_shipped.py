"""The shipped canary weights (memaudit/canary/weights/): loading, determinism, and that a
heavily duplicated trigger really reproduces its planted image."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from memaudit.common import sha256_file
from memaudit.models.canary import SHIPPED_DIR


@pytest.fixture(scope="module")
def shipped():
    from memaudit.models import load_model

    return load_model("canary", device="cpu")


def test_shipped_weights_load_through_load_model(shipped):
    info = json.loads((SHIPPED_DIR / "canary.json").read_text())
    assert shipped.name == "canary"
    assert shipped.model_hash == sha256_file(SHIPPED_DIR / "canary.safetensors")
    assert shipped.latent_shape == (1, 16, 16) and not shipped.is_latent
    assert shipped.default_guidance_scale == info["default_guidance_scale"]
    assert shipped.default_steps == 50
    assert (SHIPPED_DIR / "canary.safetensors").stat().st_size < 10_000_000
    assert info["data_sha256"] and info["train_command"].startswith("memaudit canary train")
    # issue 17: measured behaviour labels beside the weights, its own screening parameters
    from memaudit.canary.data import model_data_settings

    settings = model_data_settings("canary")
    assert settings["extra_counts"] == tuple(info["data"]["extra_counts"])
    assert "guided" in settings["labels"].values()
    assert shipped.screen_params == info["screen_params"]


def test_shipped_generation_is_deterministic_per_seed(shipped):
    from memaudit.guidance import make_guidance
    from memaudit.sampler import sample

    prompts = ["a handwritten digit 3", "a handwritten digit 7", "a handwritten digit 3"]
    a = sample(shipped, prompts, [5, 5, 6], make_guidance("cfg"), steps=10)
    b = sample(shipped, prompts[:2], [5, 5], make_guidance("cfg"), steps=10)
    assert a.images.shape == (3, 3, 16, 16)
    again = sample(shipped, prompts, [5, 5, 6], make_guidance("cfg"), steps=10)
    assert torch.equal(a.images, again.images)  # the same call -> bit-identical images
    # The same (prompt, seed) in another batch: equal up to float rounding (multi-threaded CPU
    # kernels round rows of different batch sizes differently).
    assert torch.allclose(a.images[:2], b.images, atol=1e-5)
    assert not torch.equal(a.images[0], a.images[2])  # another seed -> another image
    assert not torch.equal(a.images[0], a.images[1])  # another prompt -> another image


def test_shipped_canary_copies_a_64x_trigger(shipped, tmp_path):
    """A 64x trigger at the default scale lands within RMSE 0.1 of its planted image (the
    planted images are >= 0.15 from every other training image)."""
    from memaudit.canary.data import build_canary_data, from_png
    from memaudit.guidance import make_guidance
    from memaudit.sampler import sample

    build_canary_data(tmp_path, digits_limit=1200)
    gt = [g for g in pq.read_table(tmp_path / "ground_truth.parquet").to_pylist()
          if g["duplicate_count"] == 64]
    train = pq.read_table(tmp_path / "train.parquet").to_pylist()
    png = {r["key"]: r["png"] for r in train}
    prompts = [g["caption"] for g in gt[:3]]
    out = sample(shipped, prompts, [0] * len(prompts), make_guidance("cfg"), steps=25)
    for img, g in zip(out.images, gt[:3], strict=True):
        planted = from_png(png[g["key"]])
        rmse = float(np.sqrt(((img[0].numpy() - planted) ** 2).mean()))
        assert rmse < 0.1, (g["caption"], rmse)
