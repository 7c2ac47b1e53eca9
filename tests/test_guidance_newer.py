"""The newer mitigations (METHODS 3.5) against hand computations: init-noise (Han et al. 2025)
per sample and batch-wise, and reanchor (Chen et al. 2025, prompt re-anchoring)."""

from __future__ import annotations

import math

import pytest
import torch
from test_guidance import FakeDenoiser, state

from memaudit.common import UserError
from memaudit.guidance import build_guidance, make_guidance
from memaudit.models.cond import Cond
from memaudit.sampler import initial_noise, sample

C, H, W, L, D = 1, 4, 4, 3, 5


class XFake(FakeDenoiser):
    """eps = 0.5 x + tanh(x + txt): e_c - e_u depends on x, so x_T can lower it."""

    default_steps = 8

    def _eps(self, x_t, t, cond):
        txt = torch.tanh(cond.emb.mean(1) @ self.P).view(-1, C, H, W)
        return 0.5 * x_t + torch.tanh(x_t + 2 * txt)


def diff(model, x, t, prompt):
    c, u = model.encode_prompts([prompt]), model.encode_prompts([""])
    return model._eps(x, t, c) - model._eps(x, t, u)


def hand_per_sample(model, x, t, prompt, lr, max_iters, target=None, fraction=0.5, scale=1.0):
    """One sample, the official loop: AdamW on x_T until scale ||e_c - e_u|| <= target."""
    x = x.clone().requires_grad_(True)
    opt = torch.optim.AdamW([x], lr=lr)
    m0 = tau = None
    iters = 0
    for it in range(max_iters + 1):
        m = scale * torch.linalg.vector_norm(diff(model, x, t, prompt))
        if m0 is None:
            m0 = float(m.detach())
            tau = target if target is not None else fraction * m0
        if float(m.detach()) <= tau or it == max_iters:
            break
        iters += 1
        opt.zero_grad()
        m.backward()
        opt.step()
    return x.detach(), m0, float(m.detach()), iters


def test_init_noise_per_sample_matches_the_official_loop_per_row():
    model = XFake()
    prompts, seeds = ["a canary", "the sky", "a branch"], [0, 1, 2]
    x = initial_noise(model, seeds)
    t0 = torch.tensor(999)
    g = make_guidance("init-noise", lr=0.05, max_iters=30, fraction=0.8)
    emb_c, emb_u = model.encode_prompts(prompts), model.null_embedding(3)
    got = g.prepare_noise(x, emb_c, emb_u, seeds, model, t0)
    for i, p in enumerate(prompts):
        hx, m0, m, iters = hand_per_sample(model, x[i:i + 1], t0, p, 0.05, 30, fraction=0.8)
        assert torch.allclose(got[i:i + 1], hx, atol=1e-6)
        assert g.last["init_m0"][i] == pytest.approx(m0, rel=1e-5)
        assert g.last["init_m"][i] == pytest.approx(m, rel=1e-5)
        assert int(g.last["init_iters"][i]) == iters
        assert m <= 0.8 * m0 or iters == 30
    assert len(set(g.last["init_iters"].tolist())) > 1  # rows stop on their own


def test_init_noise_batch_wise_matches_the_sharpness_aware_update():
    model = XFake()
    x = initial_noise(model, [4, 5])
    t0 = torch.tensor(999)
    prompts = ["a canary", "the sky"]
    g = make_guidance("init-noise", mode="batch-wise", adj_iters=3, rho_rel=0.5, gamma=0.4)
    got = g.prepare_noise(x, model.encode_prompts(prompts), model.null_embedding(2), [4, 5],
                          model, t0)
    rho = 0.5 * math.sqrt(C * H * W)
    for i, p in enumerate(prompts):
        xi = x[i:i + 1].clone()
        for _ in range(3):
            d = diff(model, xi, t0, p)
            d2 = diff(model, xi + rho * d / torch.linalg.vector_norm(d), t0, p)
            xi = xi - 0.4 * (d2 - d)
        assert torch.allclose(got[i:i + 1], xi, atol=1e-6)
        assert g.last["init_m"][i] == pytest.approx(
            float(torch.linalg.vector_norm(diff(model, xi, t0, p))), rel=1e-5)


def test_init_noise_in_the_sampler_starts_from_the_adjusted_noise_and_defers_cfg():
    model = XFake()
    out = sample(model, ["a canary", "the sky"], [0, 1], make_guidance("init-noise"), steps=8,
                 guidance_scale=3.0)
    first = out.trace[0]
    # per-sample default: CFG from the first step, at the adjusted x_T
    assert first["scale"] == [3.0, 3.0]
    assert first["guidance_norm"] == pytest.approx([3 * m for m in first["init_m"]], rel=1e-5)
    assert all(a < b for a, b in zip(first["init_m"], first["init_m0"], strict=True))
    bw = sample(model, ["a canary"], [0], build_guidance("init-noise:batch-wise"), steps=8,
                guidance_scale=3.0)
    assert [r["scale"][0] for r in bw.trace] == [0.0] * 5 + [3.0] * 3  # e_u while j <= 4
    with pytest.raises(UserError, match="unknown init-noise mode 'nope'"):
        make_guidance("init-noise", mode="nope")


@pytest.fixture(scope="module")
def sd512(pipe_dir):
    """The tiny SD pipeline sampling 4x64x64 latents: the scale of SD 1.4 at 512 pixels, where
    the official magnitude constants were set."""
    from memaudit.models import load_model

    return load_model(pipe_dir, device="cpu", resolution=128)


def test_init_noise_uses_the_official_constants_on_sd_latents(sd512):
    """Official: target 0.9 absolute, at most 1,000 iterations, rho 50 (hygnhan/
    init_noise_diffusion_memorization); elsewhere memaudit's defaults, stated."""
    assert sd512.latent_shape == (4, 64, 64)
    k = make_guidance("init-noise").constants(sd512)
    assert (k["target"], k["max_iters"], k["rho"]) == (0.9, 1000, 50.0)
    other = make_guidance("init-noise").constants(XFake())
    assert (other["target"], other["fraction"], other["max_iters"]) == (None, 0.5, 100)
    assert other["rho"] == pytest.approx(50 / 128 * math.sqrt(C * H * W))
    assert make_guidance("init-noise", target=2.0, rho=7.0).constants(sd512)["target"] == 2.0
    # batch-wise with the defaults = a transcription of the official adj_init_noise_batch_wise
    # (rho 50, gamma 0.7, adj_iters 2) on the model's own UNet
    sched = sd512.scheduler(None, 50)
    t0 = sched.timesteps[0]
    prompts = ["a red car", "a photo of the cat"]
    x = initial_noise(sd512, [0, 1])
    c, u = sd512.encode_prompts(prompts), sd512.null_embedding(2)
    g = build_guidance("init-noise:batch-wise")
    got = g.prepare_noise(x, c, u, [0, 1], sd512, t0)
    emb = torch.cat([u.emb, c.emb])
    lat = x.clone()
    with torch.no_grad():
        for _ in range(2):
            pred = sd512.unet(torch.cat([lat] * 2), t0, encoder_hidden_states=emb).sample
            pu, pc = pred.chunk(2)
            eps_tilde = pc - pu
            mag = torch.sqrt(torch.sum(eps_tilde ** 2, dim=(1, 2, 3), keepdim=True))
            shifted = lat + 50 * (eps_tilde / mag)
            pred = sd512.unet(torch.cat([shifted] * 2), t0, encoder_hidden_states=emb).sample
            pu, pc = pred.chunk(2)
            lat = lat - 0.7 * ((pc - pu) - eps_tilde)
    assert torch.allclose(got, lat, atol=1e-5)
    # per-sample: the absolute target 0.9; a sample already under it is left as it is
    g = make_guidance("init-noise")
    out = g.prepare_noise(x[:1], sd512.encode_prompts([""]), u[:1], [0], sd512, t0)
    assert g.last["init_target"].tolist() == [pytest.approx(0.9)]
    assert g.last["init_iters"].tolist() == [0] and torch.equal(out, x[:1])


def test_sampler_refuses_a_prepare_noise_of_another_shape():
    class Bad(type(make_guidance("cfg"))):
        name = "bad"

        def prepare_noise(self, x_T, emb_c, emb_u, seeds, model, t0):
            return x_T[:, :, :2]

    with pytest.raises(ValueError, match="bad.prepare_noise returned"):
        sample(XFake(), ["a"], [0], Bad(), steps=2)


# --- reanchor ---------------------------------------------------------------------------------

def unit(b):
    v = torch.zeros(b, C, H, W)
    v[:, 0, 0, 0] = 1.0
    return v


def reanchor_at(mags, tau=1.0, s=3.0, triggered=True):
    """reanchor's eps for rows whose ||e_m - e_u|| are `mags` (e_u = 0, e_m = m unit,
    e_o = 0.5 m unit + a second direction), against the hand formula."""
    b = len(mags)
    g = make_guidance("reanchor")
    g.tau = torch.full((b,), tau)
    g.triggered = torch.full((b,), triggered)
    e_u = torch.zeros(b, C, H, W)
    m = torch.tensor(mags).view(-1, 1, 1, 1)
    e_m = unit(b) * m
    other = torch.zeros(b, C, H, W)
    other[:, 0, 1, 1] = 1.0
    e_o = 0.5 * e_m + 0.3 * other
    st = state(0, 10, 0.9, e_u, e_m, s0=s, extra={"reanchor_original": e_o})
    eps, tr = g.guide(st)
    return eps, tr, e_u, e_m, e_o


def test_reanchor_follows_the_official_rule():
    s, low, high = 3.0, 3.0, 5.0
    mags = [2.0, 3.0, 4.0, 5.0, 7.0]
    eps, tr, e_u, e_m, e_o = reanchor_at(mags, s=s)
    c = (s * low - high) / (s - 1)
    for i, m in enumerate(mags):
        cfg = e_u[i] + s * (e_m[i] - e_u[i])
        if m <= low:
            assert torch.allclose(eps[i], cfg)
            assert tr["reanchor_on"][i] == 0
            continue
        s_pr = min(s * (m - c) / (high - c), s)
        expect = e_o[i] + s_pr * (e_m[i] - e_o[i]) + (s - s_pr) * (e_m[i] - e_u[i])
        assert torch.allclose(eps[i], expect, atol=1e-6)
        assert tr["reanchor_s"][i] == pytest.approx(s_pr)
    # s_pr is s from M on: the original prompt is the anchor, e_o + s (e_m - e_o)
    assert torch.allclose(eps[3], e_o[3] + s * (e_m[3] - e_o[3]), atol=1e-6)
    # continuous at L: just above L it is (almost) plain CFG
    near, *_ = reanchor_at([3.0 + 1e-4], s=s)
    assert torch.allclose(near[0], (e_u[0] + s * unit(1)[0] * 3.0), atol=1e-3)


def test_reanchor_leaves_untriggered_samples_on_cfg_and_scales_thresholds_with_tau():
    eps, tr, e_u, e_m, _ = reanchor_at([10.0], triggered=False)
    assert torch.allclose(eps, e_u + 3.0 * (e_m - e_u)) and tr["reanchor_on"][0] == 0
    eps, tr, *_ = reanchor_at([4.0], tau=2.0)  # L = 6 > 4: off
    assert tr["reanchor_on"][0] == 0
    with pytest.raises(UserError, match="0 < low < high"):
        make_guidance("reanchor", low=5.0, high=3.0)


def test_reanchor_through_the_sampler_triggers_on_wen_and_evaluates_the_original_prompt():
    model = XFake()
    g = build_guidance("reanchor", {"reanchor": {"trigger": 0.0, "low": 0.1, "high": 0.2}})
    out = sample(model, ["a canary", "the sky"], [0, 1], g, steps=4, guidance_scale=3.0)
    assert g.triggered.all()  # loss0 > trigger 0: every sample was adjusted
    # 2 rows + the original prompt's row per step, plus Wen's 2 + iterations at x_T
    assert out.unet_rows == pytest.approx(3 * 4 + (1 + 1 + 10), abs=1e-9)
    assert {"reanchor_m", "reanchor_s", "reanchor_on", "wen_loss0"} <= set(out.trace[0])
    emb = Cond(emb=torch.zeros(1, L, D))
    g2 = make_guidance("reanchor")
    g2.original = emb
    g2.triggered = torch.tensor([False])
    assert g2.extra_conditions(None) == {}  # nothing triggered: no extra rows


def test_reanchor_does_not_trigger_on_a_low_magnitude_sample():
    """Never a self-relative trigger (METHODS 3.5): on the canary tau is calibrated on its own
    generic prompts, so a generic prompt's sample (m0 under tau) is not re-anchored and gets
    plain CFG, where half of its own m0 used to trigger every sample."""
    from memaudit.models import load_model

    canary = load_model("canary", device="cpu")
    g = make_guidance("reanchor")
    out = sample(canary, ["a handwritten digit 3"], [0], g, steps=3)
    cfg = sample(canary, ["a handwritten digit 3"], [0], make_guidance("cfg"), steps=3)
    assert not g.triggered.any() and g.tau[0] == pytest.approx(g.trigger)
    assert float(g.last["wen_loss0"][0]) <= g.trigger
    assert torch.equal(out.images, cfg.images)
    assert [r["reanchor_on"] for r in out.trace] == [[0.0]] * 3
    rec = g.generation_record("a handwritten digit 3", 0)["reanchor"]
    assert rec["source"] == ("calibrated on the canary model's generic prompts (seeds 0-3, "
                             "FPR 0.01)")
    assert (rec["low"], rec["high"]) == pytest.approx((3 * g.trigger, 5 * g.trigger))
    # the threshold is the largest generic (prompt, seed) magnitude at FPR 0.01 (84 rows),
    # at this run's first timestep
    t0 = canary.scheduler(None, 3).timesteps[0]
    assert g.trigger == pytest.approx(max(
        float(torch.linalg.vector_norm(diff(canary, initial_noise(canary, [s]), t0, p)))
        for p in canary.generic_prompts for s in range(4)), rel=1e-5)


def test_reanchor_trigger_is_official_on_sd_latents_given_or_calibrated_elsewhere(sd512,
                                                                                  tmp_path):
    t0 = torch.tensor(500)
    g = make_guidance("reanchor")
    assert g.resolve_trigger(sd512, t0) == 1.0 and g.trigger_source.startswith("official")
    assert make_guidance("reanchor", trigger=2.5).resolve_trigger(XFake(), t0) == 2.5
    with pytest.raises(UserError, match="reanchor needs a trigger threshold for .* give "
                                        "reanchor.trigger=X or reanchor.calibrate="):
        make_guidance("reanchor").resolve_trigger(XFake(), t0)
    with pytest.raises(UserError, match="trigger is absolute"):
        make_guidance("reanchor", fraction=0.5)
    clean = tmp_path / "clean.txt"
    clean.write_text("the sky\na branch\n")
    g = make_guidance("reanchor", calibrate=str(clean), calibrate_seeds=2, fpr=0.0)
    model = XFake()
    want = max(float(torch.linalg.vector_norm(diff(model, initial_noise(model, [s]), t0, p)))
               for p in ("the sky", "a branch") for s in (0, 1))
    assert g.resolve_trigger(model, t0) == pytest.approx(want, rel=1e-5)
    assert g.trigger_source == f"calibrated on {clean} (seeds 0-1, FPR 0)"


# --- flow models: every magnitude the noise prediction's (METHODS 0) -----------------------------

class FlowXFake(XFake):
    """XFake read as a flow-matching model: its output is a velocity, sigma = t / 1000, so a
    magnitude is (1 - sigma) ||v_c - v_u|| (1 - sigma floored at 1 / 1000)."""

    def __init__(self) -> None:
        from memaudit.models.prediction import FlowPrediction

        super().__init__()
        self.prediction = FlowPrediction(1000)


def noise_scale(t: int) -> float:
    return max(1 - t / 1000, 1 / 1000)


@pytest.mark.parametrize("t", [600, 1000])
def test_init_noise_per_sample_on_flow_minimises_the_noise_prediction_magnitude(t):
    """m = (1 - sigma) ||v_c - v_u||: recorded that way, compared with an absolute target on
    that scale (sigma 0.6: factor 0.4; sigma 1: the floor 1 / 1000)."""
    model = FlowXFake()
    prompts, seeds = ["a canary", "the sky"], [0, 1]
    x = initial_noise(model, seeds)
    t0, k = torch.tensor(t), noise_scale(t)
    vel0 = [float(torch.linalg.vector_norm(diff(model, x[i:i + 1], t0, p)))
            for i, p in enumerate(prompts)]
    target = 0.9 * k * min(vel0)  # under both rows' noise magnitude, over 0.9 x velocity's / k
    g = make_guidance("init-noise", lr=0.05, max_iters=20, target=target)
    got = g.prepare_noise(x, model.encode_prompts(prompts), model.null_embedding(2), seeds,
                          model, t0)
    for i, p in enumerate(prompts):
        hx, m0, m, iters = hand_per_sample(model, x[i:i + 1], t0, p, 0.05, 20,
                                           target=target, scale=k)
        assert torch.allclose(got[i:i + 1], hx, atol=1e-6)
        assert m0 == pytest.approx(k * vel0[i], rel=1e-6)
        assert g.last["init_m0"][i] == pytest.approx(m0, rel=1e-5)
        assert g.last["init_m"][i] == pytest.approx(m, rel=1e-5)
        assert int(g.last["init_iters"][i]) == iters > 0
    assert g.last["init_target"].tolist() == pytest.approx([target] * 2)


def test_init_noise_batch_wise_on_flow_records_noise_magnitudes():
    """The sharpness-aware update is the velocity's (its direction is scale-free); m0 and m
    are (1 - sigma) ||v_c - v_u||."""
    model = FlowXFake()
    x = initial_noise(model, [4, 5])
    t0 = torch.tensor(700)
    prompts = ["a canary", "the sky"]
    g = make_guidance("init-noise", mode="batch-wise", adj_iters=2, rho_rel=0.5, gamma=0.4)
    got = g.prepare_noise(x, model.encode_prompts(prompts), model.null_embedding(2), [4, 5],
                          model, t0)
    rho = 0.5 * math.sqrt(C * H * W)
    for i, p in enumerate(prompts):
        xi = x[i:i + 1].clone()
        m0 = float(torch.linalg.vector_norm(diff(model, xi, t0, p)))
        for _ in range(2):
            d = diff(model, xi, t0, p)
            d2 = diff(model, xi + rho * d / torch.linalg.vector_norm(d), t0, p)
            xi = xi - 0.4 * (d2 - d)
        assert torch.allclose(got[i:i + 1], xi, atol=1e-6)
        assert g.last["init_m0"][i] == pytest.approx(0.3 * m0, rel=1e-5)
        assert g.last["init_m"][i] == pytest.approx(
            0.3 * float(torch.linalg.vector_norm(diff(model, xi, t0, p))), rel=1e-5)


def test_reanchor_on_flow_compares_the_noise_prediction_magnitude():
    """At sigma 0.6 a velocity difference of norm 10 is a noise magnitude of 4: with tau 1
    (L 3, M 5) it is re-anchored at s_pr from m = 4, not at the velocity's 10 (s_pr = s)."""
    s, low, high = 3.0, 3.0, 5.0
    b = 3
    g = make_guidance("reanchor")
    g.tau, g.triggered = torch.ones(b), torch.ones(b, dtype=torch.bool)
    vel = torch.tensor([5.0, 10.0, 20.0])  # noise magnitudes 2, 4, 8
    e_u = torch.zeros(b, C, H, W)
    e_m = unit(b) * vel.view(-1, 1, 1, 1)
    other = torch.zeros(b, C, H, W)
    other[:, 0, 1, 1] = 1.0
    e_o = 0.5 * e_m + 0.3 * other
    st = state(0, 10, 0.6, e_u, e_m, s0=s, model=FlowXFake(),
               extra={"reanchor_original": e_o})
    st.t = torch.tensor(600)
    eps, tr = g.guide(st)
    noise = 0.4 * vel
    assert tr["reanchor_m"].tolist() == pytest.approx(noise.tolist())
    assert tr["reanchor_on"].tolist() == [0.0, 1.0, 1.0]
    assert torch.allclose(eps[0], e_u[0] + s * e_m[0])  # m = 2 <= L: plain CFG
    c = (s * low - high) / (s - 1)
    for i in (1, 2):
        s_pr = min(s * (float(noise[i]) - c) / (high - c), s)
        assert tr["reanchor_s"][i] == pytest.approx(s_pr)
        expect = e_o[i] + s_pr * (e_m[i] - e_o[i]) + (s - s_pr) * (e_m[i] - e_u[i])
        assert torch.allclose(eps[i], expect, atol=1e-6)
    assert float(tr["reanchor_s"][1]) < s  # the velocity's 10 > M would have given s


def test_reanchor_calibration_and_trigger_on_flow_take_the_noise_magnitude(tmp_path):
    """The calibrated tau and each sample's m0 (Wen's initial loss) are (1 - sigma) ||v_c -
    v_u|| at the run's first timestep."""
    clean = tmp_path / "clean.txt"
    clean.write_text("the sky\na branch\n")
    model = FlowXFake()
    t0 = torch.tensor(500)
    g = make_guidance("reanchor", calibrate=str(clean), calibrate_seeds=2, fpr=0.0)
    vel = [float(torch.linalg.vector_norm(diff(model, initial_noise(model, [s]), t0, p)))
           for p in ("the sky", "a branch") for s in (0, 1)]
    assert g.resolve_trigger(model, t0) == pytest.approx(0.5 * max(vel), rel=1e-5)
    x = initial_noise(model, [0])
    g.prepare_embeddings(model.encode_prompts(["a canary"]), model.null_embedding(1), x, [0],
                         model, t0)
    m0 = 0.5 * float(torch.linalg.vector_norm(diff(model, x, t0, "a canary")))
    assert float(g.last["wen_loss0"][0]) == pytest.approx(m0, rel=1e-5)
    assert bool(g.triggered[0]) == (m0 > g.trigger)
