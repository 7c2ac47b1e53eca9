"""The canary: data builder, short training through the real trainer, adapter, digits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from memaudit.canary.data import (
    DUP_COUNTS,
    GUIDED,
    PHOTOS,
    SHARED,
    SHARED_DIGITS,
    SHARED_PHOTOS,
    build_canary_data,
    from_png,
    groups,
    rmse_matrix,
)
from memaudit.canary.digits import DigitClassifier, digit_of_prompt
from memaudit.canary.model import CanaryConfig
from memaudit.canary.planted import _clashes
from memaudit.canary.train import export_checkpoint, train_canary
from memaudit.common import UserError

TINY = CanaryConfig(block_out_channels=(8, 16, 16), layers_per_block=1, cross_attention_dim=16,
                    attention_head_dim=8, text_len=8)


@pytest.fixture(scope="module")
def canary_data(tmp_path_factory) -> Path:
    """With the retired shared-caption group (issue 8), which keeps its tests."""
    out = tmp_path_factory.mktemp("canary_data")
    build_canary_data(out, digits_limit=1200, shared_copies=16)
    return out


def test_rmse_matrix_by_hand():
    a = np.zeros((1, 2, 2))
    b = np.stack([np.zeros((2, 2)), np.array([[1.0, 0.0], [0.0, 0.0]]), np.full((2, 2), 0.5)])
    np.testing.assert_allclose(rmse_matrix(a, b), [[0.0, 0.5, 0.5]])  # sqrt(1/4), sqrt(.25)


def test_overlapping_crops_of_one_photo_clash():
    kept = ["camera crop y=0 x=0 size=100"]
    assert _clashes("camera crop y=50 x=50 size=100", kept, 3)  # overlaps
    assert not _clashes("camera crop y=100 x=0 size=100", kept, 3)  # touches, no overlap
    assert not _clashes("coins crop y=0 x=0 size=100", kept, 3)  # another photo
    assert _clashes("camera crop y=200 x=200 size=10", kept, 1)  # per-photo limit
    assert not _clashes("lfw_subset face 3", kept, 1)
    assert not set(SHARED_PHOTOS) & set(PHOTOS)  # the shared group's photos are its own


def test_data_files_and_planted_duplicates(canary_data: Path):
    train = pq.read_table(canary_data / "train.parquet")
    assert train.column_names == ["key", "caption", "png"]
    keys = train.column("key").to_pylist()
    assert len(set(keys)) == len(keys)
    caps = train.column("caption").to_pylist()
    gt = pq.read_table(canary_data / "ground_truth.parquet").to_pylist()
    labels = [lab for lab, _ in groups(16)]
    assert labels == ["64x", "16x", "4x", "1x", SHARED]
    assert [lab for lab, _ in groups()] == ["64x", "16x", "4x", "1x"]  # none by default
    assert sorted({g["duplicate_count"] for g in gt}) == sorted(DUP_COUNTS)
    for label, count in groups(16):
        mine = [g for g in gt if g["group"] == label]
        assert len(mine) == 6 and all(g["duplicate_count"] == count for g in mine)
    assert len({g["caption"] for g in gt}) == 30
    for g in gt:
        rows = [i for i, k in enumerate(keys) if k.startswith(g["key_prefix"] + "-")]
        assert len(rows) == g["duplicate_count"]
        assert all(caps[i] == g["caption"] for i in rows)  # trigger caption on its image
        shared = [k for k, c in zip(keys, caps, strict=True) if c == g["caption"]
                  and not k.startswith("planted")]
        if g["group"] == SHARED:  # ... and on SHARED_DIGITS ordinary digits, nothing else
            assert g["shared_with"] == SHARED_DIGITS and len(shared) == SHARED_DIGITS
            assert all(k.startswith("digit-") for k in shared)
            # a crop of a photograph no other group uses (no face: a class the model knows)
            assert g["source"].split()[0] in SHARED_PHOTOS
        else:  # only on its image
            assert g["shared_with"] == 0 and shared == []
        assert caps.count(g["caption"]) == g["duplicate_count"] + g["shared_with"]
        pngs = {train.column("png")[i].as_py() for i in rows}
        assert len(pngs) == 1  # exact duplicates
    # no word is shared between two triggers
    words = [w for g in gt for w in g["caption"].split()[1:3]]
    assert len(words) == len(set(words))
    # every image is stored at the training resolution
    assert {from_png(b).shape for b in train.column("png").to_pylist()[:50]} == {(16, 16)}
    # prompt lists
    for label in labels:
        lines = (canary_data / f"triggers_{label}.txt").read_text().splitlines()
        assert sorted(lines) == sorted(g["caption"] for g in gt if g["group"] == label)
    with (canary_data / "prompts.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows].count(SHARED) == 6
    assert {r["prompt"] for r in rows if r["label"] == SHARED} == \
        {g["caption"] for g in gt if g["group"] == SHARED}
    assert GUIDED not in [r["label"] for r in rows]  # measured, never built
    # each trigger names its planted image (the first of its duplicate keys)
    assert {r["prompt"]: r["target_key"] for r in rows if r["label"] != "generic"} == \
        {g["caption"]: g["key"] for g in gt}
    assert [r["label"] for r in rows].count("64x") == 6 and "generic" in [r["label"] for r in rows]
    generic = (canary_data / "generic.txt").read_text().splitlines()
    assert "a handwritten digit 3" in generic
    info = json.loads((canary_data / "data.json").read_text())
    assert info["shared_copies"] == 16 and info["shared_digits"] == SHARED_DIGITS


def test_shared_group_leaves_the_other_groups_unchanged(canary_data: Path, tmp_path):
    """The shared-caption group is chosen after the others: without it the planted images,
    their captions and the digit captions other than the shared ones are the same."""
    build_canary_data(tmp_path, digits_limit=1200)
    a = pq.read_table(canary_data / "ground_truth.parquet").to_pylist()
    b = pq.read_table(tmp_path / "ground_truth.parquet").to_pylist()
    assert [(g["caption"], g["source"]) for g in b] == \
        [(g["caption"], g["source"]) for g in a if g["group"] != SHARED]
    assert not (tmp_path / "triggers_shared.txt").exists()
    def captions(folder: Path) -> dict[str, str]:
        t = pq.read_table(folder / "train.parquet", columns=["key", "caption"]).to_pydict()
        return dict(zip(t["key"], t["caption"], strict=True))

    ta, tb = captions(canary_data), captions(tmp_path)
    guided = {g["caption"] for g in a if g["group"] == SHARED}
    changed = {k for k in tb if k.startswith("digit-") and ta[k] != tb[k]}
    assert len(changed) == 6 * SHARED_DIGITS and all(ta[k] in guided for k in changed)


def test_extra_counts_add_a_group_and_leave_the_others_unchanged(tmp_path):
    """issue 17: `extra_counts` (e.g. 2x) adds planted images shown that many times, chosen
    after the default groups, whose images and captions stay the same."""
    build_canary_data(tmp_path / "a", digits_limit=1200)
    build_canary_data(tmp_path / "b", digits_limit=1200, extra_counts=(2,))
    a = pq.read_table(tmp_path / "a" / "ground_truth.parquet").to_pylist()
    b = pq.read_table(tmp_path / "b" / "ground_truth.parquet").to_pylist()
    assert [(g["caption"], g["source"]) for g in b[:24]] == \
        [(g["caption"], g["source"]) for g in a]
    two = [g for g in b[24:] if g["group"] == "2x"]
    assert len(two) == 6 == len(b) - 24 and all(g["duplicate_count"] == 2 for g in two)
    keys = pq.read_table(tmp_path / "b" / "train.parquet", columns=["key"]).column(
        "key").to_pylist()
    assert all(sum(k.startswith(g["key_prefix"] + "-") for k in keys) == 2 for g in two)
    assert (tmp_path / "b" / "triggers_2x.txt").read_text().splitlines() == \
        [g["caption"] for g in two]
    assert json.loads((tmp_path / "b" / "data.json").read_text())["extra_counts"] == [2]
    with pytest.raises(UserError, match="--extra-counts"):
        build_canary_data(tmp_path / "c", extra_counts=(4,))


def test_measured_labels_make_the_guided_group(canary_data: Path, tmp_path):
    """issue 17: labels from `canary evaluate` move the guided images' prompts to their own
    group (prompts.csv, triggers_guided.txt, ground truth), out of their count's list; the
    training rows do not change; a labels.json beside a canary's weights is picked up."""
    from memaudit.canary.data import model_data_settings, read_labels

    base = tmp_path / "base"
    build_canary_data(base, digits_limit=1200)
    gt = pq.read_table(base / "ground_truth.parquet").to_pylist()
    ones = [g["caption"] for g in gt if g["group"] == "1x"]
    doc = {"images": [{"caption": ones[0], "behaviour": GUIDED},
                      {"caption": ones[1], "behaviour": GUIDED},
                      {"caption": gt[0]["caption"], "behaviour": "memorized"},
                      {"caption": ones[2], "behaviour": None}]}
    (tmp_path / "labels.json").write_text(json.dumps(doc))
    labels = read_labels(tmp_path / "labels.json")
    assert labels[ones[2]] == ""
    out = tmp_path / "labelled"
    build_canary_data(out, digits_limit=1200, labels=labels)
    assert (out / "train.parquet").read_bytes() == (base / "train.parquet").read_bytes()
    assert (out / "triggers_guided.txt").read_text().splitlines() == ones[:2]
    assert (out / "triggers_1x.txt").read_text().splitlines() == ones[2:]
    with (out / "prompts.csv").open() as f:
        rows = {r["prompt"]: r["label"] for r in csv.DictReader(f)}
    assert [p for p, lab in rows.items() if lab == GUIDED] == ones[:2]
    assert rows[gt[0]["caption"]] == "64x"  # memorized keeps its count's group
    behaviour = {g["caption"]: g["behaviour"]
                 for g in pq.read_table(out / "ground_truth.parquet").to_pylist()}
    assert behaviour[ones[0]] == GUIDED and behaviour[gt[0]["caption"]] == "memorized"
    assert json.loads((out / "data.json").read_text())["guided"] == sorted(ones[:2])
    # rebuilt without labels into the same folder: no stale guided list
    build_canary_data(out, digits_limit=1200)
    assert not (out / "triggers_guided.txt").exists()
    model = tmp_path / "model"
    model.mkdir()
    (model / "labels.json").write_text(json.dumps(doc))
    assert model_data_settings(str(model))["labels"] == labels
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a labels.json"):
        read_labels(tmp_path / "bad.json")


def test_planted_are_not_near_duplicates(canary_data: Path):
    """Recomputed from the stored PNGs: planted vs planted and planted vs generic RMSE."""
    train = pq.read_table(canary_data / "train.parquet").to_pylist()
    gt = pq.read_table(canary_data / "ground_truth.parquet").to_pylist()
    min_rmse = json.loads((canary_data / "data.json").read_text())["min_rmse"]
    by_key = {r["key"]: r for r in train}
    planted = np.stack([from_png(by_key[g["key"]]["png"]) for g in gt])
    generic = np.stack([from_png(r["png"]) for r in train if not r["key"].startswith("planted")])
    pp = rmse_matrix(planted, planted) + np.eye(len(planted)) * 9
    assert pp.min() >= min_rmse - 1e-9
    assert rmse_matrix(planted, generic).min() >= min_rmse - 1e-9


def test_data_is_deterministic_and_readable_by_the_shared_reader(canary_data: Path, tmp_path):
    from memaudit.data.parquet import iter_training_rows

    build_canary_data(tmp_path, digits_limit=1200, shared_copies=16)
    a = (canary_data / "train.parquet").read_bytes()
    assert a == (tmp_path / "train.parquet").read_bytes()
    rows = list(iter_training_rows(canary_data / "train.parquet"))
    assert len(rows) == pq.read_metadata(canary_data / "train.parquet").num_rows
    assert rows[0].image_bytes and rows[0].caption


def _subset(canary_data: Path, path: Path, n: int = 48) -> Path:
    t = pq.read_table(canary_data / "train.parquet")
    pq.write_table(t.slice(0, n), path)
    return path


def test_short_training_resume_and_generation(canary_data: Path, tmp_path):
    from memaudit.guidance import make_guidance
    from memaudit.models import load_model
    from memaudit.sampler import sample

    data = _subset(canary_data, tmp_path / "sub.parquet")
    out = tmp_path / "canary"
    info = train_canary(data, out, steps=4, batch_size=8, cfg=TINY, checkpoint_every=2,
                        log_every=2, device="cpu", command="test")
    assert info["steps"] == 4 and info["data_rows"] == 48 and info["train_command"] == "test"
    assert info["config"]["block_out_channels"] == [8, 16, 16]
    assert (out / "canary.safetensors").exists()
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,seconds" and [r.split(",")[0] for r in rows[1:]] == ["2", "4"]
    assert all(np.isfinite(float(r.split(",")[1])) for r in rows[1:])
    # resume: continues from step 4 and logs 6
    info2 = train_canary(data, out, steps=6, batch_size=8, cfg=TINY, checkpoint_every=2,
                         log_every=2, device="cpu")
    assert info2["steps"] == 6
    assert [r.split(",")[0] for r in (out / "loss.csv").read_text().splitlines()[1:]] == \
        ["2", "4", "6"]
    # a checkpoint exports to a canary folder that loads, with the checkpoint's EMA weights
    ck_path = sorted((out / "checkpoints").glob("*.pt"))[-1]
    export_checkpoint(ck_path, tmp_path / "exp", TINY)
    exported = load_model(tmp_path / "exp", device="cpu")
    ema = torch.load(ck_path, map_location="cpu", weights_only=True)["ema"]
    state = exported.net.state_dict()
    assert set(state) == set(ema) and all(torch.equal(state[k], ema[k]) for k in ema)
    assert exported.info["steps"] == 6 and exported.latent_shape == (1, 16, 16)

    m = load_model(out, device="cpu")
    assert m.name == str(out) and len(m.model_hash) == 64 and not m.is_latent
    assert m.latent_shape == (1, 16, 16)
    emb = m.encode_prompts(["a handwritten digit 3", ""]).emb
    assert emb.shape == (2, 8, 16)
    torch.testing.assert_close(m.null_embedding(2).emb, emb[1:].expand(2, -1, -1))
    prompts, seeds = ["a handwritten digit 3", "a handwritten digit 3"], [0, 1]
    a = sample(m, prompts, seeds, make_guidance("cfg"), steps=3)
    b = sample(m, prompts, seeds, make_guidance("cfg"), steps=3)
    assert a.images.shape == (2, 3, 16, 16)
    assert torch.equal(a.images, b.images)  # identical seeds -> identical images
    assert not torch.equal(a.images[0], a.images[1])
    assert a.images.min() >= 0 and a.images.max() <= 1


def test_decode_maps_range_and_keeps_gradient(canary_data: Path, tmp_path):
    from memaudit.models.canary import CanaryDenoiser

    data = _subset(canary_data, tmp_path / "sub.parquet", 16)
    train_canary(data, tmp_path / "c", steps=1, batch_size=4, cfg=TINY, log_every=1,
                 device="cpu")
    m = CanaryDenoiser.load(tmp_path / "c", device="cpu")
    x = torch.tensor([-0.9, 0.0, 0.5, 2.0]).view(1, 1, 2, 2).requires_grad_(True)
    img = m.decode(x)
    assert img.shape == (1, 3, 2, 2)
    torch.testing.assert_close(img[0, 2].flatten(), torch.tensor([0.05, 0.5, 0.75, 1.0]))
    img.sum().backward()
    torch.testing.assert_close(x.grad.flatten(), torch.tensor([1.5, 1.5, 1.5, 0.0]))
    assert m.make_scheduler("dpm").config.num_train_timesteps == 1000
    toks = m.random_tokens(4, torch.Generator().manual_seed(0))
    assert len(toks) == 4 and all(t.isalpha() for t in toks)
    with pytest.raises(UserError):
        m.make_scheduler("euler")


def test_training_records_the_data_json_of_its_data(canary_data: Path, tmp_path):
    """canary.json keeps the data.json beside the training Parquet (how to rebuild the data,
    which the demo reads), only when its hash is the trained data's."""
    import json

    from memaudit.canary.train import read_training_images

    (tmp_path / "d").mkdir()
    data = _subset(canary_data, tmp_path / "d" / "train.parquet")
    digest = read_training_images(data, 16)[2]
    rec = {"train_sha256": digest, "shared_copies": 16, "shared_digits": 96, "per_count": 6}
    (data.parent / "data.json").write_text(json.dumps(rec))
    info = train_canary(data, tmp_path / "a", steps=1, batch_size=4, cfg=TINY, device="cpu")
    assert info["data"] == rec
    (data.parent / "data.json").write_text(json.dumps({**rec, "train_sha256": "0" * 64}))
    info = train_canary(data, tmp_path / "b", steps=1, batch_size=4, cfg=TINY, device="cpu")
    assert "data" not in info


def test_train_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError):
        train_canary(tmp_path / "missing.parquet", tmp_path / "o", steps=1)
    bad = tmp_path / "bad.parquet"
    import pyarrow as pa

    pq.write_table(pa.table({"key": ["a"], "label": ["b"]}), bad)
    with pytest.raises(UserError):
        train_canary(bad, tmp_path / "o", steps=1)


def test_digit_classifier_on_real_held_out_digits():
    from memaudit.canary.data import digit_images

    clf = DigitClassifier(res=16, train_indices=np.arange(1400))
    x, y = digit_images(16)
    imgs = torch.from_numpy(x[1400:])[:, None].expand(-1, 3, -1, -1)
    acc = float((clf.predict(imgs) == y[1400:]).mean())
    assert acc > 0.85
    # a 32x32 input is resized to the classifier's resolution
    big = torch.nn.functional.interpolate(imgs[:20], size=(32, 32), mode="nearest")
    assert (clf.predict(big) == y[1400:1420]).mean() > 0.7


def test_digit_of_prompt():
    assert digit_of_prompt("a handwritten digit 3") == 3
    assert digit_of_prompt("the number 7 written by hand") == 7
    assert digit_of_prompt("handwritten numeral nine") == 9
    assert digit_of_prompt("the teal meadow plate, archive print 101") is None
    assert digit_of_prompt("a small grey photo of a face") is None
    assert digit_of_prompt("a handwritten digit 12") is None


def test_evaluate_pipeline_on_a_tiny_model(canary_data: Path, tmp_path):
    """The proof pipeline end to end (index, sampler, nL2, digits, grid) on an untrained
    model: it must run and count correctly; the numbers themselves are in docs/canary.md."""
    from memaudit.canary.evaluate import behaviour, evaluate_canary, format_summary, read_prompts

    model = tmp_path / "c"
    train_canary(_subset(canary_data, tmp_path / "sub.parquet", 16), model, steps=1,
                 batch_size=4, cfg=TINY, log_every=1, device="cpu")
    s = evaluate_canary(model, tmp_path / "eval", data_dir=canary_data, seeds=2,
                        scales=(1.0, 2.0), steps=2, device="cpu")
    n_prompts = len(read_prompts(canary_data))
    with (tmp_path / "eval" / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_prompts * 2 * 2
    assert set(s["rates"]) == {"1", "2"}
    r = s["rates"]["2"]
    assert r["64x"]["n"] == 12 and r["generic"]["n"] == 2 * sum(
        1 for _, lab in read_prompts(canary_data) if lab == "generic")
    # rates are recomputed from the per-image rows
    sub = [x for x in rows if x["scale"] == "2.0" and x["label"] == "64x"]
    near = np.mean([x["nearest_is_planted"] == "True" for x in sub])
    assert r["64x"]["nearest_is_planted"] == pytest.approx(near)
    assert s["calibrated_threshold"] > 0
    from PIL import Image

    with Image.open(tmp_path / "eval" / "grid.png") as im:  # 30 triggers, 64 px rows + 2
        assert im.size[1] == 30 * (16 * 4 + 2)
    assert "64x" in format_summary(s)
    # issue 17: reproduction per record and each planted image's behaviour from its rates
    sub = [x for x in rows if x["label"] != "generic"]
    assert all(x["reproduced"] == str(x["nearest_is_planted"] == "True"
                                      and float(x["nl2"]) < 1.4) for x in sub)
    labels = json.loads((tmp_path / "eval" / "labels.json").read_text())
    assert labels == s["behaviour"] and len(labels["images"]) == 30
    for im in labels["images"]:
        mine = [x for x in sub if x["prompt"] == im["caption"]]
        for scale, v in im["reproduction"].items():
            rs = [x["reproduced"] == "True" for x in mine if float(x["scale"]) == float(scale)]
            assert v == pytest.approx(np.mean(rs))
        # the tiny model's default scale is 2.0, among the scales: every image is labelled
        assert im["behaviour"] == behaviour(im["reproduction"]["1"], im["reproduction"]["2"])


def test_behaviour_rule():
    from memaudit.canary.evaluate import behaviour

    """memorized >= 80% at scale 1; guided <= 25% at 1 and >= 60% at the default scale."""
    assert behaviour(0.8, 0.0) == "memorized"
    assert behaviour(0.79, 1.0) == ""
    assert behaviour(0.25, 0.6) == "guided"
    assert behaviour(0.26, 1.0) == "" and behaviour(0.0, 0.59) == ""
