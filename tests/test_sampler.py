"""The sampler contract on a toy analytic denoiser, checked against a hand-written DDIM loop."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from memaudit.common import UserError
from memaudit.guidance import make_guidance
from memaudit.guidance.base import Guidance, StepState, cfg_combine
from memaudit.models.base import Denoiser
from memaudit.sampler import initial_noise, sample


class ToyDenoiser(Denoiser):
    """eps(x, t, emb) = 0.5 x + m(emb) (1 + t / 1000), m = mean of the embedding row.

    Embedding of a prompt p: len(p) / 10 everywhere ([1, 3, 2]); the empty prompt gives 0.
    Every row is computed independently, so batching cannot change a row's value.
    """

    name = "toy"
    model_hash = "0" * 64
    latent_shape = (1, 4, 4)
    is_latent = False
    default_guidance_scale = 3.0
    default_steps = 2

    def __init__(self) -> None:
        super().__init__()
        self.device = torch.device("cpu")
        self.calls: list[int] = []  # rows per forward

    def encode_prompts(self, prompts):
        return torch.stack([torch.full((3, 2), len(p) / 10.0) for p in prompts])

    def _eps(self, x_t, t, cond):
        self.calls.append(x_t.shape[0])
        m = cond.emb.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return 0.5 * x_t + m * (1 + t.float().view(-1, 1, 1, 1) / 1000)

    def decode(self, x0):
        return ((x0.clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1).clone()

    def make_scheduler(self, kind="ddim"):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        cfg = dict(num_train_timesteps=1000, beta_schedule="linear", steps_offset=0)
        if kind == "ddim":
            return DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **cfg)
        return DPMSolverMultistepScheduler(**cfg)


def hand_ddim_cfg(model, prompts, seeds, scale, steps):
    """DDIM (eta 0) with CFG written out: x0 = (x - sqrt(1-a) e) / sqrt(a);
    x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) e (Song et al. 2021, Eq. 12 with sigma = 0)."""
    sched = model.make_scheduler("ddim")
    abar = sched.alphas_cumprod.double()
    ratio = 1000 // steps
    ts = [ratio * i for i in reversed(range(steps))]
    x = torch.stack([torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(s))
                     for s in seeds]).double()
    m_c = torch.tensor([len(p) / 10.0 for p in prompts], dtype=torch.float64).view(-1, 1, 1, 1)
    norms = []
    for t in ts:
        e_u = 0.5 * x
        e_c = 0.5 * x + m_c * (1 + t / 1000)
        e = e_u + scale * (e_c - e_u)
        norms.append((e - e_u).flatten(1).norm(dim=1))
        a = abar[t]
        a_prev = abar[t - ratio] if t - ratio >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    return x, ts, norms


def test_cfg_matches_hand_computed_ddim_and_costs():
    model = ToyDenoiser()
    prompts, seeds = ["a cat", "a much longer prompt"], [3, 7]
    out = sample(model, prompts, seeds, make_guidance("cfg"), steps=2, guidance_scale=3.0)
    x, ts, norms = hand_ddim_cfg(model, prompts, seeds, 3.0, 2)
    assert torch.allclose(out.latents.double(), x, atol=1e-5)
    assert torch.allclose(out.images, ((x.clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1).float(),
                          atol=1e-5)
    assert out.images.shape == (2, 3, 4, 4)
    assert [rec["t"] for rec in out.trace] == ts == [500, 0]
    assert [rec["u"] for rec in out.trace] == [0.5, 0.0]
    for rec, n in zip(out.trace, norms, strict=True):
        assert rec["guidance_norm"] == pytest.approx(n.tolist(), rel=1e-5)
    # one batched forward per step over [uncond; cond] rows
    assert model.calls == [4, 4]
    assert out.unet_rows == 4.0 and out.forwards == 2
    assert out.wall_seconds > 0 and out.total_seconds == pytest.approx(2 * out.wall_seconds)
    assert out.prompts == prompts and out.seeds == seeds


def test_defaults_come_from_the_model():
    model = ToyDenoiser()
    out = sample(model, ["abc"], [0], make_guidance("cfg"))
    assert out.steps == 2 and out.guidance_scale == 3.0 and len(out.trace) == 2


def test_rows_do_not_depend_on_batch_and_seeds_are_deterministic():
    model = ToyDenoiser()
    g = make_guidance("cfg")
    prompts, seeds = ["a", "bb", "a", "ccc", "a"], [5, 1, 5, 2, 6]
    full = sample(model, prompts, seeds, g, steps=3)
    alone = sample(model, ["a"], [5], g, steps=3)
    chunked = sample(model, prompts, seeds, g, steps=3, batch_size=2)
    assert torch.equal(full.images[0], full.images[2])  # same (prompt, seed) -> same image
    assert not torch.equal(full.images[0], full.images[4])  # other seed -> other image
    assert torch.allclose(full.images[0], alone.images[0], atol=1e-6)
    assert torch.allclose(full.images, chunked.images, atol=1e-6)
    for a, b in zip(full.trace, chunked.trace, strict=True):
        assert a["guidance_norm"] == pytest.approx(b["guidance_norm"], rel=1e-6)
    assert chunked.forwards == 3 and chunked.unet_rows == 6.0
    again = sample(model, prompts, seeds, g, steps=3)
    assert torch.equal(full.images, again.images)


def test_initial_noise_is_the_cpu_generator_per_seed():
    model = ToyDenoiser()
    x = initial_noise(model, [11, 12])
    assert torch.equal(x[1], torch.randn(1, 4, 4, generator=torch.Generator("cpu").manual_seed(12)))


class Recorder(Guidance):
    """Exercises every hook of the contract and records what the sampler passed."""

    name = "recorder"

    @dataclass
    class Params:
        scale_extra: float = 0.5

    def __init__(self, **params):
        super().__init__(**params)
        self.log: dict = {"steps": []}

    def prepare_prompts(self, prompts, seeds, model):
        return [f"{p} s{s}" for p, s in zip(prompts, seeds, strict=True)]

    def prepare_embeddings(self, emb_c, emb_u, x_T, seeds, model, t0):
        self.log["x_T"] = x_T.clone()
        self.log["t0"] = int(t0)
        return emb_c.map(lambda v: v * 2), emb_u

    def extra_conditions(self, state):
        return {"dup": state.emb_c.map(lambda v: torch.full_like(v, 1.0))}

    def guide(self, state: StepState):
        state.memory["n"] = state.memory.get("n", 0) + 1
        self.log["steps"].append(dict(index=state.index, n=state.memory["n"], u=state.u,
                                      prompts=list(state.prompts), extra=state.extra["dup"].clone(),
                                      x_t=state.x_t.clone(), emb_c=state.emb_c.clone(),
                                      abar=float(state.alpha_bar), s0=state.s0))
        # a guidance may call the model itself: counted in unet_rows and forwards
        again = state.model.eps(state.x_t, state.t, state.emb_c)
        assert torch.allclose(again, state.e_c)
        eps = cfg_combine(state.e_u, state.e_c, state.s0)
        eps = eps - self.params.scale_extra * (state.extra["dup"] - state.e_u)
        return eps, {"flag": state.memory["n"] * torch.ones(state.x_t.shape[0]), "const": 1.5}


def test_guidance_hooks_follow_the_contract():
    model = ToyDenoiser()
    g = Recorder()
    seen = []
    out = sample(model, ["ab", "abcd"], [0, 1], g, steps=2, guidance_scale=2.0,
                 callback=lambda j, state, eps: seen.append((j, tuple(eps.shape))))
    assert out.prompts == ["ab s0", "abcd s1"]
    assert torch.equal(g.log["x_T"], initial_noise(model, [0, 1]))
    assert g.log["t0"] == 500
    s0, s1 = g.log["steps"]
    assert (s0["index"], s0["n"], s1["index"], s1["n"]) == (0, 1, 1, 2)  # memory persists
    assert s0["prompts"] == out.prompts and s0["s0"] == 2.0
    # prepare_embeddings' result is what the step sees; extra eps came from the same forward
    assert torch.allclose(s0["emb_c"].emb, model.encode_prompts(out.prompts) * 2)
    expected_dup = 0.5 * s0["x_t"] + 1.0 * (1 + 500 / 1000)
    assert torch.allclose(s0["extra"], expected_dup)
    assert s0["abar"] == pytest.approx(float(model.make_scheduler().alphas_cumprod[500]))
    # per step: one batched forward with 3B rows + the guidance's own B-row call
    assert model.calls == [6, 2, 6, 2]
    assert out.unet_rows == 8 / 2 * 2 and out.forwards == 4
    assert out.trace[0]["flag"] == [1.0, 1.0] and out.trace[1]["flag"] == [2.0, 2.0]
    assert out.trace[0]["const"] == [1.5, 1.5]
    assert seen == [(0, (2, 1, 4, 4)), (1, (2, 1, 4, 4))]


def test_dpm_scheduler_is_deterministic_and_differs_from_ddim():
    model = ToyDenoiser()
    g = make_guidance("cfg")
    a = sample(model, ["xy"], [4], g, steps=4, scheduler="dpm")
    b = sample(model, ["xy"], [4], g, steps=4, scheduler="dpm")
    c = sample(model, ["xy"], [4], g, steps=4, scheduler="ddim")
    assert torch.equal(a.images, b.images)
    assert not torch.allclose(a.latents, c.latents)
    assert len(a.trace) == 4 and a.scheduler == "dpm"


def test_user_errors():
    model = ToyDenoiser()
    g = make_guidance("cfg")
    with pytest.raises(UserError, match="seeds"):
        sample(model, ["a", "b"], [0], g)
    with pytest.raises(UserError, match="unknown scheduler"):
        sample(model, ["a"], [0], g, scheduler="euler")
    with pytest.raises(UserError, match="steps"):
        sample(model, ["a"], [0], g, steps=0)

    class NeedsIndex(Guidance):
        name = "needs"
        needs_criterion = True

    with pytest.raises(UserError, match="criterion"):
        sample(model, ["a"], [0], NeedsIndex())
