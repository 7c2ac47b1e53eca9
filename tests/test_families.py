"""Every model family on a tiny random pipeline saved and loaded by path (issue 13): the
adapter's cfg images equal the family's own diffusers pipeline for the same seed, and every
registered method runs on every family that can run it or is refused with the reason."""

from __future__ import annotations

import pytest
import torch
from family_helpers import (
    FAMILIES,
    TEXT_FAMILIES,
    FiringCriterion,
    load_family,
    method_params,
    prompts_for,
)

from memaudit.common import UserError
from memaudit.guidance import REGISTRY, build_guidance, make_guidance
from memaudit.models.base import COND, DISTILLED, TEXT, UNCOND
from memaudit.models.ddpm import DDPMDenoiser
from memaudit.models.families import hash_pipeline_weights
from memaudit.models.flow import FluxDenoiser, SD3Denoiser
from memaudit.models.sdxl import SDXLDenoiser
from memaudit.sampler import initial_noise, sample

SEEDS = [0, 1]


@pytest.mark.parametrize("name,cls,caps,kind,sched", [
    ("sdxl", SDXLDenoiser, {TEXT, COND, UNCOND}, "eps", "ddim"),
    ("sd3", SD3Denoiser, {TEXT, COND, UNCOND}, "velocity", "euler"),
    ("flux", FluxDenoiser, {TEXT, COND, UNCOND, DISTILLED}, "velocity", "euler"),
    ("ddpm", DDPMDenoiser, set(), "eps", "ddim"),
    ("ddpm-class", DDPMDenoiser, {COND, UNCOND}, "eps", "ddim"),
])
def test_family_loads_by_path(family_dir, name, cls, caps, kind, sched):
    m = load_family(family_dir, name)
    assert type(m) is cls and m.family == name.split("-")[0]
    assert set(m.capabilities) == caps and m.prediction.kind == kind
    assert m.default_scheduler == sched and m.dtype == torch.float32
    assert m.model_hash == hash_pipeline_weights(family_dir(name))
    assert m.latent_shape == ((3, 8, 8) if name.startswith("ddpm") else (4, 8, 8))
    prov = m.provenance()
    assert prov["family"] == m.family and prov["prediction"] == kind and prov["loras"] == []


def _reference(m, name, prompts, scale, steps):
    """The family's own diffusers pipeline (or, for class-conditional UNet2DModel, which no
    pipeline samples, the plain DDIM loop with CFG on the null class) from the same x_T."""
    from diffusers import DDIMPipeline, DDIMScheduler

    x = initial_noise(m, SEEDS)
    p = m.pipe
    if name == "sdxl":
        p.scheduler = DDIMScheduler.from_config(p.scheduler.config)  # memaudit's sampler
        return p(prompts, num_inference_steps=steps, guidance_scale=scale, latents=x,
                 output_type="pt").images
    if name == "sd3":
        return p(prompts, num_inference_steps=steps, guidance_scale=scale, latents=x,
                 output_type="pt", max_sequence_length=8).images
    if name == "flux":
        b, c, h, w = x.shape
        kw = {"negative_prompt": "", "true_cfg_scale": scale} if scale != 1 else {}
        return p(prompts, num_inference_steps=steps, height=16, width=16, output_type="pt",
                 latents=p._pack_latents(x, b, c, h, w), max_sequence_length=8, **kw).images
    if name == "ddpm":  # DDIMPipeline draws x_T with one CPU generator per row, as memaudit
        gens = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
        img = DDIMPipeline(unet=p.unet, scheduler=p.scheduler)(
            batch_size=len(SEEDS), generator=gens, eta=0.0, num_inference_steps=steps,
            output_type="np").images
        return torch.from_numpy(img).permute(0, 3, 1, 2)
    sched = DDIMScheduler.from_config(p.scheduler.config)
    sched.set_timesteps(steps)
    labels, null = torch.tensor([1, 2]).to(x.device), torch.tensor([3, 3]).to(x.device)
    for t in sched.timesteps:
        with torch.no_grad():
            e_c = p.unet(x, t, class_labels=labels).sample
            e_u = p.unet(x, t, class_labels=null).sample
        x = sched.step(e_u + scale * (e_c - e_u), t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("name,scale", [("sdxl", 4.0), ("sd3", 4.0), ("flux", 3.0),
                                        ("flux", 1.0), ("ddpm", 1.0), ("ddpm-class", 2.0)])
def test_cfg_equals_the_family_pipeline(family_dir, name, scale):
    m = load_family(family_dir, name)
    prompts = prompts_for(name)
    out = sample(m, prompts, SEEDS, make_guidance("cfg"), steps=3, guidance_scale=scale)
    ref = _reference(m, name, prompts, scale, 3)
    assert out.images.shape == ref.shape
    assert out.images.shape[-1] == (8 if name.startswith("ddpm") else 16)
    assert out.images.std() > 0.01  # not a constant image
    assert torch.allclose(out.images, ref.float(), atol=1e-4)
    # a model without an unconditional branch evaluates one row per step, others two
    assert out.unet_rows == (3 if name == "ddpm" else 6)


# --- the method matrix: runs, or refused with the reason ------------------------------------------

METHODS = sorted(REGISTRY) + ["amg:sim", "amg:spe,sim"]
KNOWN = {"cfg", "static", "dynamic", "opposite", "opposite-dynamic", "amg", "rna", "rta", "cwr",
         "gni", "wen", "amg:sim", "amg:spe,sim", "init-noise", "reanchor",
         "auto"}  # this file's expectations cover these
TEXT_ONLY = {"rna", "rta", "cwr", "gni", "reanchor", "auto"}
#: family -> {method: the reason's words} for every refusal the capabilities imply
REFUSED = {
    "ddpm": {**dict.fromkeys(TEXT_ONLY | {"wen"}, "text prompts"),
             **dict.fromkeys(["static", "dynamic", "opposite", "opposite-dynamic",
                              "amg:spe,sim", "init-noise"], "a conditional prediction"),
             "amg": "AMG part"},
    "ddpm-class": {**dict.fromkeys(TEXT_ONLY | {"wen"}, "text prompts"),
                   "amg": "AMG part dup needs text prompts"},
}


def run_method(m, name, spec, steps=2, scale=2.0):
    g = build_guidance(spec, method_params(spec))
    return sample(m, prompts_for(name), SEEDS, g, steps=steps, guidance_scale=scale,
                  criterion=FiringCriterion() if g.needs_criterion else None)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_method_runs_or_is_refused_with_the_reason(family_dir, name):
    m = load_family(family_dir, name)
    ran, refused = [], []
    for spec in METHODS:
        reason = REFUSED.get(name, {}).get(spec)
        if reason is not None:
            with pytest.raises(UserError, match=f"does not apply to {m.family} model.*{reason}"):
                run_method(m, name, spec)
            refused.append(spec)
            continue
        try:
            out = run_method(m, name, spec)
        except UserError as e:  # a method registered later may declare needs of its own
            assert spec not in KNOWN and "does not apply" in str(e), (spec, e)
            continue
        assert torch.isfinite(out.images).all() and out.images.shape[0] == 2, spec
        ran.append(spec)
    assert "cfg" in ran and "amg:sim" in ran
    if name in TEXT_FAMILIES:
        assert not refused
    if name == "ddpm-class":  # transition rules and AMG's Gspe/Gsim use the null class
        assert {"static", "dynamic", "opposite", "amg:spe,sim"} <= set(ran)


def test_amg_fires_on_a_flow_model_with_the_velocity_x0_estimate(family_dir):
    """On SD3 every AMG part fires and changes the prediction; Gsim's x0 estimate is the
    flow one (x_t - sigma v), and Gsim acts on every step but the first, at sigma = 1
    (tests/test_flow_rules.py)."""
    m = load_family(family_dir, "sd3")
    seen = []
    crit = FiringCriterion()

    def callback(j, state, eps_hat):
        x0 = state.x0_hat(state.e_c)
        sigma = float(state.t) / 1000
        assert torch.allclose(x0, state.x_t - sigma * state.e_c, atol=1e-6)
        assert state.alpha_bar is None
        seen.append(j)

    out = sample(m, prompts_for("sd3"), SEEDS, make_guidance("amg"), steps=3,
                 guidance_scale=4.0, criterion=crit, callback=callback)
    assert seen == [0, 1, 2]
    assert out.trace[0]["amg_sim"] == [0.0, 0.0]
    assert all(v == 1.0 for rec in out.trace[1:] for v in rec["amg_sim"])
    base = sample(m, prompts_for("sd3"), SEEDS, make_guidance("cfg"), steps=3,
                  guidance_scale=4.0)
    assert (out.images - base.images).abs().max() > 1e-3


def test_refusals_are_one_line_before_any_work(family_dir, tmp_path):
    from memaudit.generate import generate

    m = load_family(family_dir, "ddpm")
    with pytest.raises(UserError) as e:
        generate(m, [""], ["cfg", "rna"], 1, tmp_path / "out", steps=2)
    msg = str(e.value)
    assert "\n" not in msg and "method 'rna' does not apply to ddpm model" in msg
    assert "needs text prompts" in msg
    assert not (tmp_path / "out" / "generations.parquet").exists()


def test_class_prompts_and_unconditional_generation(family_dir, tmp_path):
    from memaudit.cli import main

    m = load_family(family_dir, "ddpm-class")
    assert m.encode_prompts(["airplane", "CAT", "2"]).class_labels.tolist() == [0, 1, 2]
    assert m.null_embedding(2).class_labels.tolist() == [3, 3]
    with pytest.raises(UserError, match="not a class id or name"):
        m.encode_prompts(["a horse"])
    with pytest.raises(UserError, match="out of range"):
        m.encode_prompts(["3"])  # the null class is not a prompt
    out = tmp_path / "uncond"
    rc = main(["-q", "generate", "--model", str(family_dir("ddpm")), "--seeds", "3",
               "--steps", "2", "--out", str(out), "--device", "cpu"])
    assert rc in (0, None)
    assert len(list((out / "images" / "cfg").glob("*.png"))) == 3


def test_screening_needs_text_and_e_u(family_dir):
    from memaudit.screen import screen_prompts

    m = load_family(family_dir, "ddpm")
    with pytest.raises(UserError, match="screening does not apply to ddpm"):
        screen_prompts(m, [""], steps=1, seeds=1)
    scores = screen_prompts(load_family(family_dir, "flux"), ["a red car"], steps=1, seeds=1)
    assert scores.shape == (1,) and scores[0] > 0
