"""AMG's per-step check (issue 21): a tiny AutoencoderTiny decoder per family (built with
random weights, saved with save_pretrained, loaded by path), the check decoded at the
descriptor's size, and the schedule that skips checks far below lambda."""

from __future__ import annotations

import json
import math

import pytest
import torch
from family_helpers import FiringCriterion, load_family, prompts_for

from memaudit.common import UserError, sha256_file
from memaudit.guidance import StepState, make_guidance
from memaudit.guidance.amg_check import CheckSchedule
from memaudit.sampler import sample

#: the latent channels and un-scaling of each family's TAESD (taesd, taesdxl: the UNet's
#: latents as they are; taesd3 and taef1 carry their family's scaling and shift). The tiny
#: test pipelines all have 4 latent channels (the tiny FLUX packs 2x2x4 = 16 transformer
#: channels; the real one 2x2x16 = 64, read by the 16-channel taef1)
TAESD = {"sd": (4, 1.0, 0.0), "sdxl": (4, 1.0, 0.0), "sd3": (4, 1.5305, 0.0609),
         "flux": (4, 0.3611, 0.1159)}


def build_tiny_decoder(folder, channels: int = 4, scaling: float = 1.0, shift: float = 0.0,
                       seed: int = 0):
    """A random AutoencoderTiny upsampling 2x (the test families' VAEs do), saved as a user's
    TAESD folder is."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(latent_channels=channels, encoder_block_out_channels=(8, 8),
                          decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                          num_decoder_blocks=(1, 1), scaling_factor=scaling,
                          shift_factor=shift)
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("taesd")
    return {name: build_tiny_decoder(root / name, *spec) for name, spec in TAESD.items()}


class Recording(FiringCriterion):
    """FiringCriterion that keeps the images it was given; `view` sets the descriptor's
    input size (input_size) and `value` a constant similarity."""

    def __init__(self, view=None, value=None):
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.view, self.value = view, value

    def input_size(self, h, w):
        return self.view or (h, w)

    def similarity_tensor(self, images):
        self.seen.append(images.detach().clone())
        if self.value is not None:
            s = torch.full((images.shape[0],), float(self.value), device=images.device) \
                + 0 * images.mean((1, 2, 3))
            return s, torch.zeros(images.shape[0], dtype=torch.long)
        return super().similarity_tensor(images)


def _state(model, crit, b=2):
    x = torch.randn(b, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    sched = model.scheduler(None, 4)
    t = sched.timesteps[1]
    return StepState(index=1, num_steps=4, t=t, u=float(t) / 1000, x_t=x.to(model.device),
                     alpha_bar=model.prediction.alpha_bar(t), s0=3.0, model=model,
                     criterion=crit)


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_tiny_decoder_decodes_the_check_per_family(family_dir, tiny_dirs, name):
    from diffusers import AutoencoderTiny

    model = load_family(family_dir, name)
    folder = tiny_dirs[name]
    amg = make_guidance("amg", decoder=str(folder))
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert amg.params.decoder_sha256 == sha256_file(weights)  # provenance
    assert amg.params.decoder == str(folder.resolve())
    crit = Recording()
    state = _state(model, crit)
    eps = torch.randn_like(state.x_t)
    sigma, _, grad_fn = amg.similarity(state, eps, True)
    # by hand: the pipeline's un-scaling with the tiny VAE's config, then its decoder
    ref_vae = AutoencoderTiny.from_pretrained(folder).to(state.x_t.device)
    _, sf, shift = TAESD[name]
    x0 = state.x0_hat(eps)
    ref = (ref_vae.decode(x0 / sf + shift).sample / 2 + 0.5).clamp(0, 1)
    assert crit.seen[0].shape == (2, 3, 16, 16)
    torch.testing.assert_close(crit.seen[0], ref, atol=1e-5, rtol=1e-5)
    # not the model's own VAE, and the gradient flows through the tiny decoder to x_t
    assert not torch.allclose(crit.seen[0], model.decode(x0), atol=1e-3)
    g = grad_fn()
    assert g.shape == state.x_t.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    # through the sampler: finite images, unlike the full-VAE check's
    out = {d: sample(model, prompts_for(name)[:1], [0], make_guidance("amg", decoder=d),
                     steps=2, guidance_scale=2.0, criterion=FiringCriterion()).images
           for d in (str(folder), None)}
    assert torch.isfinite(out[str(folder)]).all()
    assert not torch.allclose(out[str(folder)], out[None])


def test_tiny_decoder_is_recorded_and_refused_where_it_cannot_read(family_dir, tiny_dirs,
                                                                    tmp_path):
    from memaudit.generate import _params_json

    folder = tiny_dirs["sd"]
    amg = make_guidance("amg", decoder=str(folder))
    rec = json.loads(_params_json("amg", amg, 2, 2.0, "ddim"))["params"]
    assert rec["decoder_sha256"] == sha256_file(folder / "diffusion_pytorch_model.safetensors")
    wide = build_tiny_decoder(tmp_path / "c16", 16)
    with pytest.raises(UserError, match="16-channel latents, the sd3 model's have 4"):
        sample(load_family(family_dir, "sd3"), ["a photo of a cat"], [0],
               make_guidance("amg", decoder=str(wide)), steps=2, criterion=FiringCriterion())
    ddpm = load_family(family_dir, "ddpm")
    with pytest.raises(UserError, match="pixel space"):
        sample(ddpm, ["", ""], [0, 1], make_guidance("amg", parts="sim", decoder=str(folder)),
               steps=2, criterion=FiringCriterion())
    eight = tmp_path / "x8"
    from diffusers import AutoencoderTiny

    AutoencoderTiny(latent_channels=4, decoder_block_out_channels=(8, 8, 8, 8),
                    encoder_block_out_channels=(8, 8, 8, 8)).save_pretrained(eight)
    with pytest.raises(UserError, match="upsamples 8x"):
        sample(load_family(family_dir, "sd"), ["a cat"], [0],
               make_guidance("amg", decoder=str(eight)), steps=1, criterion=FiringCriterion())
    with pytest.raises(UserError, match="not found"):
        make_guidance("amg", decoder=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        make_guidance("amg", decoder="nobody/no-such-taesd")
    with pytest.raises(UserError, match="expected"):
        make_guidance("amg", decoder=str(folder), decoder_sha256="0" * 64)
    with pytest.raises(UserError, match="check_size"):
        make_guidance("amg", check_size="half")


def test_check_decoded_at_the_descriptors_size(family_dir, tiny_dirs):
    """The latent is resized (bilinear, antialiased) to view / 2 before the decode; never
    enlarged; pixel-space models are left to the embedder."""
    import torch.nn.functional as F

    model = load_family(family_dir, "sd")  # 16 px images, 8x8 latents, VAE 2x
    for decoder in (None, str(tiny_dirs["sd"])):
        amg = make_guidance("amg", decoder=decoder, check_size="descriptor")
        crit = Recording(view=(8, 12))
        state = _state(model, crit)
        eps = torch.randn_like(state.x_t)
        amg.similarity(state, eps, True)[2]()
        x0 = F.interpolate(state.x0_hat(eps), size=(4, 6), mode="bilinear",
                           align_corners=False, antialias=True)
        ref = amg.check_image.tiny.decode(x0) if decoder else model.decode(x0)
        assert crit.seen[0].shape == (2, 3, 8, 12)
        torch.testing.assert_close(crit.seen[0], ref, atol=1e-5, rtol=1e-5)
    crit = Recording(view=(32, 32))  # larger than the image: decoded at full size
    state = _state(model, crit)
    make_guidance("amg", check_size="descriptor").similarity(state, torch.zeros_like(state.x_t),
                                                             False)
    assert crit.seen[0].shape == (2, 3, 16, 16)
    ddpm = load_family(family_dir, "ddpm")
    crit = Recording(view=(4, 4))
    state = _state(ddpm, crit)
    make_guidance("amg", check_size="descriptor").similarity(state, torch.zeros_like(state.x_t),
                                                             False)
    assert crit.seen[0].shape == (2, 3, 8, 8)


def test_embedders_say_what_size_they_read(tmp_path):
    from index_helpers import make_sscd_torchscript

    from memaudit.embedders import make_embedder

    w = make_sscd_torchscript(tmp_path / "sscd.pt")
    assert make_embedder("sscd", weights=str(w)).input_size(512, 768) == (288, 432)
    assert make_embedder("sscd", weights=str(w)).input_size(1024, 512) == (576, 288)
    assert make_embedder("sscd", weights=str(w), preprocessing="somepalli").input_size(
        512, 512) == (256, 256)
    assert make_embedder("pixels", size=16).input_size(512, 512) == (16, 16)


def test_schedule_gaps_by_hand():
    """next check = j + clip(floor((lambda - sigma) / m), 1, max_gap) for checked rows."""
    s = CheckSchedule(margin=0.1, max_gap=4)
    mem: dict = {}
    assert s.due(mem, 0, 4).all()
    sigma = torch.tensor([0.35, 0.19, 0.0, -5.0])
    s.after(mem, 0, sigma, 0.4, torch.tensor([True, True, True, False]))
    # 0.05 below -> 1 (next step); 0.21 -> 2; 0.4 -> 4; unchecked row keeps next = 1
    assert mem["amg_next_check"].tolist() == [1, 2, 4, 1]
    assert s.due(mem, 1, 4).tolist() == [True, False, False, True]
    assert s.due(mem, 1, 4, always=torch.tensor([False, True, False, False])).tolist() == \
        [True, True, False, True]
    assert s.due(mem, 4, 4).all()
    off = CheckSchedule(0.0)
    off.after(mem := {}, 0, sigma, 0.4, torch.ones(4, dtype=torch.bool))
    assert mem == {} and off.due(mem, 3, 4).all()
    with pytest.raises(UserError, match="skip_margin"):
        CheckSchedule(-0.1)
    with pytest.raises(UserError, match="skip_max_gap"):
        CheckSchedule(0.1, 0)


def test_amg_skips_checks_far_below_lambda_with_the_same_images(family_dir):
    """A constant similarity 0.05 (lambda(u) = 0.3 + 0.1 e^{-5u} >= 0.3): every check is
    >= 0.25 below, so with m = 0.1 the next is 2 steps later (max gap 2); nothing fires, so the
    images are cfg's, bit for bit, with half the checks."""
    model = load_family(family_dir, "sd")
    runs = {}
    for margin in (0.0, 0.1):
        amg = make_guidance("amg", skip_margin=margin, skip_max_gap=2)
        crit = Recording(value=0.05)
        out = sample(model, prompts_for("sd"), [0, 1], amg, steps=6, guidance_scale=3.0,
                     criterion=crit)
        runs[margin] = (out, amg, crit)
    full, skip = runs[0.0], runs[0.1]
    assert torch.equal(full[0].images, skip[0].images)
    assert "checked" not in full[0].trace[0]  # off: the trace is unchanged
    checked = [rec["checked"] for rec in skip[0].trace]
    assert checked == [[1.0, 1.0], [0.0, 0.0]] * 3
    assert [math.isnan(v) for v in skip[0].trace[1]["sigma"]] == [True, True]
    assert len(skip[2].seen) == 3 and len(full[2].seen) == 6
    assert skip[1].cost["rows_checked"] == 6 and skip[1].cost["rows_skipped"] == 6


def test_rows_under_gdup_are_checked_every_step(family_dir):
    """A firing row turns Gdup on for 10 steps, which reads sigma every step: no skipping,
    and the result equals the every-step check."""
    model = load_family(family_dir, "sd")
    outs = [sample(model, prompts_for("sd"), [0, 1], make_guidance("amg", skip_margin=m),
                   steps=3, guidance_scale=3.0, criterion=FiringCriterion())
            for m in (0.0, 0.5)]
    assert torch.equal(outs[0].images, outs[1].images)
    assert all(v == 1.0 for rec in outs[1].trace for v in rec["checked"])


def test_cli_amg_decoder_is_recorded_and_refused_in_one_line(family_dir, tiny_dirs, tmp_path,
                                                             capsys):
    import pyarrow.parquet as pq
    from index_helpers import digits_parquet

    from memaudit.cli import main
    from memaudit.index import build_index

    idx = build_index(digits_parquet(tmp_path / "d.parquet", n=20), "pixels", tmp_path / "idx",
                      calibrate=False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n", encoding="utf-8")
    out = tmp_path / "out"
    main(["generate", "--model", str(family_dir("sd")), "--prompts", str(prompts), "--method",
          "amg", "--index", str(idx), "--amg-decoder", str(tiny_dirs["sd"]), "--out", str(out),
          "--steps", "1", "--device", "cpu"])
    (row,) = pq.read_table(out / "generations.parquet").to_pylist()
    params = json.loads(row["params_json"])["params"]
    assert params["decoder"] == str(tiny_dirs["sd"].resolve())
    assert params["decoder_sha256"] == sha256_file(
        tiny_dirs["sd"] / "diffusion_pytorch_model.safetensors")
    with pytest.raises(SystemExit) as e:  # the canary samples in pixel space
        main(["generate", "--model", "canary", "--prompts", str(prompts), "--method", "amg",
              "--index", str(idx), "--amg-decoder", str(tiny_dirs["sd"]), "--out",
              str(tmp_path / "o2"), "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "pixel space" in err
    assert not (tmp_path / "o2" / "generations.parquet").exists()


def test_plan_amg_decoder_is_relative_to_the_plan(tiny_dirs, tmp_path, monkeypatch):
    """`[params.amg] decoder` is a path relative to the plan file, as every plan path is
    (docs/report.md), whatever the working directory; a hub id stays a hub id."""
    import shutil

    from memaudit.audit import load_plan
    from memaudit.guidance import make_guidance as make

    root = tmp_path / "audit"
    (root / "idx").mkdir(parents=True)
    shutil.copytree(tiny_dirs["sd"], root / "taesd")
    (root / "p.txt").write_text("a photo of a cat\n", encoding="utf-8")
    text = ('out = "out"\nmodel = "fake"\nindex = "idx"\ncriteria = ["nl2"]\nmethods = ["amg"]\n'
            '[params.amg]\ndecoder = "{}"\nskip_margin = 0.15\n[[prompts]]\nfile = "p.txt"\n')
    (root / "plan.toml").write_text(text.format("taesd"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # not the plan's folder
    plan = load_plan(root / "plan.toml")
    assert plan.params["amg"] == {"decoder": str((root / "taesd").resolve()),
                                  "skip_margin": 0.15}
    amg = make("amg", **plan.params["amg"])
    assert amg.params.decoder_sha256 == sha256_file(
        root / "taesd" / "diffusion_pytorch_model.safetensors")
    (root / "plan.toml").write_text(text.format("./missing"), encoding="utf-8")
    with pytest.raises(UserError, match=str(root / "missing")):
        load_plan(root / "plan.toml")
    (root / "plan.toml").write_text(text.format("nobody/no-such-taesd"), encoding="utf-8")
    with pytest.raises(UserError, match="'nobody/no-such-taesd' .*local Hugging Face cache"):
        load_plan(root / "plan.toml")
