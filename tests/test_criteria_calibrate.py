"""Calibration (METHODS 1.2): leave-one-group-out null distributions and thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from criteria_fake import FakeIndex, PixelEmbedder, ProjEmbedder

from memaudit.criteria import make_criterion
from memaudit.criteria.calibrate import calibrate_index, threshold_at_fpr


def _hand_null_nl2(train, reps, sampled, k, alpha=0.5):
    out = []
    for g in sampled:
        q = train[reps[g]].astype(np.float64)
        others = [r for j, r in enumerate(reps) if j != g]  # exclude the own group
        l2 = np.sort([np.sqrt(np.mean((q - train[r]) ** 2)) for r in others])[:k]
        out.append(l2[0] / (alpha * l2.mean()))
    return np.array(out)


def test_threshold_direction():
    s = np.arange(1001, dtype=float)  # 0..1000
    assert threshold_at_fpr(s, 0.01, higher_is_copy=False) == pytest.approx(10.0)
    assert threshold_at_fpr(s, 0.01, higher_is_copy=True) == pytest.approx(990.0)


def test_calibration_hand_check_excludes_own_duplicate_group():
    rng = np.random.default_rng(0)
    train = rng.random((14, 48)).astype(np.float32)
    train[[4, 9]] = train[2]  # a group of three exact duplicates
    idx = FakeIndex(train, PixelEmbedder(4))
    reps = [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13]
    cal = calibrate_index(idx, sample=8, seed=3, k=5)
    # training items are sampled (METHODS 1.2), each scored without its own group
    rows = np.sort(np.random.default_rng(3).choice(14, size=8, replace=False))
    group = {r: g for g, r in enumerate(reps)} | {4: 2, 9: 2}
    sampled = [group[int(r)] for r in rows]
    null = _hand_null_nl2(train, reps, sampled, k=5)
    assert cal["settings"]["sampled"] == 8 and cal["settings"]["k_effective"] == 5
    assert cal["settings"]["unit"] == "training items" and cal["settings"]["items"] == 14
    assert cal["nl2"]["n"] == 8
    assert cal["nl2"]["fpr"]["0.01"] == pytest.approx(np.quantile(null, 0.01))
    assert cal["nl2"]["fpr"]["0.001"] == pytest.approx(np.quantile(null, 0.001))
    assert cal["nl2"]["quantiles"]["0.5"] == pytest.approx(np.median(null))
    assert cal["nl2"]["fixed_flag_rate"] == pytest.approx(np.mean(null < 1.4))
    assert "note" in cal["nl2"]  # 0.01 * 8 < 1: the threshold is the sample's extreme
    # the duplicated image: its own group is excluded, so its null score is not 0 ...
    assert cal["nl2"]["min"] > 0.5
    # ... while scoring the same image as a query finds its group at distance 0
    crit = make_criterion("nl2", idx, k=5)
    assert crit.score(torch.from_numpy(train[[9]]).reshape(1, 3, 4, 4)).score[0] == 0
    # l2-tiled null by hand: the best max tile RMSE among the k = 5 pixel-nearest OTHER
    # groups
    tiled_null = []
    for g in sampled:
        q = train[reps[g]].astype(np.float64)
        others = [r for j, r in enumerate(reps) if j != g]
        near = np.argsort([((q - train[r]) ** 2).sum() for r in others])[:5]
        tiled = [np.sqrt(((q - train[others[j]]).reshape(3, 4, 4) ** 2).mean(axis=0)).max()
                 for j in near]  # 4x4 tiles of 1x1 pixels
        tiled_null.append(min(tiled))
    assert cal["l2-tiled"]["fpr"]["0.01"] == pytest.approx(np.quantile(tiled_null, 0.01))
    assert cal["l2-tiled"]["direction"] == "lower"


def test_calibration_cosine_index_upper_quantile():
    rng = np.random.default_rng(5)
    pix = rng.random((30, 3, 8, 8)).astype(np.float32)
    emb = ProjEmbedder("sscd")
    vecs = emb.embed_tensor(torch.from_numpy(pix)).numpy()
    idx = FakeIndex(vecs, emb)
    cal = calibrate_index(idx, sample=30, fprs=(0.1,))
    assert set(cal) == {"settings", "sscd"}
    v = vecs.astype(np.float64) / np.linalg.norm(vecs, axis=1, keepdims=True)
    cos = v @ v.T
    np.fill_diagonal(cos, -np.inf)  # leave-one-out
    null = cos.max(1)
    assert cal["sscd"]["fpr"]["0.1"] == pytest.approx(np.quantile(null, 0.9), abs=1e-6)
    assert cal["sscd"]["direction"] == "higher"


def test_calibration_samples_items_not_groups():
    """METHODS 1.2 samples training items: a group of 40 copies is 40 of the 60 null scores
    (sampling groups would give it 1 of 21)."""
    rng = np.random.default_rng(1)
    train = rng.random((60, 48)).astype(np.float32)
    train[:40] = train[0]  # items 0..39: one image planted 40 times
    idx = FakeIndex(train, PixelEmbedder(4))
    assert idx.ntotal == 21
    cal = calibrate_index(idx, sample=60, k=5, criteria=["nl2"])
    assert cal["nl2"]["n"] == 60 and cal["settings"]["sampled"] == 60
    crit = make_criterion("nl2", idx, k=5)
    planted = crit.score_vectors(train[[0]], exclude=np.array([0]))[0][0]
    from memaudit.criteria.calibrate import null_scores

    null = null_scores(crit, np.array(idx.items.column("group_id").to_numpy()))
    assert np.sum(null == planted) == 40
    assert cal["nl2"]["quantiles"]["0.5"] == pytest.approx(np.quantile(null, 0.5))
    assert cal["nl2"]["quantiles"]["0.5"] == pytest.approx(planted)  # 40 of 60 share it


def test_calibration_arguments_are_checked():
    from memaudit.common import UserError

    idx = FakeIndex(np.random.default_rng(0).random((6, 48)).astype(np.float32),
                    PixelEmbedder(4))
    for kw, msg in (({"sample": 0}, "--sample must be at least 1"),
                    ({"fprs": (2.0,)}, "--fpr must be between 0 and 1"),
                    ({"fprs": (0.0,)}, "--fpr must be between 0 and 1")):
        with pytest.raises(UserError, match=msg):
            calibrate_index(idx, **kw)


def _digits_pixels(size=16):
    from sklearn.datasets import load_digits

    d = load_digits().images / 16.0  # [1797, 8, 8] in [0, 1]
    x = torch.from_numpy(d).float()[:, None].repeat(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                        align_corners=False)
    return x.reshape(len(x), -1).numpy()


def test_digits_fixed_threshold_flags_real_images_calibrated_flags_about_one_percent():
    """METHODS 1.2: on digits upscaled from 8x8, 1.4 flags a large share of real training
    images scored leave-one-out; the calibrated 1% threshold flags about 1% of held-out
    training images (calibrated on one half of the groups, checked on the other)."""
    idx = FakeIndex(_digits_pixels(), PixelEmbedder(16))
    ngroups, nitems = idx.ntotal, idx.items.num_rows
    cal = calibrate_index(idx, sample=nitems // 2, seed=0, criteria=["nl2"])
    assert cal["nl2"]["fixed_flag_rate"] > 0.5
    t = cal["nl2"]["fpr"]["0.01"]
    assert t < 1.4
    rows = np.random.default_rng(0).choice(nitems, size=nitems // 2, replace=False)
    calibrated = set(idx.items.column("group_id").to_numpy()[rows].tolist())
    held_out = np.array([g for g in range(ngroups) if g not in calibrated])
    crit = make_criterion("nl2", idx, calibrated_threshold=t)
    null, _, _ = crit.score_vectors(crit.groups.gather(held_out), exclude=held_out)
    assert np.mean(null < 1.4) > 0.5
    assert 0.002 <= np.mean(null < t) <= 0.03
    print(f"digits: fixed 1.4 flags {np.mean(null < 1.4):.1%}, calibrated {t:.3f} flags "
          f"{np.mean(null < t):.2%} of held-out training images")
