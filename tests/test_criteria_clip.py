"""CLIP criterion and CLIP score over a real index built with a tiny random open_clip model
(registered from a JSON config; no download)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from memaudit.common import UserError
from memaudit.criteria import make_criterion, open_index
from memaudit.criteria.clip import clip_score

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}


def _images(n=24):
    from skimage import data

    base = np.asarray(Image.fromarray(data.astronaut()).resize((64, 64)))
    out = []
    for i in range(n):  # shifted crops of a real photo
        y, x = divmod(i, 6)
        out.append(Image.fromarray(base[y * 4:y * 4 + 40, x * 4:x * 4 + 40]))
    return out


@pytest.fixture(scope="module")
def clip_index(tmp_path_factory):
    from memaudit.index import build_index

    tmp = tmp_path_factory.mktemp("clip")
    cfg = tmp / "memaudit-crit-tiny-clip.json"
    cfg.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    rows = []
    for i, im in enumerate(_images()):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        rows.append({"key": f"a{i}", "caption": f"astronaut crop {i}", "png": buf.getvalue()})
    pq.write_table(pa.Table.from_pylist(rows), tmp / "train.parquet")
    out = build_index(tmp / "train.parquet", "clip", tmp / "idx", batch_size=8,
                      embedder_opts={"model": "memaudit-crit-tiny-clip",
                                     "model_config": str(cfg)})
    return open_index(out)


def test_clip_criterion_on_real_index(clip_index):
    cal = clip_index.manifest["calibration"]
    assert set(cal) == {"settings", "clip"} and cal["clip"]["direction"] == "higher"
    crit = make_criterion("clip", clip_index)
    assert crit.calibrated_threshold == pytest.approx(cal["clip"]["fpr"]["0.01"])
    queries = _images()[3:5] + [Image.fromarray(np.zeros((40, 40, 3), np.uint8))]
    s = crit.score(queries)
    q = clip_index.embedder.embed(queries).astype(np.float64)
    g = clip_index.group_vectors().astype(np.float64)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        g / np.linalg.norm(g, axis=1, keepdims=True)).T
    np.testing.assert_allclose(s.score, cos.max(1), atol=1e-5)
    np.testing.assert_array_equal(s.neighbour, clip_index.representative_rows(cos.argmax(1)))
    np.testing.assert_array_equal(s.is_copy_calibrated, cos.max(1) > crit.calibrated_threshold)
    with pytest.raises(UserError, match="supports clip"):
        make_criterion("nl2", clip_index)


def test_clip_score_is_100_cos_of_image_and_text(clip_index):
    crit = make_criterion("clip", clip_index)
    ims = _images()[:3]
    prompts = ["an astronaut", "a photo of a woman in a space suit", "a red bicycle"]
    got = crit.clip_score(ims, prompts)
    iv = clip_index.embedder.embed(ims).astype(np.float64)
    tv = clip_index.embedder.embed_text(prompts).astype(np.float64)
    ref = 100 * (iv * tv).sum(1) / (np.linalg.norm(iv, axis=1) * np.linalg.norm(tv, axis=1))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # the generic function with a bare open_clip model and tensors in [0, 1]
    model = clip_index.embedder.model
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(clip_index.embedder.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip_index.embedder.std).view(1, 3, 1, 1)
    with torch.no_grad():
        f_img = model.encode_image((x - mean) / std).double()
        f_txt = model.encode_text(clip_index.embedder.tokenizer(prompts)).double()
    ref2 = 100 * torch.nn.functional.cosine_similarity(f_img, f_txt).numpy()
    np.testing.assert_allclose(clip_score(x, prompts, model, clip_index.embedder.tokenizer),
                               ref2, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="prompts"):
        crit.clip_score(ims, prompts[:2])
