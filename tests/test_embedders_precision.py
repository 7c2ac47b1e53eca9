"""Mixed-precision, channels-last descriptors and GPU-style JPEG decoding (issue 21), on the
CPU: bf16 autocast against fp32 with a random ResNet-50-shaped TorchScript SSCD, the
precision recorded in the index manifest, and torchvision's JPEG decoder (device "cpu", the
code path CUDA takes) in an index build."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from index_helpers import (
    digits_rgb,
    encode,
    make_sscd_torchscript,
    photos,
    tiny_clip_config,
    write_parquet,
)
from PIL import Image

from memaudit.common import UserError
from memaudit.embedders import make_embedder
from memaudit.embedders.jpeg import decode_jpegs, is_jpeg, resolve_jpeg_device


@pytest.fixture(scope="module")
def sscd_path(tmp_path_factory):
    return make_sscd_torchscript(tmp_path_factory.mktemp("w") / "sscd_disc_mixup.torchscript.pt")


def _images():
    small = [Image.fromarray(a) for a in digits_rgb(4)[0]]
    return small + [Image.fromarray(a) for a in photos().values()]


def test_bf16_channels_last_descriptors_agree_with_fp32(sscd_path):
    ref = make_embedder("sscd", weights=str(sscd_path), short_edge=64, device="cpu")
    amp = make_embedder("sscd", weights=str(sscd_path), short_edge=64, device="cpu",
                        precision="mixed")
    assert amp.amp_dtype == torch.bfloat16 and ref.amp_dtype is None  # mixed = bf16 on CPU
    assert amp.config()["precision"] == "mixed" and "precision" not in ref.config()
    rebuilt = make_embedder("sscd", **amp.config(), device="cpu")  # what a manifest reopens
    assert rebuilt.amp_dtype == torch.bfloat16
    a, b = ref.embed(_images()), amp.embed(_images())
    assert a.dtype == b.dtype == np.float32
    cos = (a * b).sum(1)  # both L2-normalised
    assert cos.min() >= 0.999 and not np.array_equal(a, b)  # bf16 did run
    # the differentiable path (AMG) under autocast: close, float32, with a finite gradient
    x = torch.rand(2, 3, 48, 40, requires_grad=True)
    out = amp.embed_tensor(x)
    assert out.dtype == torch.float32
    assert float((out.detach() * ref.embed_tensor(x).detach()).sum(1).min()) >= 0.999
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_clip_bf16_descriptors_agree_with_fp32_and_are_recorded(tmp_path):
    """CLIP's image tower under the same autocast (issue 21): recorded in the config a
    manifest reopens, float32 vectors within cosine 0.999 of fp32, AMG's path differentiable."""
    opts = {"model": "memaudit-tiny-clip", "pretrained": None,
            "model_config": str(tiny_clip_config(tmp_path)), "device": "cpu"}
    ref = make_embedder("clip", **opts)
    amp = make_embedder("clip", **opts, precision="mixed")
    assert amp.amp_dtype == torch.bfloat16 and amp.config()["precision"] == "mixed"
    assert "precision" not in ref.config()
    assert make_embedder("clip", **{**amp.config(), "device": "cpu"}).amp_dtype == torch.bfloat16
    ims = [Image.fromarray(a) for a in photos().values()]
    a, b = ref.embed(ims), amp.embed(ims)
    assert a.dtype == b.dtype == np.float32
    assert (a * b).sum(1).min() >= 0.999 and not np.array_equal(a, b)  # bf16 did run
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = amp.embed_tensor(x)
    assert out.dtype == torch.float32
    assert float((out.detach() * ref.embed_tensor(x).detach()).sum(1).min()) >= 0.999
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_precision_errors(sscd_path):
    with pytest.raises(UserError, match="fp16 runs on CUDA only"):
        make_embedder("sscd", weights=str(sscd_path), device="cpu", precision="fp16")
    with pytest.raises(UserError, match="unknown precision"):
        make_embedder("sscd", weights=str(sscd_path), device="cpu", precision="int8")
    with pytest.raises(UserError, match="no model"):
        make_embedder("pixels", size=8, precision="bf16")


def test_torchvision_jpeg_decode_and_tensor_preprocessing(sscd_path):
    arr = photos()["coffee"]
    data = encode(arr, "JPEG")
    assert is_jpeg(data) and not is_jpeg(encode(arr))
    (u8,), = [decode_jpegs([data], "cpu")]
    pil = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB"))
    assert u8.dtype == torch.uint8 and u8.shape == (3, *pil.shape[:2])
    assert np.abs(u8.permute(1, 2, 0).numpy().astype(int) - pil).max() <= 2  # both libjpeg
    assert decode_jpegs([data, b"\xff\xd8\xffjunk"], "cpu")[1] is None  # PIL takes it over
    e = make_embedder("sscd", weights=str(sscd_path), device="cpu")
    t, ref = e.preprocess_tensor(u8), e.preprocess(Image.fromarray(pil))
    assert t.shape == ref.shape  # 288 short edge
    assert float((t - ref).abs().mean()) < 0.02  # float resize vs PIL's 8-bit one
    assert resolve_jpeg_device(None, e) is None and resolve_jpeg_device("off", e) is None
    assert resolve_jpeg_device("cpu", e) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="cannot decode JPEG on CUDA"):
            resolve_jpeg_device("cuda", e)
    with pytest.raises(UserError, match="unknown --jpeg-device"):
        resolve_jpeg_device("gpu", e)


def test_index_build_records_precision_and_jpeg_decoder(sscd_path, tmp_path):
    from memaudit.criteria import make_criterion, open_index
    from memaudit.index import build_index

    imgs = [encode(a, "JPEG") for a in photos().values()] + \
        [encode(a) for a in digits_rgb(6)[0]]  # JPEG rows and PNG rows
    src = write_parquet(tmp_path / "train.parquet", imgs, [f"img {i}" for i in range(11)])
    opts = {"weights": str(sscd_path), "short_edge": 32}
    built = {}
    for name, kw in {"ref": {}, "amp": {"precision": "mixed"},
                     "jpeg": {"jpeg_device": "cpu"}}.items():
        jpeg = kw.pop("jpeg_device", None)
        built[name] = build_index(src, "sscd", tmp_path / name, device="cpu", batch_size=4,
                                  embedder_opts={**opts, **kw}, jpeg_device=jpeg,
                                  calibrate=False)
    man = {k: json.loads((v / "manifest.json").read_text()) for k, v in built.items()}
    assert man["amp"]["embedder"]["config"]["precision"] == "mixed"
    assert "precision" not in man["ref"]["embedder"]["config"]
    assert man["jpeg"]["jpeg_decoder"] == "torchvision:cpu" and "jpeg_decoder" not in man["ref"]
    idx = {k: open_index(str(v), weights=str(sscd_path)) for k, v in built.items()}
    assert idx["amp"].embedder.precision == "mixed"
    vec = {k: np.asarray(i.group_vectors(), np.float64) for k, i in idx.items()}
    for k in ("amp", "jpeg"):
        assert vec[k].shape == vec["ref"].shape
        assert (vec[k] * vec["ref"]).sum(1).min() >= 0.999, k
    crit = make_criterion("sscd", idx["amp"])  # queries embedded in bf16 too
    s = crit.score([Image.fromarray(a) for a in photos().values()])
    assert s.is_copy.all()
