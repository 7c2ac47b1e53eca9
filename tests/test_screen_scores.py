"""Screening scores beyond Wen (METHODS 2.1) against hand computations: anisotropy on a fake
with timestep-dependent predictions, attention entropy on the tiny Stable Diffusion UNet read
by hand from its own layers, the registry, costs, model-calibrated parameters, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from test_guidance import FakeDenoiser

from memaudit.cli import main
from memaudit.common import UserError
from memaudit.models.cond import Cond
from memaudit.screen import (
    DEFAULT_SCORE,
    REGISTRY,
    initial_noise,
    make_score,
    score_for,
    screen_prompts,
)
from memaudit.screen.attention import capture_cross_attention, cross_attention_layers

C, H, W = 2, 3, 3


class TFake(FakeDenoiser):
    """eps = (1 + t/1000) tanh(x) + (2 - t/1000) tanh(txt): 2 channels, t matters."""

    name = "tfake"
    latent_shape = (C, H, W)
    default_guidance_scale = 3.0
    default_steps = 10

    def __init__(self) -> None:
        super().__init__()
        self.P = torch.randn(self.P.shape[0], C * H * W,
                             generator=torch.Generator().manual_seed(1))

    def _eps(self, x_t, t, cond):
        s = (t.float() / 1000).view(-1, 1, 1, 1)
        txt = torch.tanh(cond.emb.mean(1) @ self.P).view(-1, C, H, W)
        return (1 + s) * torch.tanh(x_t) + (2 - s) * txt

    def decode(self, x0):
        return x0[:, :1].expand(-1, 3, -1, -1)

    def make_scheduler(self, kind="ddim"):
        return DDIMScheduler(num_train_timesteps=1000)


def hand_anisotropy(model, prompt, seeds, g1, g2, low_index, flow=False):
    """flow: the norm term is the noise prediction's, (1 - sigma) ||v_c - v_u|| (METHODS 0)."""
    vals = []
    for s in seeds:
        sched = model.make_scheduler()
        sched.set_timesteps(model.default_steps)
        x = initial_noise(model, [s])
        t_hi, t_lo = sched.timesteps[0], sched.timesteps[low_index]
        c, u = model.encode_prompts([prompt]), model.encode_prompts([""])
        n = torch.linalg.vector_norm(model._eps(x, t_hi.expand(1), c)
                                     - model._eps(x, t_hi.expand(1), u))
        lu, lc = model._eps(x, t_lo.expand(1), u), model._eps(x, t_lo.expand(1), c)
        cos = []
        for i in range(H):
            for j in range(W):
                a, b = lu[0, :, i, j], (lc - lu)[0, :, i, j]
                cos.append(float(a @ b / (a.norm() * b.norm())))
        if flow:
            n = n * max(1 - float(t_hi) / 1000, 1 / 1000)
        vals.append(g1 * float(n) + g2 * np.mean(cos))
    return float(np.mean(vals))


def test_anisotropy_matches_hand_computation_in_one_forward_of_four_rows():
    model = TFake()
    prompts = ["a canary", "the sky"]
    got = screen_prompts(model, prompts, seeds=3, batch_size=4, score="anisotropy",
                         params={"g1": 1.0, "g2": 2.0})
    for p, v in zip(prompts, got, strict=True):
        assert v == pytest.approx(hand_anisotropy(model, p, range(3), 1.0, 2.0, -3), rel=1e-5)
    assert model.unet_rows == 4 * 2 * 3  # 4 rows per (prompt, seed)
    assert model.forward_calls == 2  # one batched forward per chunk (6 rows in 2 chunks)
    other = screen_prompts(TFake(), prompts, seeds=3, score="anisotropy",
                           params={"g1": 0.5, "g2": -1.0, "low_index": 5})
    for p, v in zip(prompts, other, strict=True):
        assert v == pytest.approx(hand_anisotropy(model, p, range(3), 0.5, -1.0, 5), rel=1e-5)


def test_anisotropy_norm_term_on_flow_is_the_noise_prediction_magnitude():
    """On a flow model N = (1 - sigma_T) ||v_c - v_u|| (t_T = 900 here: factor 0.1); the
    cosine stays on the velocity, and the note says so."""
    from memaudit.models.prediction import FlowPrediction

    model = TFake()
    model.prediction = FlowPrediction(1000)
    prompts = ["a canary", "the sky"]
    score = make_score("anisotropy", g1=1.0, g2=2.0)
    got = screen_prompts(model, prompts, seeds=2, score=score)
    for p, v in zip(prompts, got, strict=True):
        assert v == pytest.approx(hand_anisotropy(model, p, range(2), 1.0, 2.0, -3, flow=True),
                                  rel=1e-5)
        assert v != pytest.approx(hand_anisotropy(model, p, range(2), 1.0, 2.0, -3), rel=1e-2)
    assert "cosine on velocity" in score.notes()[0]


def test_anisotropy_terms_are_the_norm_and_the_per_pixel_channel_cosine():
    from memaudit.screen.base import ScoreInput

    model = TFake()
    sched = model.make_scheduler()
    sched.set_timesteps(10)
    x = initial_noise(model, [0, 1])
    inp = ScoreInput(model, x, model.encode_prompts(["a", "b"]), model.null_embedding(2), sched,
                     1, 3.0)
    n, a = make_score("anisotropy").terms(inp)
    e = model._eps(torch.cat([x, x]), sched.timesteps[-3].expand(4),
                   Cond.cat([model.null_embedding(2), model.encode_prompts(["a", "b"])]))
    lu, lc = e.chunk(2)
    assert torch.allclose(a, F.cosine_similarity(lu, lc - lu, dim=1).mean((1, 2)).double())
    assert (a.abs() <= 1).all() and (n > 0).all()


def hand_entropies(model, prompt, seed):
    """Per cross-attention layer: (the entropy of, and) the attention averaged over heads and
    queries, computed from each layer's inputs (caught by forward pre-hooks) and its own weights."""
    seen = []
    layers = cross_attention_layers(model.unet)
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((mod, args[0] if args else kwargs["hidden_states"],
                                               kwargs["encoder_hidden_states"])),
        with_kwargs=True) for m in layers.values()]
    try:
        sched = model.make_scheduler()
        sched.set_timesteps(model.default_steps)
        x = initial_noise(model, [seed])
        model.eps(x, sched.timesteps[0], model.encode_prompts([prompt]))
    finally:
        for h in hooks:
            h.remove()
    out = []
    for attn, h, ctx in seen:
        q, k = attn.to_q(h), attn.to_k(ctx)
        heads, d = attn.heads, k.shape[-1] // attn.heads
        q = q.view(1, -1, heads, d).transpose(1, 2)
        k = k.view(1, -1, heads, d).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1).mean((1, 2))[0].double()
        out.append((float(-(p * p.log()).sum()), p.numpy()))
    return out


def test_attention_entropy_matches_hand_computation_on_the_tiny_sd_unet(model):
    layers = cross_attention_layers(model.attention_model())
    assert len(layers) >= 2
    prompts = ["a photo of the cat", "a red car"]
    every = screen_prompts(model, prompts, seeds=2, score="attention-entropy",
                           params={"aggregate": "mean"})
    first = screen_prompts(model, prompts, seeds=2, score="attention-entropy",
                           params={"layer": 1})
    pooled = screen_prompts(model, prompts, seeds=2, score="attention-entropy",
                            params={"aggregate": "all"})
    for i, p in enumerate(prompts):
        hand = [hand_entropies(model, p, s) for s in (0, 1)]
        assert len(hand[0]) == len(layers)
        assert every[i] == pytest.approx(np.mean([h for h, _ in sum(hand, [])]), rel=1e-5)
        assert first[i] == pytest.approx(np.mean([h[1][0] for h in hand]), rel=1e-5)
        pool = [np.mean([q for _, q in h], axis=0) for h in hand]  # layer-averaged attention
        assert pooled[i] == pytest.approx(np.mean([-(q * np.log(q)).sum() for q in pool]),
                                          rel=1e-5)
    assert 0 < every.min() and every.max() <= np.log(model.tokenizer.model_max_length) + 1e-9


def test_attention_entropy_aggregates_on_exact_small_tensors():
    """Two layers, B = 1, 2 heads, 1 query, 2 tokens: per-layer head means p_0 = (0.5, 0.5),
    p_1 = (0.9, 0.1); official layer mode = H(p_l); official all-layer aggregate = H of the
    layer mean (0.7, 0.3); memaudit's own 'mean' = (H(p_0) + H(p_1)) / 2."""
    from memaudit.screen.attention_entropy import aggregate_entropy

    l0 = torch.tensor([[[[0.2, 0.8]], [[0.8, 0.2]]]])  # [1, heads 2, L_q 1, L_k 2]
    l1 = torch.tensor([[[[1.0, 0.0]], [[0.8, 0.2]]]])
    h = lambda *p: -sum(v * np.log(v) for v in p if v > 0)  # noqa: E731
    assert float(aggregate_entropy([l0, l1], "layer", 0)[0]) == pytest.approx(np.log(2))
    assert float(aggregate_entropy([l0, l1], "layer", 1)[0]) == pytest.approx(h(0.9, 0.1))
    assert float(aggregate_entropy([l0, l1], "all", 0)[0]) == pytest.approx(h(0.7, 0.3))
    assert float(aggregate_entropy([l0, l1], "mean", 0)[0]) == pytest.approx(
        (np.log(2) + h(0.9, 0.1)) / 2)
    # higher entropy scores as memorized: the score is the entropy itself, not its negative
    assert make_score("attention-entropy", aggregate="mean").notes()[0].startswith(
        "attention-entropy aggregate 'mean' (mean of per-layer entropies) is memaudit's own")
    assert make_score("attention-entropy").notes() == []
    with pytest.raises(UserError, match="aggregate must be one of layer, all, mean"):
        make_score("attention-entropy", aggregate="max")
    from memaudit.cli.screen import parse_score_params

    assert parse_score_params("attention-entropy", ["aggregate=all", "layer=2"]) == {
        "aggregate": "all", "layer": 2}


def test_capturing_attention_leaves_the_forward_unchanged_and_restores_processors(model):
    unet = model.attention_model()
    before = {n: type(m.processor) for n, m in cross_attention_layers(unet).items()}
    x = initial_noise(model, [3])
    cond = model.encode_prompts(["a blue hippo"])
    plain = model.eps(x, 500, cond)
    with capture_cross_attention(unet) as seen:
        caught = model.eps(x, 500, cond)
    assert torch.equal(plain, caught)
    assert len(seen) == len(before)
    assert all(torch.allclose(p.sum(-1), torch.ones(())) for _, p in seen)
    assert {n: type(m.processor) for n, m in cross_attention_layers(unet).items()} == before


def test_attention_entropy_refuses_models_without_cross_attention_and_bad_layers(model):
    with pytest.raises(UserError, match="^screening score 'attention-entropy' needs "
                                        "cross-attention; fake has none$"):
        screen_prompts(FakeDenoiser(), ["a"], seeds=1, score="attention-entropy")
    with pytest.raises(UserError, match="out of range"):
        screen_prompts(model, ["a"], seeds=1, score="attention-entropy", params={"layer": 99})


def test_registry_costs_and_errors():
    assert set(REGISTRY) == {"wen", "anisotropy", "attention-entropy", "update-norm"}
    assert DEFAULT_SCORE in REGISTRY
    for name, fwd, rows in (("wen", 1, 2), ("anisotropy", 1, 4), ("attention-entropy", 1, 1),
                            ("update-norm", 1, 2)):
        sc = make_score(name)
        assert (sc.forwards(1), sc.rows(1)) == (fwd, rows)
    assert make_score("wen").forwards(5) == 5
    with pytest.raises(UserError, match="unknown screening score 'nope'; known: wen, "):
        make_score("nope")
    with pytest.raises(UserError,
                       match=r"unknown parameter\(s\) g9 for screening score 'anisotropy'"):
        make_score("anisotropy", g9=1)
    with pytest.raises(UserError, match="evaluated at x_T only: --steps must be 1"):
        screen_prompts(TFake(), ["a"], steps=2, seeds=1, score="anisotropy")


def test_wen_cost_is_what_it_declares():
    model = TFake()
    screen_prompts(model, ["a", "b", "c"], steps=3, seeds=2, batch_size=6, score="wen")
    sc = make_score("wen")
    assert model.forward_calls == sc.forwards(3) and model.unet_rows == sc.rows(3) * 3 * 2


def test_model_calibrated_parameters_are_used_and_explicit_ones_win():
    model = TFake()
    model.screen_params = {"anisotropy": {"g2": 0.25}}
    assert score_for(model, "anisotropy").params.g2 == 0.25
    assert score_for(model, "anisotropy", {"g2": 1.0}).params.g2 == 1.0
    got = screen_prompts(model, ["a canary"], seeds=2, score="anisotropy")
    assert got[0] == pytest.approx(hand_anisotropy(model, "a canary", range(2), 1.0, 0.25, -3),
                                   rel=1e-5)


def test_screen_cli_takes_a_score_and_its_parameters(tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq

    import memaudit.models.base as base

    monkeypatch.setattr(base, "load_model", lambda spec, device=None: TFake())
    p = tmp_path / "p.txt"
    p.write_text("a canary\nthe sky\n")
    out = tmp_path / "s.parquet"
    main(["screen", "--model", "x", "--prompts", str(p), "--score", "anisotropy",
          "--param", "g2=0.5", "--seeds", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert "score anisotropy (g1=1, g2=0.5, low_index=-3), 2 seeds" in text
    assert ("anisotropy weights (g1, g2) = (1, 0.5): g2 given; the other from: fallback: SD "
            "1.x's official weights, not tuned for unknown models; cosine on eps") in text
    t = pq.read_table(out).to_pylist()
    assert [r["score_name"] for r in t] == ["anisotropy", "anisotropy"]
    expect = [hand_anisotropy(TFake(), q, range(2), 1.0, 0.5, -3) for q in ("a canary",
                                                                          "the sky")]
    np.testing.assert_allclose([r["score"] for r in t], expect, rtol=1e-5)
    with pytest.raises(SystemExit) as e:
        main(["screen", "--model", "x", "--prompts", str(p), "--score", "anisotropy",
              "--param", "g7=1"])
    assert e.value.code == 2
    assert "bad --param 'g7=1' for score 'anisotropy'" in capsys.readouterr().err


def test_models_carry_their_calibrated_screening_parameters(model):
    from memaudit.models.canary import CANARY_SCREEN_PARAMS

    assert model.screen_params == {}  # SD 1.x: the family weights (screen/anisotropy.py)
    assert CANARY_SCREEN_PARAMS["anisotropy"]["g2"] > 0
    assert FakeDenoiser().screen_params == {}


def test_plan_screen_table_names_its_score_and_checks_it(tmp_path):
    from memaudit.audit.plan import plan_from_dict

    (tmp_path / "p.txt").write_text("a\n")
    (tmp_path / "i").mkdir()
    base = {"out": "o", "model": "canary", "index": "i", "prompts": "p.txt"}
    plan = plan_from_dict({**base, "screen": {"seeds": 2}}, tmp_path)
    assert plan.screen.score == DEFAULT_SCORE  # recorded by name: a later default change
    plan = plan_from_dict({**base, "screen": {"score": "anisotropy",  # cannot resume it
                                              "params": {"g2": 0.5}}}, tmp_path)
    assert (plan.screen.score, plan.screen.params) == ("anisotropy", {"g2": 0.5})
    with pytest.raises(UserError, match="unknown screening score 'nope'"):
        plan_from_dict({**base, "screen": {"score": "nope"}}, tmp_path)
    with pytest.raises(UserError, match="unknown parameter"):
        plan_from_dict({**base, "screen": {"score": "wen", "params": {"g2": 1}}}, tmp_path)


def test_gate_screen_uses_the_named_score(tmp_path, monkeypatch):
    import memaudit.models as models
    from memaudit.gate import gate_screen

    monkeypatch.setattr(models, "load_model", lambda spec, device=None: TFake())
    (tmp_path / "p.txt").write_text("a canary\nthe sky\n")
    expect = screen_prompts(TFake(), ["a canary", "the sky"], seeds=2, score="anisotropy")
    res = gate_screen("x", tmp_path / "p.txt", max_screen_score=float(expect.min()), seeds=2,
                      score="anisotropy")
    check = res.checks[0]
    assert check.value == pytest.approx(expect.max()) and not check.passed
    assert "score anisotropy" in check.detail


def official_anisotropy_v(model, prompt, seed, g1, g2):
    """A transcription of the official SD 2 (v-prediction) detection branch
    (rohanasthana/memorization-anisotropy, local_model/pipe.py, exp_type 'det', mode 'x,c|x',
    normalization None): N on the 'score' (beta v - x) / beta_prod^2, the cosine on raw v."""
    sched = model.make_scheduler()
    sched.set_timesteps(model.default_steps)
    timesteps = sched.timesteps
    latents = initial_noise(model, [seed])
    emb = torch.cat([model.null_embedding(1).emb, model.encode_prompts([prompt]).emb])
    t, t_cos = timesteps[0], timesteps[-3]
    inp = sched.scale_model_input(torch.cat([latents] * 2), t)
    inp_cos = sched.scale_model_input(inp, t_cos)
    with torch.no_grad():
        pred = model.unet(inp, t, encoder_hidden_states=emb).sample
        pred_cos = model.unet(inp_cos, t_cos, encoder_hidden_states=emb).sample
    beta_prod = torch.sqrt(1 - sched.alphas_cumprod[t])
    beta = torch.sqrt(sched.alphas_cumprod[t])
    score_uc, score_c = ((beta * pred - inp) / (beta_prod ** 2)).chunk(2)
    hvp = torch.norm((score_c - score_uc).view(1, -1), dim=1)
    uc, c = pred_cos.chunk(2)
    cos = F.cosine_similarity(uc, c - uc, dim=1)
    return float(hvp[0]), float(cos[0].mean()), float(sched.alphas_cumprod[t])


def test_anisotropy_on_v_prediction_takes_the_cosine_on_raw_v_as_the_official_code(tmp_path):
    from sd_tiny import build_tiny_pipeline

    from memaudit.models import load_model
    from memaudit.screen.base import ScoreInput

    v = load_model(build_tiny_pipeline(tmp_path / "v-sd", prediction_type="v_prediction"),
                   device="cpu")
    prompts = ["a photo of the cat", "a red car"]
    for seed in (0, 1):
        sched = v.scheduler(None, v.default_steps)
        x = initial_noise(v, [seed, seed])
        inp = ScoreInput(v, x, v.encode_prompts(prompts), v.null_embedding(2), sched, 1, 7.5)
        n, a = make_score("anisotropy").terms(inp)
        for i, p in enumerate(prompts):
            n_off, a_off, abar_T = official_anisotropy_v(v, p, seed, 1.0, 0.1)
            assert float(a[i]) == pytest.approx(a_off, rel=1e-4, abs=1e-6)
            # N stays an eps magnitude (METHODS 0): the official 'score' norm x (1 - abar_T)
            assert float(n[i]) == pytest.approx(n_off * (1 - abar_T), rel=1e-4)
    sc = score_for(v, "anisotropy")  # the official SD 2 weights for a v-prediction SD
    assert (sc.params.g1, sc.params.g2) == (1.0, 0.1)
    assert "official SD 2.x" in sc.notes()[0] and "cosine on v" in sc.notes()[0]
    got = screen_prompts(v, prompts[:1], seeds=1, score="anisotropy")
    n_off, a_off, abar_T = official_anisotropy_v(v, prompts[0], 0, 1.0, 0.1)
    assert got[0] == pytest.approx(n_off * (1 - abar_T) + 0.1 * a_off, rel=1e-4)


def test_anisotropy_weights_per_family_are_stated(model):
    from memaudit.screen.anisotropy import family_weights

    sd = score_for(model, "anisotropy")
    assert (sd.params.g1, sd.params.g2) == (1.0, 2.0)
    assert sd.notes() == ["anisotropy weights (g1, g2) = (1, 2): official SD 1.x weights "
                          "(detect_eval.py sd_ver 1); cosine on eps"]
    for family in ("sdxl", "sd3", "flux"):
        fake = TFake()
        fake.family = family
        g1, g2, why = family_weights(fake)
        assert (g1, g2) == (1.0, 2.0)
        assert why == f"fallback: SD 1.x's official weights, not tuned for {family} models"
        assert "fallback" in score_for(fake, "anisotropy").notes()[0]
    given = score_for(TFake(), "anisotropy", {"g1": 1.0, "g2": 0.3})
    assert given.notes()[0].startswith("anisotropy weights (g1, g2) = (1, 0.3): given")
    rec = given.record()
    assert rec["score"] == "anisotropy" and rec["params"]["g2"] == 0.3
    assert rec["paper"] == "Asthana & Belagiannis, ICLR 2026"
    assert make_score("wen").record()["paper"] == "Wen et al., ICLR 2024"
    assert rec["notes"] == given.notes()
    assert make_score("wen").notes() == []


def test_update_norm_is_the_mean_size_of_the_first_cfg_updates():
    """Broken Memories' latent update norms on the first steps: ||x_{j+1} - x_j|| along the
    CFG trajectory (DDIM here), by hand, and no pass beyond Wen's."""
    model = TFake()
    got = screen_prompts(model, ["a canary", "the sky"], steps=3, seeds=2, batch_size=4,
                         score="update-norm")
    assert model.forward_calls == 3 and model.unet_rows == 2 * 3 * 2 * 2
    for i, p in enumerate(["a canary", "the sky"]):
        vals = []
        for s in (0, 1):
            sched = model.make_scheduler()
            sched.set_timesteps(model.default_steps)
            x = initial_noise(model, [s])
            c, u = model.encode_prompts([p]), model.encode_prompts([""])
            norms = []
            for t in sched.timesteps[:3]:
                tt = t.expand(1)
                e_u, e_c = model._eps(x, tt, u), model._eps(x, tt, c)
                eps = e_u + 3.0 * (e_c - e_u)
                abar = sched.alphas_cumprod[t]
                prev = t - 1000 // model.default_steps
                abar_p = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
                x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)  # clip_sample
                nxt = abar_p.sqrt() * x0 + (1 - abar_p).sqrt() * eps
                norms.append(float(torch.linalg.vector_norm(nxt - x)))
                x = nxt
            vals.append(np.mean(norms))
        assert got[i] == pytest.approx(np.mean(vals), rel=1e-4)
