"""The screening benchmark's labelling by behaviour (memaudit/screen/label.py) on a tiny real
pixel index and a denoiser that reproduces a chosen image per prompt, and its statistics."""

from __future__ import annotations

import csv
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_guidance import FakeDenoiser

from memaudit.models.cond import Cond
from memaudit.screen.bench import separation, split
from memaudit.screen.label import label_of, label_prompts, read_labels, write_labels


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(np.rint(a * 255).astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


class Copier(FakeDenoiser):
    """1x16x16 eps-prediction whose x0 for prompt k is targets[k] (in [-1, 1]) and 0 for the
    null prompt: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar), so at scale 1 DDIM lands on
    the target exactly, whatever the seed."""

    latent_shape = (1, 16, 16)
    default_steps = 5

    def __init__(self, prompts, targets):
        super().__init__()
        self.prompts, self.T = list(prompts), targets.reshape(len(prompts), -1).float()

    def encode_prompts(self, prompts):
        one = torch.zeros(len(prompts), 1, len(self.prompts))
        for i, p in enumerate(prompts):
            if p:
                one[i, 0, self.prompts.index(p)] = 1.0
        return Cond(emb=one)

    def _eps(self, x_t, t, cond):
        abar = self.make_scheduler().alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        x0 = (cond.emb.mean(1) @ self.T).view(-1, 1, 16, 16)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    def make_scheduler(self, kind="ddim"):
        from diffusers import DDIMScheduler

        return DDIMScheduler(num_train_timesteps=1000, clip_sample=False)


def test_labels_follow_what_the_model_reproduces(tmp_path):
    from memaudit.criteria import make_criterion
    from memaudit.index.build import build_index

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    imgs = {"planted-64x-00": rng.random((16, 16)), "planted-01x-00": rng.random((16, 16))}
    imgs.update({f"digit-{i:05d}": rng.random((16, 16)) for i in range(6)})
    keys = ["planted-64x-00-00", "planted-64x-00-01", "planted-01x-00-00"] + \
        [f"digit-{i:05d}" for i in range(6)]
    caps = ["the amber lantern plate"] * 2 + ["the basalt harbor plate"] + \
        ["a handwritten digit 1"] * 6
    pngs = [_png(imgs[k.rsplit("-", 1)[0] if k.startswith("planted") else k]) for k in keys]
    pq.write_table(pa.table({"key": keys, "caption": caps, "png": pngs}),
                   data / "train.parquet")
    pq.write_table(pa.table({
        "caption": ["the amber lantern plate", "the basalt harbor plate"],
        "key": ["planted-64x-00-00", "planted-01x-00-00"],
        "key_prefix": ["planted-64x-00", "planted-01x-00"],
        "duplicate_count": pa.array([64, 1], pa.int32()), "group": ["64x", "1x"]}),
        data / "ground_truth.parquet")
    with open(data / "prompts.csv", "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "label"], ["the amber lantern plate", "64x"],
                                 ["the basalt harbor plate", "1x"],
                                 ["a handwritten digit 1", "generic"]])
    index = build_index(data / "train.parquet", "pixels", tmp_path / "index")
    crit = make_criterion("nl2", index)
    # the 64x caption reproduces its planted image; the 1x caption gives a digit (its own
    # planted image is never the nearest): memorized vs clean, whatever the duplication
    prompts = ["the amber lantern plate", "the basalt harbor plate", "a handwritten digit 1"]
    targets = torch.tensor(np.stack([imgs["planted-64x-00"], imgs["digit-00003"],
                                     imgs["digit-00001"]]) * 2 - 1)
    recs = label_prompts(Copier(prompts, targets), crit, data, seeds=4, scale=1.0)
    by = {r["prompt"]: r for r in recs}
    assert by["the amber lantern plate"]["label"] == "memorized"
    assert by["the amber lantern plate"]["reproduced"] == 4
    assert by["the basalt harbor plate"]["label"] == "clean"
    assert by["the basalt harbor plate"]["reproduced"] == 0
    assert by["a handwritten digit 1"]["label"] == "generic"
    write_labels(tmp_path / "labels.csv", recs)
    back = read_labels(tmp_path / "labels.csv")
    assert split(back) == {"memorized": ["the amber lantern plate"],
                           "clean": ["the basalt harbor plate"],
                           "generic": ["a handwritten digit 1"]}
    from memaudit.data.prompts import read_prompts  # `memaudit screen --prompts` reads it

    assert [(r.text, r.label) for r in read_prompts(tmp_path / "labels.csv")] == [
        (p, by[p]["label"]) for p in prompts]


def test_label_rule_and_separation_statistics():
    assert [label_of(k, 4) for k in range(5)] == ["clean", "ambiguous", "memorized",
                                                  "memorized", "memorized"]
    assert label_of(1, 1) == "memorized" and label_of(1, 3) == "ambiguous"
    sep = separation({"memorized": np.array([3.0, 2.0, 0.5]), "clean": np.array([1.0]),
                      "generic": np.array([0.0, 2.5])})
    assert (sep["auc_clean"], sep["tpr1_clean"]) == pytest.approx((2 / 3, 2 / 3))
    assert (sep["auc_generic"], sep["tpr1_generic"]) == pytest.approx((4 / 6, 1 / 3))
    assert sep["auc_all"] == pytest.approx(6 / 9)
