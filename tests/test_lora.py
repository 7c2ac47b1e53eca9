"""LoRA fine-tunes (issue 13): `--lora PATH[:SCALE]` through diffusers' load_lora_weights on a
tiny LoRA made here with PEFT, recorded with its SHA-256 in the provenance."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from memaudit.common import UserError, sha256_file
from memaudit.guidance import make_guidance
from memaudit.models import load_model
from memaudit.models.lora import combined_hash, parse_lora_spec
from memaudit.sampler import initial_noise, sample

PROMPTS, SEEDS = ["a photo of a cat", "a red car"], [0, 1]


@pytest.fixture(scope="module")
def lora_dir(pipe_dir, tmp_path_factory):
    """A rank-2 LoRA on the tiny SD UNet's attention projections with random (non-zero) A and
    B, saved the way diffusers trainers save one."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(7)
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    out = tmp_path_factory.mktemp("lora") / "style"
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers)
    return out


def test_parse_spec():
    assert parse_lora_spec("a/b.safetensors:0.5") == (parse_lora_spec("a/b.safetensors")[0], 0.5)
    assert parse_lora_spec("a/b.safetensors")[1] == 1.0
    assert str(parse_lora_spec("c:/x/y.safetensors")[0]) == "c:/x/y.safetensors"


def test_lora_changes_the_model_and_matches_the_pipeline(pipe_dir, lora_dir):
    from diffusers import StableDiffusionPipeline

    base = load_model(pipe_dir, "cpu")
    m = load_model(pipe_dir, "cpu", loras=[f"{lora_dir}:0.5"])
    f = lora_dir / "pytorch_lora_weights.safetensors"
    assert m.loras == [{"path": str(f.resolve()), "sha256": sha256_file(f), "scale": 0.5}]
    assert m.base_hash == base.model_hash
    assert m.model_hash == combined_hash(base.model_hash, m.loras) != base.model_hash
    assert m.provenance()["loras"][0]["sha256"] == sha256_file(f)
    g = make_guidance("cfg")
    with_lora = sample(m, PROMPTS, SEEDS, g, steps=2, guidance_scale=5.0).images
    without = sample(base, PROMPTS, SEEDS, g, steps=2, guidance_scale=5.0).images
    assert (with_lora - without).abs().max() > 1e-3
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None)
    pipe.load_lora_weights(str(lora_dir), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.5])
    ref = pipe(PROMPTS, num_inference_steps=2, guidance_scale=5.0,
               latents=initial_noise(m, SEEDS), output_type="pt").images
    assert torch.allclose(with_lora, ref, atol=1e-4)


def test_lora_recorded_in_generations_and_resume_refused(pipe_dir, lora_dir, tmp_path):
    from memaudit.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n")
    out = tmp_path / "gen"
    args = ["-q", "generate", "--model", str(pipe_dir), "--prompts", str(prompts), "--seeds",
            "1", "--steps", "2", "--out", str(out), "--device", "cpu"]
    assert main(args + ["--lora", f"{lora_dir}:0.8"]) in (0, None)
    row = pq.read_table(out / "generations.parquet").to_pylist()[0]
    prov = json.loads(row["model_json"])
    f = lora_dir / "pytorch_lora_weights.safetensors"
    assert prov["loras"] == [{"path": str(f.resolve()), "sha256": sha256_file(f), "scale": 0.8}]
    assert prov["family"] == "sd" and prov["dtype"] == "fp32"
    with pytest.raises(SystemExit) as e:  # another scale: other weights, refused
        main(args + ["--lora", f"{lora_dir}:0.3"])
    assert e.value.code == 2


def test_bad_lora_is_one_line(pipe_dir, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(pipe_dir, "cpu", loras=[str(tmp_path / "missing.safetensors")])
    pickled = tmp_path / "lora.bin"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="only .safetensors"):
        load_model(pipe_dir, "cpu", loras=[str(pickled)])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="junk.safetensors"):
        load_model(pipe_dir, "cpu", loras=[str(junk)])
    with pytest.raises(UserError, match="canary"):
        load_model("canary", "cpu", loras=[str(junk)])
