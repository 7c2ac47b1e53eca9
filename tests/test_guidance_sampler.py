"""Every mitigation through the real sampler (memaudit.sampler.sample) with a fake denoiser:
no sampler change needed, per-sample decisions independent of batching, costs counted."""

from __future__ import annotations

import pytest
import torch
from test_guidance import FakeDenoiser, PixelNL2

from memaudit.guidance import REGISTRY, build_guidance, make_guidance
from memaudit.sampler import sample

PROMPTS = ["a canary on a branch", "a photo of a cat", "the sky at night"]
SEEDS = [0, 1, 2]


class Fake(FakeDenoiser):
    default_steps = 12


def crit():
    return PixelNL2(torch.full((1, 3, 4, 4), 0.5))


#: Parameters a method cannot run without (auto needs a screening threshold).
REQUIRED = {"auto": {"threshold": 0.0}, "reanchor": {"trigger": 0.0}}  # no official scale


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_runs_through_the_sampler(name):
    model = Fake()
    g = make_guidance(name, **REQUIRED.get(name, {}))
    out = sample(model, PROMPTS, SEEDS, g, steps=6, guidance_scale=2.0,
                 criterion=crit() if g.needs_criterion else None)
    assert out.images.shape == (3, 3, 4, 4) and torch.isfinite(out.images).all()
    assert len(out.trace) == 6
    if name in ("cfg", "static", "dynamic", "opposite", "opposite-dynamic", "rna", "rta", "cwr",
                "gni"):
        assert out.unet_rows == 2 * 6  # no extra UNet calls
    if name in ("static", "dynamic", "opposite", "opposite-dynamic"):
        assert len(out.trace[-1]["switch_step"]) == 3
    if name in ("rna", "rta", "cwr"):
        assert all(len(p.split()) == len(q.split()) + 4
                   for p, q in zip(out.prompts, PROMPTS, strict=True))
    if name == "wen":
        assert out.unet_rows > 2 * 6
        assert all(a < b for a, b in zip(out.trace[0]["wen_loss"], out.trace[0]["wen_loss0"],
                                         strict=True))
    if name == "amg":
        assert {"sigma", "lambda", "amg_spe", "amg_dup", "amg_sim"} <= set(out.trace[0])
    if name == "init-noise":  # the fake's e_c - e_u does not depend on x: nothing to lower
        assert out.trace[0]["init_m"] == pytest.approx(out.trace[0]["init_m0"])
        assert out.unet_rows == 2 * 6 + 2 * (1 + 100)  # ran to max_iters
    if name == "reanchor":
        assert {"reanchor_m", "reanchor_s", "reanchor_on", "wen_loss"} <= set(out.trace[0])
    if name == "auto":
        assert len(out.trace[0]["auto_flagged"]) == 3


@pytest.mark.parametrize("spec", ["dynamic", "opposite-dynamic", "amg", "rna", "gni", "wen",
                                  "init-noise", "init-noise:batch-wise", "reanchor", "auto"])
def test_per_sample_rules_do_not_depend_on_batching(spec):
    params = {"auto": {"threshold": 0.0, "mitigation": "reanchor"}, "reanchor": {"trigger": 0.0}}
    g = build_guidance(spec, params)
    c = crit() if g.needs_criterion else None
    whole = sample(Fake(), PROMPTS, SEEDS, g, steps=8, guidance_scale=2.0, criterion=c)
    single = sample(Fake(), PROMPTS, SEEDS, build_guidance(spec, params), steps=8,
                    guidance_scale=2.0, criterion=c, batch_size=1)
    assert torch.allclose(whole.images, single.images, atol=1e-5)
    assert whole.prompts == single.prompts


def test_dynamic_trace_switch_steps_follow_the_recorded_norms():
    out = sample(Fake(), PROMPTS * 2, [0, 1, 2, 3, 4, 5], make_guidance("dynamic"), steps=12,
                 guidance_scale=2.0)
    d = torch.tensor([rec["d"] for rec in out.trace])  # [steps, B]
    us = [rec["u"] for rec in out.trace]
    for i in range(d.shape[1]):
        expect = next((j for j in range(2, len(us)) if d[j, i] > d[j - 1, i] < d[j - 2, i]
                       or us[j] <= 0.2), None)
        assert out.trace[-1]["switch_step"][i] == expect
        scales = [rec["scale"][i] for rec in out.trace]
        assert scales == [1.0] * expect + [2.0] * (len(us) - expect)


def test_amg_dup_rows_are_batched_with_the_sampler_forward():
    model = Fake()
    g = make_guidance("amg", parts="dup")
    c = crit()
    c.calibrated_threshold = 1e4  # fire on every sample at every step
    out = sample(model, PROMPTS, SEEDS, g, steps=6, guidance_scale=3.0, criterion=c)
    # step 0: 2 rows + 1 extra row evaluated by AMG for the newly fired samples; then 3 rows
    assert out.unet_rows == 2 + 1 + 3 * 5
    assert out.forwards == 6 + 1
    assert all(v == 1.0 for rec in out.trace for v in rec["amg_dup"])
