"""SSCD criterion through the real sscd embedder: a tiny TorchScript descriptor (conv + GeM
+ linear + L2 norm, random weights) loaded by path like sscd_disc_mixup.torchscript.pt, a
real index built from Parquet, detect on a folder of PNGs."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from memaudit.criteria import make_criterion, open_index
from memaudit.criteria.detect import detect_images


class TinySSCD(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 24, 5, stride=2)
        self.proj = torch.nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(x)).clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3)
        return torch.nn.functional.normalize(self.proj(f), dim=-1)


def _crops(n=20):
    from skimage import data

    base = np.asarray(Image.fromarray(data.chelsea()).resize((96, 64)))
    return [Image.fromarray(base[(i % 4) * 6:(i % 4) * 6 + 40, (i // 4) * 10:(i // 4) * 10 + 48])
            for i in range(n)]


@pytest.fixture(scope="module")
def sscd_index(tmp_path_factory):
    from memaudit.index import build_index

    tmp = tmp_path_factory.mktemp("sscd")
    torch.manual_seed(0)
    weights = tmp / "sscd_disc_mixup.torchscript.pt"
    with warnings.catch_warnings():  # torch 2.x deprecation notice of jit.script
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(TinySSCD().eval()).save(str(weights))
    rows = []
    for i, im in enumerate(_crops()):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        rows.append({"key": f"c{i}", "caption": f"cat crop {i}", "png": buf.getvalue()})
    pq.write_table(pa.Table.from_pylist(rows), tmp / "train.parquet")
    out = build_index(tmp / "train.parquet", "sscd", tmp / "idx", batch_size=8,
                      embedder_opts={"weights": str(weights), "short_edge": 32})
    return open_index(out, weights=str(weights))  # TorchScript only from a path we name


def test_sscd_score_hand_computation(sscd_index):
    crit = make_criterion("sscd", sscd_index)
    cal = sscd_index.manifest["calibration"]["sscd"]
    assert crit.calibrated_threshold == pytest.approx(cal["fpr"]["0.01"])
    queries = _crops()[5:7] + [Image.fromarray(np.full((40, 48, 3), 200, np.uint8))]
    s = crit.score(queries)
    q = sscd_index.embedder.embed(queries).astype(np.float64)
    g = sscd_index.group_vectors().astype(np.float64)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        g / np.linalg.norm(g, axis=1, keepdims=True)).T
    np.testing.assert_allclose(s.score, cos.max(1), atol=1e-5)
    np.testing.assert_array_equal(s.neighbour, sscd_index.representative_rows(cos.argmax(1)))
    assert s.score[:2] == pytest.approx([1.0, 1.0], abs=1e-5)  # training images themselves
    np.testing.assert_array_equal(s.extra["copy@0.75"], cos.max(1) > 0.75)
    np.testing.assert_array_equal(s.is_copy_calibrated, cos.max(1) > crit.calibrated_threshold)


def test_sscd_similarity_tensor_has_gradient(sscd_index):
    crit = make_criterion("sscd", sscd_index)
    x = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)
                     for im in _crops()[:3]]).requires_grad_(True)
    sim, gids = crit.similarity_tensor(x)
    ref = crit.score(x.detach())
    np.testing.assert_allclose(sim.detach().numpy(), ref.score, atol=1e-5)
    np.testing.assert_array_equal(sscd_index.representative_rows(gids.numpy()), ref.neighbour)
    sim.sum().backward()
    assert x.grad.abs().sum() > 0
    with torch.no_grad():
        step = x.grad / x.grad.flatten(1).norm(dim=1)[:, None, None, None]
        assert (crit.similarity_tensor(x - 0.05 * step)[0] < sim).all()


def test_detect_sscd_folder(sscd_index, tmp_path):
    _crops()[9].save(tmp_path / "a.png")
    Image.fromarray(np.full((40, 48, 3), 30, np.uint8)).save(tmp_path / "b.png")
    t = detect_images(tmp_path, sscd_index, batch_size=1)
    assert t.column("criterion").to_pylist() == ["sscd", "sscd"]
    first = t.to_pylist()[0]
    assert first["neighbour_key"] == "c9" and first["is_copy"]
    assert first["score"] == pytest.approx(1.0, abs=1e-5)
