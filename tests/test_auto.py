"""`auto` (METHODS 3.6): screen first, mitigate only flagged prompts. Unflagged rows are
bit-identical to `cfg`'s, the main batched forward keeps cfg's rows, flagged rows get the
mitigation (and AMG on top with a criterion), every decision is recorded; through the real
audit runner with a plan [screen] calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_guidance import FakeDenoiser, PixelNL2

from memaudit.common import UserError
from memaudit.guidance import build_guidance, make_guidance
from memaudit.sampler import sample
from memaudit.screen import DEFAULT_SCORE, calibrate_threshold, make_score, screen_prompts

PROMPTS = ["a canary on a branch", "a photo of a cat", "the sky at night", "a red car"]


class Fake(FakeDenoiser):
    default_steps = 10

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def _eps(self, x_t, t, cond):
        self.batches.append(x_t.shape[0])
        return super()._eps(x_t, t, cond)


def rows(prompts=PROMPTS, seeds=(0, 1)):
    pairs = [(p, s) for p in prompts for s in seeds]
    return [p for p, _ in pairs], [s for _, s in pairs]


def split_threshold(model, k=2):
    """A threshold flagging exactly the k highest-scoring prompts (default score)."""
    sc = screen_prompts(model, PROMPTS, seeds=4)
    order = np.sort(sc)
    return float((order[-k] + order[-k - 1]) / 2), sc


def test_unflagged_rows_are_bit_identical_to_cfg_and_flagged_ones_get_the_mitigation():
    thr, sc = split_threshold(Fake())
    P, S = rows()
    cfg = sample(Fake(), P, S, make_guidance("cfg"), steps=10)
    auto = sample(Fake(), P, S, build_guidance("auto", {"auto": {"threshold": thr,
                                                                 "mitigation": "static"}}),
                  steps=10)
    static = sample(Fake(), P, S, make_guidance("static"), steps=10)
    flagged = [sc[PROMPTS.index(p)] > thr for p in P]
    assert sum(flagged) == 4 and not all(flagged)
    for i, f in enumerate(flagged):
        if f:
            assert not torch.equal(auto.images[i], cfg.images[i])
            assert torch.equal(auto.images[i], static.images[i])  # same rows, same batch
        else:
            assert torch.equal(auto.images[i], cfg.images[i])
    assert auto.trace[0]["auto_flagged"] == [float(f) for f in flagged]
    assert auto.trace[-1]["switch_step"] == [4 if f else None for f in flagged]  # u <= 0.5


def test_the_main_forward_keeps_cfgs_rows_and_amg_runs_on_flagged_rows_only():
    model = Fake()
    thr, sc = split_threshold(Fake(), k=1)
    P, S = rows()
    crit = PixelNL2(torch.full((1, 3, 4, 4), 0.5))
    crit.calibrated_threshold = 1e4  # AMG fires on every flagged sample at every step
    g = build_guidance("auto", {"auto": {"threshold": thr}, "amg": {"c3": 10.0}})
    calls = []
    crit_score = crit.similarity_tensor

    def counted(images):
        calls.append(images.shape[0])
        return crit_score(images)

    crit.similarity_tensor = counted
    out = sample(model, P, S, g, steps=10, criterion=crit)
    cfg = sample(Fake(), P, S, make_guidance("cfg"), steps=10)
    # screening: one forward of the default score's rows x 4 seeds per prompt (wen 2,
    # anisotropy 4); then per step the sampler's forward of cfg's 2B rows and one of the 2
    # flagged rows' Gdup condition
    screen_rows = 4 * make_score(DEFAULT_SCORE).rows(1)
    assert model.batches == [screen_rows] * 4 + [2 * len(P), 2] * 10
    assert calls == [2] * 10  # AMG's similarity on the 2 flagged rows only
    flagged = [sc[PROMPTS.index(p)] > thr for p in P]
    for i, f in enumerate(flagged):
        assert torch.equal(out.images[i], cfg.images[i]) != f
    assert out.trace[0]["fired"] == [1.0 if f else None for f in flagged]
    rec = g.generation_record(P[0], S[0])["auto"]
    assert rec["applied"] == ("dynamic + amg:spe,dup,sim" if flagged[0] else "cfg")
    assert rec["threshold"] == thr and rec["score_name"] == DEFAULT_SCORE


def test_decisions_are_recorded_and_calibration_uses_the_clean_list(tmp_path):
    clean = tmp_path / "clean.txt"
    clean.write_text("the sky at night\na red car\n")
    g = make_guidance("auto", calibrate=str(clean), fpr=0.0, seeds=2)
    P, S = rows()
    sample(Fake(), P, S, g, steps=4)
    clean_scores = screen_prompts(Fake(), ["the sky at night", "a red car"], seeds=2)
    assert g.threshold == pytest.approx(calibrate_threshold(clean_scores, 0.0))
    for p in PROMPTS:
        rec = g.generation_record(p, 0)["auto"]
        assert rec["score"] == pytest.approx(screen_prompts(Fake(), [p], seeds=2)[0])
        assert rec["flagged"] == (rec["score"] > g.threshold)
        assert rec["threshold_source"].startswith(f"calibrated on {clean}")
    assert not g.generation_record("the sky at night", 0)["auto"]["flagged"]


def test_auto_without_a_threshold_and_bad_mitigations_are_one_line_errors():
    with pytest.raises(UserError, match="method 'auto' needs a screening threshold"):
        sample(Fake(), ["a"], [0], make_guidance("auto"), steps=2)
    with pytest.raises(UserError, match="auto.mitigation cannot be auto"):
        make_guidance("auto", mitigation="auto")
    with pytest.raises(UserError, match="unknown method 'nope'"):
        make_guidance("auto", mitigation="nope")
    g = make_guidance("auto", threshold=-1.0, mitigation="amg", amg="none")
    assert g.needs_criterion  # the sampler asks for a criterion before any work
    with pytest.raises(UserError, match="needs a copy criterion"):
        sample(Fake(), ["a"], [0], g, steps=2)


def test_auto_through_the_audit_runner_records_decisions_and_keeps_cfg_images(tmp_path):
    from audit_fixtures import make_tiny_canary, make_training_parquet, write_plan

    from memaudit.audit import load_plan, run_audit
    from memaudit.models import load_model
    from memaudit.store import AuditStore

    src = make_training_parquet(tmp_path / "train.parquet")
    canary = make_tiny_canary(tmp_path / "canary")
    plan_path = write_plan(tmp_path, src, str(canary), methods=("cfg", "auto"), seeds=(0, 1),
                           screen=False, extra='[params.auto]\nmitigation = "static"\n')
    texts = [s for f in ("trig.txt", "gen.txt") for s in (tmp_path / f).read_text().split("\n")
             if s]
    scores = screen_prompts(load_model(str(canary)), texts, seeds=2)
    thr = float(np.sort(scores)[1] + np.sort(scores)[2]) / 2  # 2 of the 4 prompts flagged
    plan_path.write_text(plan_path.read_text() + f"[screen]\nseeds = 2\nthreshold = {thr}\n")
    res = run_audit(load_plan(plan_path), device="cpu")
    with AuditStore(res.db_path, read_only=True) as s:
        units = [r["unit"] for r in s.query("SELECT unit FROM units ORDER BY finished_at")]
        assert units[0] == "screen|0"  # screening first: auto decides with it
        gens = s.query("SELECT p.text, g.seed, g.method, g.image_path, g.extra_json, "
                       "s.flagged, s.score FROM generations g JOIN prompts p "
                       "ON p.id = g.prompt_id JOIN screens s ON s.prompt_id = g.prompt_id "
                       "ORDER BY p.text, g.seed, g.method")
    by = {(r["text"], r["seed"], r["method"]): r for r in gens}
    flagged = set()
    for (text, seed, method), r in by.items():
        if method != "auto":
            continue
        rec = json.loads(r["extra_json"])["auto"]
        assert rec["flagged"] == r["flagged"] and rec["score"] == pytest.approx(r["score"])
        assert rec["threshold"] == pytest.approx(thr)
        assert rec["threshold_source"] == "plan [screen] threshold"
        png = (res.db_path.parent / r["image_path"]).read_bytes()
        cfg_png = (res.db_path.parent / by[(text, seed, "cfg")]["image_path"]).read_bytes()
        assert (png == cfg_png) == (not rec["flagged"])
        if rec["flagged"]:
            flagged.add(text)
            assert rec["applied"] == "static + amg:spe,dup,sim"
        else:
            assert rec["applied"] == "cfg"
    assert len(flagged) == 2
