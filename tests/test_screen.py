"""Screening (Wen et al. 2024, METHODS 2): scores vs a hand computation, the statistics on hand
examples, and the CLI end to end with a fake model."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDIMScheduler
from test_guidance import FakeDenoiser

from memaudit.cli import main
from memaudit.common import UserError
from memaudit.screen import auc, calibrate_threshold, initial_noise, screen_prompts, tpr_at_fpr


class SchedFake(FakeDenoiser):
    default_steps = 10

    def make_scheduler(self, kind="ddim"):
        return DDIMScheduler(num_train_timesteps=1000)


def hand_scores(model, prompts, steps, seeds, s0):
    out = []
    for p in prompts:
        vals = []
        for s in seeds:
            sched = model.make_scheduler()
            sched.set_timesteps(model.default_steps)
            x = initial_noise(model, [s])
            for t in sched.timesteps[:steps]:
                e_u = model._eps(x, t.expand(1), model.null_embedding(1))
                e_c = model._eps(x, t.expand(1), model.encode_prompts([p]))
                vals.append(float(torch.linalg.vector_norm(e_c - e_u)))
                x = sched.step(e_u + s0 * (e_c - e_u), t, x).prev_sample
        out.append(np.mean(vals))
    return np.array(out)


def test_screen_one_step_matches_hand_computation_and_counts_rows():
    model = SchedFake()
    prompts = ["a canary", "a branch", "the sky"]
    got = screen_prompts(model, prompts, steps=1, seeds=4, batch_size=5, score="wen")
    assert model.unet_rows == 2 * 3 * 4  # one batched call of 2 rows per (prompt, seed)
    np.testing.assert_allclose(got, hand_scores(model, prompts, 1, range(4), 2.0), rtol=1e-5)
    assert np.all(np.diff(got) != 0)


def test_screen_follows_cfg_trajectory_for_more_steps():
    model = SchedFake()
    prompts = ["a canary", "a branch"]
    got = screen_prompts(model, prompts, steps=3, seeds=[7, 9], guidance_scale=3.0,
                         score="wen")
    np.testing.assert_allclose(got, hand_scores(model, prompts, 3, [7, 9], 3.0), rtol=1e-5)
    with pytest.raises(UserError):
        screen_prompts(model, prompts, steps=11, score="wen")


def test_calibrate_threshold_auc_tpr_hand_examples():
    clean = np.arange(1, 101, dtype=float)
    assert calibrate_threshold(clean, 0.01) == 99.0  # exactly 1 of 100 above
    assert calibrate_threshold(clean, 0.0) == 100.0
    assert calibrate_threshold(clean, 0.05) == 95.0
    assert calibrate_threshold([5, 5, 5, 1], 0.25) == 5.0  # ties: none strictly above
    assert auc([3, 2], [1, 2]) == pytest.approx(3.5 / 4)
    assert auc([1, 1], [1, 1, 1]) == 0.5
    assert auc([2, 3], [0, 1]) == 1.0 and auc([0], [1]) == 0.0
    rng = np.random.default_rng(0)
    p, n = rng.integers(0, 5, 40), rng.integers(0, 5, 30)
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in p for b in n])
    assert auc(p, n) == pytest.approx(brute)
    assert tpr_at_fpr([99, 99.5, 100, 101], clean, 0.01) == 0.75
    with pytest.raises(UserError):
        auc([], [1])


def test_screen_cli_prints_flags_auc_and_writes_parquet(tmp_path, monkeypatch, capsys):
    import memaudit.models.base as base

    monkeypatch.setattr(base, "load_model", lambda spec, device=None: SchedFake())
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,label\na canary,memorized\na branch,clean\nthe sky,clean\n")
    clean = tmp_path / "clean.txt"
    clean.write_text("a branch\nthe sky\na cloud\n")
    out = tmp_path / "s.parquet"
    main(["screen", "--model", "x", "--prompts", str(prompts), "--calibrate", str(clean),
          "--fpr", "0.0", "--out", str(out), "--seeds", "2"])
    text = capsys.readouterr().out
    expect = screen_prompts(SchedFake(), ["a canary", "a branch", "the sky"], seeds=2)
    thr = calibrate_threshold(screen_prompts(SchedFake(), ["a branch", "the sky", "a cloud"],
                                             seeds=2), 0.0)
    assert f"threshold {thr:.4f}" in text
    assert "labels: 1 memorized, 2 clean; AUC" in text
    t = pq.read_table(out).to_pylist()
    assert [r["prompt"] for r in t] == ["a canary", "a branch", "the sky"]
    np.testing.assert_allclose([r["score"] for r in t], expect)
    assert [r["flagged"] for r in t] == [bool(s > thr) for s in expect]
    assert t[1]["flagged"] is False  # a clean calibration prompt is never above FPR-0 threshold


def test_screen_cli_user_errors(tmp_path, monkeypatch, capsys):
    import memaudit.models.base as base

    monkeypatch.setattr(base, "load_model", lambda spec, device=None: SchedFake())
    p = tmp_path / "p.txt"
    p.write_text("a canary\n")
    with pytest.raises(SystemExit) as e:
        main(["screen", "--model", "x", "--prompts", str(p), "--steps", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --steps must be >= 1"


def test_screen_equals_the_samplers_cfg_trajectory():
    from memaudit.guidance import make_guidance
    from memaudit.sampler import sample

    model = SchedFake()
    norms: list[torch.Tensor] = []
    sample(model, ["a canary", "a canary"], [3, 5], make_guidance("cfg"), steps=10,
           callback=lambda j, st, eps: norms.append((st.e_c - st.e_u).flatten(1).norm(dim=1)))
    expect = torch.stack(norms[:4]).mean().item()
    got = screen_prompts(SchedFake(), ["a canary"], steps=4, seeds=[3, 5], score="wen")
    assert got[0] == pytest.approx(expect, rel=1e-5)


def test_screen_cli_label_sets(tmp_path, monkeypatch, capsys):
    import memaudit.models.base as base

    monkeypatch.setattr(base, "load_model", lambda spec, device=None: SchedFake())
    p = tmp_path / "prompts.csv"
    p.write_text("prompt,label\na canary,64x\na branch,16x\nthe sky,1x\na cloud,generic\n")
    main(["screen", "--model", "x", "--prompts", str(p), "--seeds", "1",
          "--positive", "64x,16x", "--negative", "1x"])
    s = screen_prompts(SchedFake(), ["a canary", "a branch", "the sky"], seeds=1)
    text = capsys.readouterr().out
    assert f"labels: 2 memorized, 1 clean; AUC {auc(s[:2], s[2:]):.4f}" in text
