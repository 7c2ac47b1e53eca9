"""Embedders: exact preprocessing, output shapes/norms, differentiable paths, loading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from index_helpers import digits_rgb, make_sscd_torchscript, photos, tiny_clip_config
from PIL import Image

from memaudit.common import UserError
from memaudit.embedders import make_embedder


@pytest.fixture(scope="module")
def sscd_path(tmp_path_factory):
    return make_sscd_torchscript(tmp_path_factory.mktemp("w") / "sscd_disc_mixup.torchscript.pt")


def test_pixels_exact_values_and_gradient():
    imgs, _ = digits_rgb(3)
    e = make_embedder("pixels", size=8, device="cpu")
    assert (e.name, e.dim, e.metric, e.config()) == ("pixels", 192, "l2", {"size": [8, 8]})
    v = e.embed([Image.fromarray(a) for a in imgs])
    want = (imgs.astype(np.float32) / 255.0).transpose(0, 3, 1, 2).reshape(3, -1)
    np.testing.assert_array_equal(v, want)
    x = torch.from_numpy(want.reshape(3, 3, 8, 8).copy()).requires_grad_(True)
    out = e.embed_tensor(x)
    assert torch.equal(out.detach(), torch.from_numpy(want))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_pixels_resize_matches_pil_and_torch_path_is_close():
    img = Image.fromarray(photos()["astronaut"])
    e = make_embedder("pixels", size="16x24", device="cpu")
    assert e.size == (16, 24) and e.dim == 3 * 16 * 24
    t = e.preprocess(img)
    ref = np.asarray(img.resize((24, 16), Image.BICUBIC), np.float32) / 255.0
    np.testing.assert_allclose(t.numpy(), ref.transpose(2, 0, 1), atol=1e-7)
    x = torch.from_numpy(np.asarray(img, np.float32).transpose(2, 0, 1)[None] / 255.0)
    x.requires_grad_(True)
    out = e.embed_tensor(x)
    assert out.shape == (1, e.dim)
    assert float((out.detach() - t.reshape(1, -1)).abs().mean()) < 0.02  # PIL vs torch bicubic
    out.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with pytest.raises(UserError):
        make_embedder("pixels", size="axb")


def test_sscd_official_preprocessing_as_specified(sscd_path):
    import torchvision.transforms.functional as TF

    e = make_embedder("sscd", weights=str(sscd_path), device="cpu")
    assert (e.name, e.dim, e.metric, e.preprocessing) == ("sscd", 512, "ip", "official")
    img = Image.fromarray(photos()["coffee"])  # 600 x 400 (w x h)
    t = e.preprocess(img)
    assert t.shape == (3, 288, 432)  # short edge 288, aspect kept
    resized = img.resize((432, 288), Image.BILINEAR, reducing_gap=None)
    ref = TF.to_tensor(resized)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(t * std + mean, ref, atol=1e-5, rtol=0)
    v = e.embed([img])
    assert v.shape == (1, 512) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    with torch.inference_mode():
        direct = e.model(t[None]).numpy()
    np.testing.assert_allclose(v, direct / np.linalg.norm(direct), atol=1e-5)
    assert e.config()["weights"] == str(sscd_path.resolve())


def test_sscd_somepalli_and_small_variant_batches_and_grad(sscd_path):
    e = make_embedder("sscd", weights=str(sscd_path), preprocessing="somepalli", device="cpu")
    img = Image.fromarray(photos()["rocket"])
    t = e.preprocess(img)
    assert t.shape == (3, 224, 224)
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0  # Normalize(0.5, 0.5)
    small = make_embedder("sscd", weights=str(sscd_path), short_edge=48, device="cpu")
    assert small.preprocessing == "official-s48"
    ph = photos()
    ims = [Image.fromarray(ph[n]) for n in ("astronaut", "coffee", "chelsea", "cat")]
    v = small.embed(ims, batch_size=2)  # mixed shapes are grouped per shape
    assert v.shape == (4, 512)
    np.testing.assert_allclose(v[2], v[3], atol=1e-6)  # chelsea == cat
    one = small.embed([ims[1]])
    np.testing.assert_allclose(v[1], one[0], atol=1e-5)
    x = torch.rand(2, 3, 40, 56, requires_grad=True)
    out = small.embed_tensor(x)
    assert out.shape == (2, 512)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    out[:, 0].sum().backward()
    assert float(x.grad.abs().sum()) > 0
    rebuilt = make_embedder("sscd", **small.config(), device="cpu")
    np.testing.assert_allclose(rebuilt.embed([ims[0]]), v[:1], atol=1e-6)


def test_sscd_errors(tmp_path, sscd_path):
    with pytest.raises(UserError, match="needs --weights"):
        make_embedder("sscd")
    with pytest.raises(UserError, match="not found"):
        make_embedder("sscd", weights=str(tmp_path / "none.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torchscript archive")
    with pytest.raises(UserError, match="cannot load TorchScript"):
        make_embedder("sscd", weights=str(junk))
    with pytest.raises(UserError, match="preprocessing"):
        make_embedder("sscd", weights=str(sscd_path), preprocessing="amg-ish")
    with pytest.raises(UserError, match="SHA-256"):
        make_embedder("sscd", weights=str(sscd_path), weights_sha256="0" * 64)
    with pytest.raises(UserError, match="pinned SHA-256"):
        make_embedder("sscd", weights="https://example.invalid/sscd.pt")
    with pytest.raises(UserError, match="unknown embedder"):
        make_embedder("dino")


def test_clip_tiny_random(tmp_path):
    cfg = tiny_clip_config(tmp_path)
    e = make_embedder("clip", model="memaudit-tiny-clip", pretrained=None,
                      model_config=str(cfg), device="cpu")
    assert (e.name, e.dim, e.metric) == ("clip", 32, "ip")
    assert e.image_size == (32, 32)
    ph = photos()
    ims = [Image.fromarray(ph[n]) for n in ("astronaut", "chelsea", "cat")]
    v = e.embed(ims)
    assert v.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(v[1], v[2], atol=1e-6)
    txt = e.embed_text(["an astronaut", "a cat"])
    assert txt.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    # differentiable path on an image already at the model size ~ the PIL path
    small = ims[0].resize((32, 32), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(small, np.float32).transpose(2, 0, 1)[None] / 255.0)
    x.requires_grad_(True)
    out = e.embed_tensor(x)
    np.testing.assert_allclose(out.detach().numpy(), e.embed([small]), atol=1e-4)
    out[:, 0].sum().backward()
    assert float(x.grad.abs().sum()) > 0
    again = make_embedder("clip", **e.config(), device="cpu")
    assert again.dim == 32
    with pytest.raises(UserError, match="unknown open_clip model"):
        make_embedder("clip", model="no-such-model")
