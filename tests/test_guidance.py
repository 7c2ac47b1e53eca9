"""Mitigations (METHODS 3) against hand computations on small tensors with a fake denoiser."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from memaudit.common import UserError
from memaudit.guidance import REGISTRY, StepState, make_guidance
from memaudit.guidance.spec import build_guidance, parse_method_spec, parse_params
from memaudit.models.base import Denoiser
from memaudit.models.cond import Cond, as_cond

B, C, H, W, L, D = 3, 1, 4, 4, 3, 5


class FakeDenoiser(Denoiser):
    """eps(x, t, emb) = 0.5 x + tanh(mean_L(emb) @ P) reshaped: differentiable in x and emb."""

    name = "fake"
    model_hash = "0"
    latent_shape = (C, H, W)
    device = torch.device("cpu")
    is_latent = False
    default_guidance_scale = 2.0

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.P = torch.randn(D, C * H * W, generator=g)

    def encode_prompts(self, prompts):
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            rows.append(torch.randn(L, D, generator=g) if p else torch.zeros(L, D))
        return Cond(emb=torch.stack(rows))

    def _eps(self, x_t, t, cond):
        return 0.5 * x_t + torch.tanh(cond.emb.mean(1) @ self.P).view(-1, C, H, W)

    def decode(self, x0):
        return ((x0 + 1) / 2).expand(-1, 3, -1, -1)

    def make_scheduler(self, kind="ddim"):
        from diffusers import DDIMScheduler

        return DDIMScheduler(num_train_timesteps=1000)

    def random_tokens(self, n, generator):
        vocab = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
        idx = torch.randint(0, len(vocab), (n,), generator=generator)
        return [vocab[int(i)] for i in idx]


def unit(b=B):
    v = torch.zeros(b, C, H, W)
    v[:, 0, 0, 0] = 1.0
    return v


def state(j, n, u, e_u, e_c, s0=7.5, memory=None, model=None, criterion=None, x=None,
          abar=0.5, emb_u=None, extra=None):
    b = e_u.shape[0]
    return StepState(index=j, num_steps=n, t=torch.tensor(int(u * 999)), u=u,
                     x_t=torch.zeros(b, C, H, W) if x is None else x,
                     alpha_bar=torch.tensor(abar), s0=s0, model=model, criterion=criterion,
                     e_u=e_u, e_c=e_c, extra=extra or {}, memory={} if memory is None else memory,
                     emb_u=Cond(emb=torch.zeros(b, L, D)) if emb_u is None else as_cond(emb_u),
                     emb_c=Cond(emb=torch.ones(b, L, D)))


def implied_scale(eps, e_u, e_c):
    """s with eps = e_u + s (e_c - e_u), where e_c - e_u is the unit vector."""
    return (eps - e_u)[:, 0, 0, 0] / (e_c - e_u)[:, 0, 0, 0]


# --- transition-point family (Jain et al. 2025, METHODS 3.1) ----------------------------------

def test_static_scale_before_and_after_tau():
    g = make_guidance("static")
    mem: dict = {}
    e_u = torch.randn(B, C, H, W)
    e_c = e_u + unit()
    scales, steps = [], []
    for j, u in enumerate([0.9, 0.7, 0.51, 0.5, 0.3]):
        eps, tr = g.guide(state(j, 5, u, e_u, e_c, memory=mem))
        scales.append(implied_scale(eps, e_u, e_c))
        steps.append(tr["switch_step"])
    for s, expect in zip(scales, [0, 0, 0, 7.5, 7.5], strict=True):
        assert torch.allclose(s, torch.full((B,), float(expect)))
    assert steps[-1].tolist() == [3, 3, 3]
    assert steps[0].tolist() == [-1, -1, -1]


def test_opposite_static_scale():
    g = make_guidance("opposite")
    mem: dict = {}
    e_u = torch.zeros(B, C, H, W)
    e_c = unit()
    got = [implied_scale(g.guide(state(j, 3, u, e_u, e_c, s0=2.0, memory=mem))[0], e_u, e_c)
           for j, u in enumerate([0.8, 0.66, 0.65])]
    assert torch.allclose(got[0], torch.full((B,), -2.0))
    assert torch.allclose(got[1], torch.full((B,), -2.0))
    assert torch.allclose(got[2], torch.full((B,), 2.0))


def _run_dynamic(name, d_rows, us, **params):
    g = make_guidance(name, **params)
    mem: dict = {}
    b = len(d_rows)
    scales, traces = [], []
    for j, u in enumerate(us):
        e_u = torch.zeros(b, C, H, W)
        e_c = unit(b) * torch.tensor([r[j] for r in d_rows]).view(-1, 1, 1, 1)
        eps, tr = g.guide(state(j, len(us), u, e_u, e_c, s0=3.0, memory=mem))
        scales.append(eps[:, 0, 0, 0] / e_c[:, 0, 0, 0])
        traces.append(tr)
    return torch.stack(scales, 1), traces


def test_dynamic_switches_per_sample_at_the_right_step():
    us = [1 - k / 10 for k in range(10)]  # 1.0 .. 0.1; u <= 0.2 first at j = 8
    d_rows = [
        [5, 4, 3, 4, 2, 1, 1, 1, 1, 1],  # strict minimum at j=2, seen at j=3
        [5, 4, 3, 2, 1, 0.5, 0.4, 0.3, 0.2, 0.1],  # monotone: forced at u <= 0.2 (j=8)
        [5, 4, 4, 5, 3, 2, 3, 3, 3, 3],  # 4,4 is not strict; minimum at j=5 seen at j=6
    ]
    scales, traces = _run_dynamic("dynamic", d_rows, us)
    assert traces[-1]["switch_step"].tolist() == [3, 8, 6]
    expect = torch.tensor([[1.0] * 3 + [3.0] * 7, [1.0] * 8 + [3.0] * 2, [1.0] * 6 + [3.0] * 4])
    assert torch.allclose(scales, expect)
    assert torch.allclose(traces[4]["d"], torch.tensor([2.0, 1.0, 3.0]))


def test_dynamic_min_step_skips_early_dip():
    us = [1 - k / 20 for k in range(20)]
    row = [5, 4, 3, 4, 5, 5, 5, 5, 5, 5, 4, 3, 2, 3, 4, 4, 4, 4, 4, 4]  # dips at 2 and 12
    _, tr = _run_dynamic("dynamic", [row], us)
    assert tr[-1]["switch_step"].tolist() == [3]
    _, tr = _run_dynamic("dynamic", [row], us, min_step=10)
    assert tr[-1]["switch_step"].tolist() == [13]


def test_opposite_dynamic_scale():
    us = [1.0, 0.9, 0.8, 0.7, 0.6]
    scales, tr = _run_dynamic("opposite-dynamic", [[3, 2, 1, 2, 3]], us)
    assert scales[0].tolist() == [-2.0, -2.0, -2.0, 3.0, 3.0]


# --- AMG (Chen et al. 2024, METHODS 3.2) --------------------------------------------------------

class FixedCosine:
    """A cosine criterion returning preset sigma (differentiable through a zero-weight term)."""

    name = "fake-sscd"
    higher_is_more_similar = True
    threshold = 0.5
    calibrated_threshold = None

    def __init__(self, sigma, groups=None):
        self.sigma = torch.tensor(sigma, dtype=torch.float32)
        self.groups = torch.tensor(groups or [7] * len(sigma))
        self.index = self

    def group_caption(self, gid):
        return f"caption of group {gid}"

    def similarity_tensor(self, images):
        return self.sigma + 0.0 * images.flatten(1).sum(1), self.groups


def test_amg_spe_clips_exactly_and_is_gated():
    model = FakeDenoiser()
    sig = [0.2, 0.35, 0.9]
    u = 0.5
    lam = 0.3 + 0.1 * math.exp(-5 * u)
    e_u = torch.zeros(B, C, H, W)
    e_c = unit()
    eps, tr = make_guidance("amg", parts="spe").guide(
        state(0, 10, u, e_u, e_c, model=model, criterion=FixedCosine(sig)))
    assert tr["lambda"] == pytest.approx(lam)
    # s1 = clip(13 sigma, 0, 6.5), only where sigma > lambda (gated)
    assert torch.allclose(tr["s1"], torch.tensor([0.0, 4.55, 6.5]))
    assert torch.allclose(implied_scale(eps, e_u, e_c), torch.tensor([7.5, 7.5 - 4.55, 1.0]))
    _, tr = make_guidance("amg", parts="spe", gate_spe=False).guide(
        state(0, 10, u, e_u, e_c, model=model, criterion=FixedCosine(sig)))
    assert torch.allclose(tr["s1"], torch.tensor([2.6, 4.55, 6.5]))


def test_amg_dup_clips_uses_group_caption_and_stays_on():
    model = FakeDenoiser()
    g = make_guidance("amg", parts="spe,dup")
    mem: dict = {}
    crit = FixedCosine([0.35, 0.1, 0.35], groups=[7, 8, 9])
    x = torch.randn(B, C, H, W)
    e_u = model.eps(x, 0, torch.zeros(B, L, D))
    e_c = e_u + unit()
    st = state(0, 20, 0.5, e_u, e_c, model=model, criterion=crit, memory=mem, x=x)
    assert g.extra_conditions(st) == {}
    rows0 = model.unet_rows
    eps, tr = g.guide(st)
    assert model.unet_rows - rows0 == 2  # the two newly fired rows, evaluated once
    cap = model.encode_prompts(["caption of group 7", "caption of group 9"])
    assert torch.allclose(mem["dup_emb"].emb[[0, 2]], cap.emb)
    e_dup = model.eps(x[[0, 2]], 0, cap)
    # s1 = 4.55, room 1.95, r = 0.35 / 0.3 > 1 -> s2 = 1.95
    assert torch.allclose(tr["s2"], torch.tensor([1.95, 0.0, 1.95]))
    expect = e_u + 7.5 * (e_c - e_u)
    expect[[0, 2]] -= 4.55 * (e_c - e_u)[[0, 2]] + 1.95 * (e_dup - e_u[[0, 2]])
    assert torch.allclose(eps, expect, atol=1e-5)
    # next step: similarity dropped below lambda, Gdup stays on via the batched extra condition
    crit.sigma = torch.tensor([0.15, 0.1, -0.1])
    st = state(1, 20, 0.45, e_u, e_c, model=model, criterion=crit, memory=mem, x=x)
    extra = g.extra_conditions(st)
    assert torch.allclose(extra["amg_dup"].emb[[0, 2]], cap.emb)
    assert torch.equal(extra["amg_dup"].emb[1], st.emb_u.emb[1])
    st.extra = {"amg_dup": model.eps(x, 0, extra["amg_dup"])}
    rows0 = model.unet_rows
    eps, tr = g.guide(st)
    assert model.unet_rows == rows0
    # not fired: s1 = 0, room 6.5, r = 0.15 / 0.3 = 0.5 -> 3.25; r < 0 -> 0
    assert torch.allclose(tr["s2"], torch.tensor([3.25, 0.0, 0.0]))
    assert tr["amg_dup"].tolist() == [1.0, 0.0, 1.0]
    # after dup_steps = 10 steps it is off again
    st = state(10, 20, 0.1, e_u, e_c, model=model, criterion=crit, memory=mem, x=x)
    assert g.extra_conditions(st) == {}


class PixelNL2:
    """A differentiable nL2-like criterion: nL2 = RMSE(img, target) / 0.1, similarity -nL2."""

    name = "fake-nl2"
    higher_is_more_similar = False
    threshold = 1.4
    calibrated_threshold = 1.0

    def __init__(self, target):
        self.target = target
        self.index = self

    def group_caption(self, gid):
        return "x"

    def similarity_tensor(self, images):
        rmse = ((images - self.target) ** 2).flatten(1).mean(1).sqrt()
        return -rmse / 0.1, torch.zeros(images.shape[0], dtype=torch.long)


def test_amg_sim_lowers_similarity_and_nl2_schedule():
    model = FakeDenoiser()
    torch.manual_seed(0)
    target = torch.rand(1, 1, H, W).expand(1, 3, H, W)
    crit = PixelNL2(target)
    abar = torch.tensor(0.6)
    x0 = (target[:, :1] * 2 - 1) + 0.01 * torch.randn(B, C, H, W)  # decodes near target
    e_c = torch.randn(B, C, H, W)
    e_u = e_c.clone()
    x = abar.sqrt() * x0 + (1 - abar).sqrt() * e_c
    g = make_guidance("amg", parts="sim", c3=0.5)
    u = 0.4
    eps, tr = g.guide(state(0, 10, u, e_u, e_c, s0=2.0, model=model, criterion=crit, x=x,
                            abar=float(abar)))
    lam_nl2 = 1.0 * (1.95 - 0.45 * math.exp(-6.25 * u)) / 1.5
    assert tr["lambda"] == pytest.approx(-lam_nl2)
    assert tr["amg_sim"].tolist() == [1.0] * B

    def sigma_of(e):
        return crit.similarity_tensor(model.decode((x - (1 - abar).sqrt() * e) / abar.sqrt()))[0]

    before, after = sigma_of(e_c), sigma_of(eps)
    assert torch.allclose(before, tr["sigma"])
    assert (after < before).all()
    assert torch.allclose(tr["w"], before - (-lam_nl2))


def test_amg_part_spec_and_errors():
    assert parse_method_spec("amg:spe,dup") == ("amg", {"parts": "spe,dup"})
    g = build_guidance("amg:sim", parse_params(["amg.c3=50"]))
    assert g.parts == {"sim"} and g.params.c3 == 50.0
    with pytest.raises(UserError, match="known: dup, sim, spe|known: spe, dup, sim"):
        make_guidance("amg", parts="spe,foo")
    with pytest.raises(UserError, match="unknown parameter 'c9' for method 'amg'; known: "):
        parse_params(["amg.c9=1"])
    with pytest.raises(UserError, match="unknown method 'nope'; known: amg, auto, cfg, cwr"):
        parse_params(["nope.c3=1"])
    with pytest.raises(UserError, match="takes no ':'"):
        parse_method_spec("dynamic:3")
    assert parse_params(["amg.gate_spe=false", "dynamic.min_step=10", "wen.target=3"]) == {
        "amg": {"gate_spe": False}, "dynamic": {"min_step": 10}, "wen": {"target": 3.0}}
    assert set(REGISTRY) >= {"cfg", "static", "dynamic", "opposite", "opposite-dynamic", "amg",
                             "rna", "rta", "cwr", "gni", "wen"}


# --- prompt perturbations (Somepalli et al. 2023, METHODS 3.3) -----------------------------------

PROMPT = "a photo of the canary on a branch"


@pytest.mark.parametrize("name", ["rna", "rta", "cwr"])
def test_perturbations_reproducible_and_insert_exactly_n(name):
    model = FakeDenoiser()
    g = make_guidance(name)
    a = g.prepare_prompts([PROMPT, PROMPT, PROMPT], [1, 2, 1], model)
    assert a == g.prepare_prompts([PROMPT, PROMPT, PROMPT], [1, 2, 1], model)
    assert a[0] == a[2] and a[0] != a[1]
    base = PROMPT.split()
    for p in a:
        words = p.split()
        assert len(words) == len(base) + 4
        added = list(words)
        for w in base:  # the original words remain, in order
            added.remove(w)
        if name == "rna":
            assert all(w.isdigit() and 0 <= int(w) < 100000 for w in added)
        elif name == "rta":
            assert all(w in {"alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"}
                       for w in added)
        else:
            assert all(w in base for w in added)
    assert len(make_guidance(name, n=2).prepare_prompts([PROMPT], [5], model)[0].split()) == 10


def test_gni_noise_scale_and_reproducible():
    from memaudit.guidance.perturb import row_torch_generator

    emb_c, emb_u = Cond(emb=torch.randn(2, L, D)), Cond(emb=torch.zeros(2, L, D))
    g = make_guidance("gni")
    c1, u1 = g.prepare_embeddings(emb_c, emb_u, torch.zeros(2, C, H, W), [3, 4], None,
                                  torch.tensor(999))
    gen = row_torch_generator(3, 4)
    nc, nu = torch.randn(L, D, generator=gen), torch.randn(L, D, generator=gen)
    assert torch.allclose(c1.emb[0], emb_c.emb[0] + 0.1 * nc)
    assert torch.allclose(u1.emb[0], 0.1 * nu)
    c2, _ = g.prepare_embeddings(emb_c, emb_u, torch.zeros(2, C, H, W), [3, 4], None,
                                 torch.tensor(999))
    assert torch.equal(c1.emb, c2.emb)
    big = make_guidance("gni", lam=0.1).prepare_embeddings(
        Cond(emb=torch.zeros(64, 16, 16)), Cond(emb=torch.zeros(64, 16, 16)),
        torch.zeros(64, 1), list(range(64)), None, torch.tensor(0))[0]
    assert big.emb.std().item() == pytest.approx(0.1, rel=0.05)


def test_gni_perturbs_every_text_tensor_and_only_those():
    """A family with a pooled embedding and time ids (SDXL's shape): pooled gets noise too,
    the ids are passed through; the states' noise is what a states-only model would get."""
    from memaudit.guidance.perturb import row_torch_generator

    ids = torch.arange(12.0).view(2, 6)
    emb_c = Cond(emb=torch.randn(2, L, D), pooled=torch.randn(2, 5), time_ids=ids)
    emb_u = Cond(emb=torch.zeros(2, L, D), pooled=torch.zeros(2, 5), time_ids=ids)
    c, u = make_guidance("gni").prepare_embeddings(emb_c, emb_u, torch.zeros(2, C, H, W),
                                                   [3, 4], None, torch.tensor(999))
    gen = row_torch_generator(3, 4)
    n_emb, n_pool = torch.randn(L, D, generator=gen), torch.randn(5, generator=gen)
    assert torch.allclose(c.emb[0], emb_c.emb[0] + 0.1 * n_emb)
    assert torch.allclose(c.pooled[0], emb_c.pooled[0] + 0.1 * n_pool)
    assert torch.equal(c.time_ids, ids) and torch.equal(u.time_ids, ids)


# --- Wen et al. 2024 embedding adjustment (METHODS 3.4) ----------------------------------------

def test_wen_loss_decreases_and_stops_at_target():
    model = FakeDenoiser()
    x_T = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(1))
    emb_c = model.encode_prompts(["a canary", "a branch"])
    emb_u = model.null_embedding(2)
    t0 = torch.tensor(999)
    g = make_guidance("wen")
    rows0 = model.unet_rows
    e, eu = g.prepare_embeddings(emb_c, emb_u, x_T, [0, 1], model, t0)
    info = g.last
    assert torch.equal(eu.emb, emb_u.emb)
    assert torch.equal(e.emb[:, 0], emb_c.emb[:, 0])  # first token frozen
    assert (info["wen_loss"] < info["wen_loss0"]).all()
    assert (info["wen_iters"] <= 10).all()
    loss = (model.eps(x_T, t0, e) - model.eps(x_T, t0, emb_u)).flatten(1).norm(dim=1)
    assert torch.allclose(loss, info["wen_loss"], atol=1e-5)
    reached = info["wen_reached"].bool()
    assert (info["wen_loss"][reached] <= 0.5 * info["wen_loss0"][reached] + 1e-6).all()
    # it stops as soon as the target is met: one iteration less does not meet it
    for i in range(2):
        if reached[i] and info["wen_iters"][i] > 0:
            g2 = make_guidance("wen", max_iters=int(info["wen_iters"][i]) - 1)
            g2.prepare_embeddings(emb_c[i:i + 1], emb_u[i:i + 1], x_T[i:i + 1], [i], model, t0)
            assert g2.last["wen_loss"][0] > 0.5 * info["wen_loss0"][i]
    assert model.unet_rows - rows0 >= 2 * 2
    # an absolute target above the initial loss stops at once with no change
    g3 = make_guidance("wen", target=1e9)
    e3, _ = g3.prepare_embeddings(emb_c, emb_u, x_T, [0, 1], model, t0)
    assert torch.equal(e3.emb, emb_c.emb) and g3.last["wen_iters"].tolist() == [0, 0]


def test_amg_c3_default_is_the_criterions():
    """METHODS 3.2 / issue 11: c3 unset means 3000 for nL2 (tuned on the canary,
    docs/mitigations.md) and 100 for cosine criteria (the official SSCD value)."""
    model = FakeDenoiser()
    torch.manual_seed(0)
    target = torch.rand(1, 1, H, W).expand(1, 3, H, W)
    crit = PixelNL2(target)
    abar = torch.tensor(0.6)
    x0 = (target[:, :1] * 2 - 1) + 0.01 * torch.randn(B, C, H, W)
    e_c = torch.randn(B, C, H, W)
    x = abar.sqrt() * x0 + (1 - abar).sqrt() * e_c

    def step(**params):
        g = make_guidance("amg", parts="sim", **params)
        return g, g.guide(state(0, 10, 0.4, e_c.clone(), e_c, s0=2.0, model=model,
                                criterion=crit, x=x, abar=float(abar)))[0]

    g, default = step()
    assert g.params.c3 is None and g.c3(crit) == 3000.0
    assert torch.equal(default, step(c3=3000.0)[1])
    assert not torch.allclose(default, step(c3=100.0)[1])

    class Cosine:
        higher_is_more_similar = True

    assert g.c3(Cosine()) == 100.0 and make_guidance("amg", c3=7).c3(Cosine()) == 7.0
    assert build_guidance("amg", parse_params(["amg.c3=none"])).params.c3 is None
