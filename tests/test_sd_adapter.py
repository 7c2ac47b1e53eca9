"""The Stable Diffusion adapter, end to end on a tiny random pipeline saved and loaded by path."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from sd_tiny import build_tiny_pipeline

from memaudit.common import UserError, sha256_file
from memaudit.guidance import make_guidance
from memaudit.models import load_model
from memaudit.models.diffusers_sd import StableDiffusionDenoiser, hash_pipeline_weights
from memaudit.sampler import initial_noise, sample


def test_load_by_path_and_hash(model, pipe_dir):
    assert isinstance(model, StableDiffusionDenoiser)
    assert model.latent_shape == (4, 8, 8) and model.dtype == torch.float32
    assert model.is_latent and model.default_steps == 50 and model.default_guidance_scale == 7.5
    lines = sorted(
        f"{f.relative_to(pipe_dir).as_posix()} {sha256_file(f)}"
        for comp in ("unet", "vae", "text_encoder")
        for f in (pipe_dir / comp).glob("*.safetensors")
    )
    assert len(lines) == 3
    assert model.model_hash == hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_hash_changes_with_weights(pipe_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(pipe_dir, copy)
    assert hash_pipeline_weights(copy) == hash_pipeline_weights(pipe_dir)
    (copy / "scheduler" / "scheduler_config.json").write_text("{}")  # not a weight file
    assert hash_pipeline_weights(copy) == hash_pipeline_weights(pipe_dir)
    w = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    assert hash_pipeline_weights(copy) != hash_pipeline_weights(pipe_dir)


def test_embeddings_match_the_pipeline(model):
    prompts = ["a photo of a cat", "a red car"]
    emb = model.encode_prompts(prompts).emb
    assert emb.shape == (2, 16, 16)
    ref_c, ref_u = model.pipe.encode_prompt(prompts, "cpu", 1, True)
    assert torch.allclose(emb, ref_c, atol=1e-6)
    assert torch.allclose(model.null_embedding(2).emb, ref_u, atol=1e-6)


def test_eps_is_the_unet_and_decode_is_differentiable(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999, 10])
    emb = model.encode_prompts(["a cat", "a dog"]).emb
    rows = model.unet_rows
    with torch.no_grad():
        ref = model.unet(x, t, encoder_hidden_states=emb).sample
    assert torch.allclose(model.eps(x, t, emb), ref, atol=1e-6)
    assert model.unet_rows == rows + 2
    z = x.clone().requires_grad_(True)
    img = model.decode(z)
    assert img.shape == (2, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    with torch.no_grad():
        ref_img = (model.vae.decode(x / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(img, ref_img, atol=1e-6)
    img.mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_v_prediction_is_converted_to_eps(tmp_path):
    m = load_model(build_tiny_pipeline(tmp_path / "v-sd", prediction_type="v_prediction"), "cpu")
    assert m.prediction_type == "v_prediction"
    assert m.make_scheduler("ddim").config.prediction_type == "epsilon"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900, 100])
    emb = m.encode_prompts(["a", "b"]).emb
    with torch.no_grad():
        v = m.unet(x, t, encoder_hidden_states=emb).sample
        eps = m.eps(x, t, emb)
    abar = m.pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    assert torch.allclose(eps, abar.sqrt() * v + (1 - abar).sqrt() * x, atol=1e-5)


def test_sampler_matches_the_diffusers_pipeline(model):
    prompts, seeds, scale = ["a photo of a cat", "a red car"], [0, 1], 5.0
    out = sample(model, prompts, seeds, make_guidance("cfg"), steps=2, guidance_scale=scale)
    assert out.images.shape == (2, 3, 16, 16)
    assert out.unet_rows == 4.0 and out.forwards == 2
    ref = model.pipe(prompts, num_inference_steps=2, guidance_scale=scale,
                     latents=initial_noise(model, seeds), output_type="pt").images
    assert torch.allclose(out.images, ref, atol=1e-5)


def test_sampling_alone_equals_batched_and_is_deterministic(model):
    g = make_guidance("cfg")
    both = sample(model, ["a cat", "a dog", "a cat"], [3, 4, 3], g, steps=2)
    alone = sample(model, ["a dog"], [4], g, steps=2)
    again = sample(model, ["a cat", "a dog", "a cat"], [3, 4, 3], g, steps=2)
    assert torch.allclose(both.images[1], alone.images[0], atol=1e-5)
    # The same (prompt, seed) at two batch positions: equal up to float rounding (multi-threaded
    # CPU kernels round rows at different positions differently: 7e-7 here with 2 threads);
    # the same call again: bit-identical.
    assert torch.allclose(both.images[0], both.images[2], atol=1e-5)
    assert torch.equal(both.images, again.images)
    dpm = sample(model, ["a cat"], [3], g, steps=2, scheduler="dpm")
    assert dpm.images.shape == (1, 3, 16, 16)


def test_random_tokens_come_from_the_vocabulary(model):
    a = model.random_tokens(20, torch.Generator().manual_seed(5))
    b = model.random_tokens(20, torch.Generator().manual_seed(5))
    assert a == b and len(a) == 20
    vocab = {model.tokenizer.decode([i]).strip() for i in range(len(model.tokenizer))}
    assert set(a) <= vocab
    assert not {"<|startoftext|>", "<|endoftext|>"} & set(a)


def test_not_a_pipeline_is_a_user_error(tmp_path, pipe_dir):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "missing" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        load_model(tmp_path / "empty")
    with pytest.raises(UserError, match="no model_index.json"):
        StableDiffusionDenoiser.load(pipe_dir / "unet")
    broken = tmp_path / "broken"
    shutil.copytree(pipe_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(UserError, match="broken"):
        StableDiffusionDenoiser.load(broken)


def test_hub_id_from_the_local_cache_records_the_revision(pipe_dir, tmp_path, monkeypatch):
    """A hub id resolves through the Hugging Face cache layout (offline); the snapshot's
    revision is recorded and the hash is the same as for the folder."""
    import huggingface_hub.constants as hf_constants

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--sd"
    shutil.copytree(pipe_dir, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    m = load_model("tiny/sd", device="cpu")
    assert isinstance(m, StableDiffusionDenoiser)
    assert m.name == "tiny/sd" and m.revision == rev
    assert m.model_hash == hash_pipeline_weights(pipe_dir)
    with pytest.raises(UserError, match="cannot load"):
        load_model("tiny/other", device="cpu")
