"""Every rule right on flow-matching models (issue 19; METHODS.md 0), on the tiny SD3 pipeline:
magnitudes on the noise prediction, switch points matched by signal-to-noise ratio, AMG's Gsim
moving x0_hat as the eps rule does at the same SNR, and SD3 saved without its T5 encoder."""

from __future__ import annotations

import math

import pytest
import torch
from family_helpers import FiringCriterion, load_family, prompts_for

from memaudit.guidance import StepState, make_guidance
from memaudit.guidance.amg import C3_COSINE
from memaudit.models.prediction import EpsPrediction, FlowPrediction
from memaudit.sampler import sample

SEEDS = [0, 1]


def sd_abar() -> torch.Tensor:
    """Stable Diffusion's training schedule, transcribed: scaled-linear betas 0.00085..0.012,
    T = 1000 (diffusers' `scaled_linear`: linspace of the square roots, squared)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def sigma_with_sd_snr(t: int) -> float:
    """The flow sigma whose SNR ((1 - sigma) / sigma)^2 is SD's abar_t / (1 - abar_t)."""
    abar = sd_abar()[t]
    return float(1 / (1 + (abar / (1 - abar)).sqrt()))


def sd3_sigmas(m, steps: int) -> list[float]:
    return [float(t) / 1000 for t in m.scheduler(None, steps).timesteps]


# --- switch points by SNR ----------------------------------------------------------------------

def test_tau_maps_to_the_sigma_with_sds_snr():
    from diffusers import DDIMScheduler

    sd = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(sd.alphas_cumprod.double(), sd_abar(), atol=1e-6)
    p = FlowPrediction(1000)
    assert p.switch_level(0.5) == pytest.approx(sigma_with_sd_snr(500), abs=1e-9)
    assert p.switch_level(0.65) == pytest.approx(sigma_with_sd_snr(650), abs=1e-9)
    assert p.switch_level(0.2) == pytest.approx(sigma_with_sd_snr(200), abs=1e-9)
    assert round(p.switch_level(0.5), 4) == 0.6181 and round(p.switch_level(0.65), 4) == 0.7330
    assert p.switch_level(1.0) == 1.0  # tau = 1: from the first step (pure noise)
    assert p.switch_level(0.0) == pytest.approx(sigma_with_sd_snr(0), abs=1e-9)
    # the SD-equivalent u of a sigma inverts it
    for tau in (0.05, 0.2, 0.5, 0.65, 0.9, 0.9995):
        assert p.ref_u(p.switch_level(tau)) == pytest.approx(tau, abs=1e-9)
    # eps families keep tau as the fraction u = t / T of their own schedule
    e = EpsPrediction(sd_abar().float())
    assert e.switch_level(0.5) == 0.5 and e.ref_u(0.37) == 0.37


@pytest.mark.parametrize("method,tau", [("static", 0.5), ("opposite", 0.65)])
def test_static_switch_on_sd3_is_matched_by_snr_and_recorded(family_dir, method, tau):
    m = load_family(family_dir, "sd3")
    steps = 28
    sig = sd3_sigmas(m, steps)
    sigma_tau = sigma_with_sd_snr(round(tau * 1000))
    expect = next(j for j, s in enumerate(sig) if s <= sigma_tau)
    assert expect != next(j for j, s in enumerate(sig) if s <= tau)  # sigma = tau would differ
    out = sample(m, prompts_for("sd3")[:1], [0], make_guidance(method), steps=steps,
                 guidance_scale=4.0)
    assert out.trace[-1]["switch_step"] == [expect]
    for rec in out.trace:
        assert rec["tau"] == [tau]
        assert rec["switch_sigma"][0] == pytest.approx(sigma_tau, abs=1e-6)


# --- magnitudes on the noise prediction ---------------------------------------------------------

def designed_velocity(m, steps: int, noise_mag: list[float]):
    """Replace the tiny SD3's forward: v_u = 0 and v_c = a constant direction whose noise-
    prediction magnitude (1 - sigma) ||v_c - v_u|| at step j is noise_mag[j] (1 - sigma floored
    at 1 / T at sigma = 1)."""
    level = {round(s * 1000, 3): j for j, s in enumerate(sd3_sigmas(m, steps))}

    def eps(x_t, t, cond):
        j = level[round(float(t[0]), 3)]
        sigma = float(t[0]) / 1000
        b = x_t.shape[0] // 2
        v = torch.zeros_like(x_t, dtype=torch.float32)
        v[b:] = noise_mag[j] / max(1 - sigma, 1e-3) / x_t[0].numel() ** 0.5
        return v

    m._eps = eps


def first_strict_min_seen(d: list[float], start: int = 2) -> int | None:
    return next((j for j in range(start, len(d)) if d[j] > d[j - 1] < d[j - 2]), None)


@pytest.mark.parametrize("method", ["dynamic", "opposite-dynamic"])
def test_dynamic_switch_on_a_flow_noise_magnitude_with_a_known_minimum(family_dir, method):
    """Noise-prediction magnitudes with their only strict minimum at step 6: the switch is at
    step 7 (seen one step late), where the velocity magnitude (1 / (1 - sigma) larger, and
    more so early) would have switched later."""
    m = load_family(family_dir, "sd3")
    steps = 28
    mag = [5.0] + [1.0 + 0.02 * (j - 6) ** 2 for j in range(1, steps)]
    sig = sd3_sigmas(m, steps)
    vel = [d / max(1 - s, 1e-3) for d, s in zip(mag, sig, strict=True)]
    assert first_strict_min_seen(mag) == 7 and first_strict_min_seen(vel) > 8
    designed_velocity(m, steps, mag)
    out = sample(m, ["a photo of a cat"], [0], make_guidance(method), steps=steps,
                 guidance_scale=4.0)
    assert out.trace[-1]["switch_step"] == [7]
    d = [rec["d"][0] for rec in out.trace]
    assert d == pytest.approx(mag, rel=1e-4)
    # the sampler's guidance_norm is a noise-prediction magnitude too: |s| d
    s_before = 1.0 if method == "dynamic" else -2.0
    for j, rec in enumerate(out.trace):
        s = s_before if j < 7 else 4.0
        assert rec["guidance_norm"][0] == pytest.approx(abs(s) * mag[j], rel=1e-4)


def test_dynamic_fallback_is_matched_by_snr(family_dir):
    """No minimum (magnitudes falling throughout): forced at the first sigma <= the sigma with
    SD's SNR at u = 0.2, recorded."""
    m = load_family(family_dir, "sd3")
    steps = 28
    mag = [30.0 - j for j in range(steps)]
    designed_velocity(m, steps, mag)
    out = sample(m, ["a photo of a cat"], [0], make_guidance("dynamic"), steps=steps,
                 guidance_scale=4.0)
    sig = sd3_sigmas(m, steps)
    force = sigma_with_sd_snr(200)
    assert out.trace[-1]["switch_step"] == [next(j for j, s in enumerate(sig) if s <= force)]
    assert out.trace[0]["force_u"] == [0.2]
    assert out.trace[0]["force_sigma"][0] == pytest.approx(force, abs=1e-6)


def test_wen_screening_takes_the_noise_prediction_magnitude(family_dir):
    from memaudit.screen import screen_prompts
    from memaudit.screen.base import cond_uncond

    m = load_family(family_dir, "sd3")
    prompt = "a red car"
    got = screen_prompts(m, [prompt], steps=2, seeds=1, guidance_scale=3.0, progress=False,
                        score="wen")
    sched = m.scheduler(None, m.default_steps)
    from memaudit.sampler import initial_noise

    x = initial_noise(m, [0])
    emb_c, emb_u = m.encode_prompts([prompt]), m.null_embedding(1)
    total = 0.0
    with torch.no_grad():
        for j, t in enumerate(sched.timesteps[:2]):
            e_u, e_c = cond_uncond(m, x, t, emb_u, emb_c)
            sigma = float(t) / 1000
            total += max(1 - sigma, 1e-3) * float((e_c - e_u).flatten().norm())
            if j == 0:
                x = sched.step(e_u + 3.0 * (e_c - e_u), t, x).prev_sample
    assert got[0] == pytest.approx(total / 2, rel=1e-5)


# --- AMG's Gsim on flow -------------------------------------------------------------------------

def _amg_state(m, j: int, steps: int = 28, s0: float = 4.0) -> StepState:
    sched = m.scheduler(None, steps)
    t = sched.timesteps[j]
    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(2, *m.latent_shape, generator=g)
    emb_c, emb_u = m.encode_prompts(prompts_for("sd3")), m.null_embedding(2)
    with torch.no_grad():
        e_u, e_c = m.eps(x_t, t, emb_u), m.eps(x_t, t, emb_c)
    return StepState(index=j, num_steps=steps, t=t, u=float(t) / 1000, x_t=x_t,
                     alpha_bar=None, s0=s0, model=m, criterion=FiringCriterion(), e_u=e_u,
                     e_c=e_c, emb_u=emb_u, emb_c=emb_c, memory={})


def test_gsim_on_flow_moves_x0_hat_as_the_eps_rule_at_the_same_snr(family_dir):
    """Against autograd in eps coordinates: the same x_t, as a variance-preserving sample at
    the same SNR (x_vp = x_t / r, r = sqrt((1 - sigma)^2 + sigma^2), sqrt(abar) = (1 - sigma)
    / r), eps = the flow's noise estimate x_t + (1 - sigma) v; the eps rule
    eps += c3 w sqrt(1 - abar) grad_{x_vp} sim moves x0_hat by -(sqrt(1 - abar) / sqrt(abar))
    times that; the flow update must move x0_hat = x_t - sigma v by the same."""
    m = load_family(family_dir, "sd3")
    st = _amg_state(m, 10)
    sigma = float(st.t) / 1000
    v_cfg = st.e_u + st.s0 * (st.e_c - st.e_u)
    v_hat, tr = make_guidance("amg", parts="sim").guide(st)
    assert tr["amg_sim"].tolist() == [1.0, 1.0]
    dx0_flow = -sigma * (v_hat - v_cfg)

    r = ((1 - sigma) ** 2 + sigma ** 2) ** 0.5
    a, b = (1 - sigma) / r, sigma / r
    eps = st.x_t + (1 - sigma) * v_cfg
    x_vp = (st.x_t / r).clone().requires_grad_(True)
    crit = FiringCriterion()
    with torch.enable_grad():
        x0 = (x_vp - b * eps) / a
        assert torch.allclose(x0, st.x_t - sigma * v_cfg, atol=1e-5)  # the same x0_hat
        sim = crit.similarity_tensor(m.decode(x0))[0]
        (grad,) = torch.autograd.grad(sim.sum(), x_vp)
    u_ref = m.prediction.ref_u(sigma)
    w = (sim.detach() - 0.3) * torch.exp(torch.tensor((1 - u_ref) / 0.17))
    assert torch.allclose(tr["w"], w, rtol=1e-5)
    d_eps = C3_COSINE * w.view(-1, 1, 1, 1) * b * grad
    dx0_eps = -(b / a) * d_eps
    assert dx0_eps.abs().max() > 1e-4
    assert torch.allclose(dx0_flow, dx0_eps, rtol=1e-3, atol=1e-6 * dx0_eps.abs().max())


def test_gsim_is_absent_at_sigma_one(family_dir):
    m = load_family(family_dir, "sd3")
    st = _amg_state(m, 0)
    assert float(st.t) == 1000.0
    v_cfg = st.e_u + st.s0 * (st.e_c - st.e_u)
    v_hat, tr = make_guidance("amg", parts="sim").guide(st)
    assert tr["fired"].tolist() == [1.0, 1.0]  # the criterion fires, Gsim does not act
    assert tr["amg_sim"].tolist() == [0.0, 0.0]
    assert torch.equal(v_hat, v_cfg)


class ConstCriterion(FiringCriterion):
    """Similarity `value` for every image (differentiable, zero gradient)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def similarity_tensor(self, images):
        return self.value + 0 * images.flatten(1).sum(1), torch.zeros(images.shape[0],
                                                                      dtype=torch.long)


def test_amg_threshold_schedule_takes_u_on_sds_schedule_at_the_steps_snr(family_dir):
    """lambda(u) = 0.3 + 0.1 exp(-5 u) at u_ref, the u on SD's schedule with the step's SNR,
    not at u = sigma: a similarity between the two levels fires only by the latter."""
    m = load_family(family_dir, "sd3")

    def lam(u):
        return 0.3 + 0.1 * math.exp(-5 * u)

    gap = [lam(m.prediction.ref_u(s)) - lam(s) for s in sd3_sigmas(m, 28)]
    st = _amg_state(m, max(range(28), key=lambda j: gap[j]))
    sigma = float(st.t) / 1000
    u_ref = m.prediction.ref_u(sigma)
    assert sigma_with_sd_snr(round(u_ref * 1000)) == pytest.approx(sigma, abs=2e-3)
    lam_ref, lam_sigma = lam(u_ref), lam(sigma)
    assert lam_ref - lam_sigma > 2e-3
    st.criterion = ConstCriterion((lam_ref + lam_sigma) / 2)
    _, tr = make_guidance("amg", parts="spe").guide(st)
    assert tr["lambda"] == pytest.approx(lam_ref, rel=1e-9)
    assert tr["fired"].tolist() == [0.0, 0.0] and tr["s1"].tolist() == [0.0, 0.0]
    st.criterion = ConstCriterion(lam_ref + 1e-3)
    _, tr = make_guidance("amg", parts="spe").guide(st)
    assert tr["fired"].tolist() == [1.0, 1.0]


def test_anisotropy_norm_on_sd3_is_the_noise_prediction_magnitude(family_dir):
    """At SD3's first step (sigma = 1) N = ||v_c - v_u|| / T (the floor of METHODS 0)."""
    from memaudit.screen import make_score
    from memaudit.screen.base import ScoreInput

    m = load_family(family_dir, "sd3")
    sched = m.scheduler(None, 10)
    assert float(sched.timesteps[0]) == 1000.0
    from memaudit.sampler import initial_noise

    x = initial_noise(m, SEEDS)
    emb_c, emb_u = m.encode_prompts(prompts_for("sd3")), m.null_embedding(2)
    n, _ = make_score("anisotropy").terms(ScoreInput(m, x, emb_c, emb_u, sched, 1, 4.0))
    with torch.no_grad():
        t = sched.timesteps[0]
        d = m.eps(x, t, emb_c) - m.eps(x, t, emb_u)
    assert n.tolist() == pytest.approx((d.flatten(1).norm(dim=1) / 1000).tolist(), rel=1e-5)


# --- SD3 saved without T5 -----------------------------------------------------------------------

def test_sd3_saved_without_t5_loads_and_samples_as_its_pipeline(family_dir, tmp_path):
    import json

    from diffusers import StableDiffusion3Pipeline

    from memaudit.sampler import initial_noise

    folder = tmp_path / "sd3-no-t5"
    StableDiffusion3Pipeline.from_pretrained(str(family_dir("sd3")), text_encoder_3=None,
                                             tokenizer_3=None).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    m = load_family(lambda name: folder, "sd3")
    assert m.pipe.text_encoder_3 is None and m.pipe.tokenizer_3 is None
    notes = " ".join(m.notes)
    assert "text_encoder_3" in notes and "T5" in notes
    assert f"{m.pipe.tokenizer.model_max_length}-token" in notes
    assert m.provenance()["notes"] == m.notes
    prompts = prompts_for("sd3")
    out = sample(m, prompts, SEEDS, make_guidance("cfg"), steps=2, guidance_scale=4.0)
    ref = m.pipe(prompts, num_inference_steps=2, guidance_scale=4.0,
                 latents=initial_noise(m, SEEDS), output_type="pt", max_sequence_length=8).images
    assert torch.isfinite(out.images).all()
    assert (out.images - ref.float()).abs().max() < 1e-4
