"""Test data for the index area: real images (scikit-image photos, scikit-learn digits)
written into Parquet, and tiny random-weight SSCD / open_clip models saved to disk."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    img = Image.fromarray(arr)
    if img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def digits_rgb(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as uint8 RGB [n, 8, 8, 3] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    imgs = np.repeat(imgs[..., None], 3, axis=-1)
    if n is not None:
        imgs, labels = imgs[:n], d.target[:n]
    else:
        labels = d.target
    return imgs, labels


def photos() -> dict[str, np.ndarray]:
    """A few scikit-image bundled photos (chelsea and cat are the same picture)."""
    import skimage.data as d

    return {"astronaut": d.astronaut(), "coffee": d.coffee(), "chelsea": d.chelsea(),
            "cat": d.cat(), "rocket": d.rocket()}


def write_parquet(path: Path, images: list[bytes | None], captions: list[str | None],
                  keys: list[str] | None = None, image_col: str = "png",
                  caption_col: str = "caption", struct: bool = False,
                  row_group_size: int | None = None) -> Path:
    cols: dict = {}
    if struct:
        cols[image_col] = pa.array([{"bytes": b, "path": f"img{i}.png"}
                                    for i, b in enumerate(images)],
                                   pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        cols[image_col] = pa.array(images, pa.binary())
    cols[caption_col] = pa.array(captions, pa.string())
    if keys is not None:
        cols["key"] = pa.array(keys, pa.string())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def digits_parquet(path: Path, n: int = 60, dup_of: dict[int, int] | None = None,
                   bad_rows: dict[int, bytes] | None = None,
                   row_group_size: int | None = None) -> Path:
    """Digits as PNG rows; `dup_of` {row: source_row} copies pixels (different caption),
    `bad_rows` {row: bytes} replaces the image bytes."""
    imgs, labels = digits_rgb(n)
    blobs: list[bytes | None] = [encode(a) for a in imgs]
    caps = [f"a handwritten digit {int(lab)}" for lab in labels]
    for r, s in (dup_of or {}).items():
        blobs[r] = encode(imgs[s])
        caps[r] = f"copy of row {s}"
    for r, b in (bad_rows or {}).items():
        blobs[r] = b
    keys = [f"d{i:04d}" for i in range(n)]
    return write_parquet(path, blobs, caps, keys, row_group_size=row_group_size)


def make_sscd_torchscript(path: Path) -> Path:
    """ResNet-50 trunk + GeM (p=3) + Linear(2048, 512) + L2 norm, random weights, scripted
    and saved where a user's sscd_disc_mixup.torchscript.pt would be."""
    import torch
    import torchvision

    class GeM(torch.nn.Module):
        def __init__(self, p: float = 3.0, eps: float = 1e-6):
            super().__init__()
            self.p = p
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.clamp(min=self.eps).pow(self.p)
            return torch.nn.functional.adaptive_avg_pool2d(x, 1).pow(1.0 / self.p).flatten(1)

    class SSCD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            r = torchvision.models.resnet50(weights=None)
            self.trunk = torch.nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1,
                                             r.layer2, r.layer3, r.layer4)
            self.pool = GeM(3.0)
            self.proj = torch.nn.Linear(2048, 512)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(self.proj(self.pool(self.trunk(x))), dim=-1)

    m = torch.jit.script(SSCD().eval())
    path.parent.mkdir(parents=True, exist_ok=True)
    m.save(str(path))
    return path


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}


def tiny_clip_config(tmp: Path, name: str = "memaudit-tiny-clip") -> Path:
    """A tiny open_clip model config (random weights via pretrained=None)."""
    p = tmp / f"{name}.json"
    p.write_text(json.dumps(TINY_CLIP))
    return p
