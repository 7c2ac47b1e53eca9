"""SSCD copy-detection descriptor (Pizzi et al., "A Self-Supervised Descriptor for Image Copy
Detection", CVPR 2022), METHODS 1.1.

ResNet-50 trunk, GeM pooling (p=3), linear 2048 -> 512, L2-normalised; loaded with
`torch.jit.load` from a TorchScript file the user names (`--weights PATH`; it is code, so
never from anywhere else) or from a URL with a pinned SHA-256, cached in ~/.cache/memaudit.
Preprocessing (recorded in every manifest):
- `official` (default): resize the short edge to 288 (bilinear, antialiased), ToTensor,
  ImageNet mean/std; the aspect ratio is kept, so batches are grouped by shape.
- `somepalli`: resize the short edge to 256, centre crop 224, Normalize(0.5, 0.5)
  (Somepalli et al. 2023; Wen et al. 2024).
Similarity is the cosine (inner product of normalised descriptors); copy when > 0.5.
"""

from __future__ import annotations

import os
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from memaudit.common import UserError, sha256_file
from memaudit.embedders.base import Embedder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = {
    # name: (short edge, centre crop or None, mean, std)
    "official": (288, None, IMAGENET_MEAN, IMAGENET_STD),
    "somepalli": (256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MEMAUDIT_CACHE", Path.home() / ".cache" / "memaudit"))


def fetch_weights(url: str, sha256: str | None) -> Path:
    """Download `url` into the cache once, checking its pinned SHA-256."""
    if not sha256:
        raise UserError("downloading SSCD weights needs a pinned SHA-256 (--weights-sha256); "
                        "or pass a local --weights PATH")
    dest = cache_dir() / "sscd" / f"{sha256[:16]}-{url.rsplit('/', 1)[-1]}"
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    try:
        urllib.request.urlretrieve(url, tmp)  # noqa: S310 (https URL named by the user)
    except OSError as e:
        raise UserError(f"cannot download SSCD weights from {url}: {e}") from e
    got = sha256_file(tmp)
    if got != sha256:
        tmp.unlink(missing_ok=True)
        raise UserError(f"SSCD weights from {url} have SHA-256 {got}, expected {sha256}")
    tmp.replace(dest)
    return dest


class SSCDEmbedder(Embedder):
    name = "sscd"
    metric = "ip"

    def __init__(self, weights: str | Path | None = None, preprocessing: str = "official",
                 short_edge: int | None = None, crop: int | None = None,
                 weights_sha256: str | None = None, device: str | None = None,
                 precision: str | None = None, **_: Any):
        if weights is None:
            raise UserError("the sscd embedder needs --weights PATH (a TorchScript file such as "
                            "sscd_disc_mixup.torchscript.pt)")
        if preprocessing not in PRESETS:
            raise UserError(f"unknown SSCD preprocessing {preprocessing!r}; choose "
                            f"{', '.join(PRESETS)}")
        w = str(weights)
        if w.startswith(("http://", "https://")):
            self.url: str | None = w
            path = fetch_weights(w, weights_sha256)
        else:
            self.url = None
            path = Path(w).expanduser().resolve()
            if not path.is_file():
                raise UserError(f"SSCD weights not found: {w}")
        self.weights = path
        self.weights_sha256 = sha256_file(path)
        if weights_sha256 and self.weights_sha256 != weights_sha256:
            raise UserError(f"SSCD weights {path} have SHA-256 {self.weights_sha256}, "
                            f"expected {weights_sha256}")
        self.device = "cpu" if device is None else device
        try:
            with warnings.catch_warnings():  # torch 2.x deprecation notice of jit.load
                warnings.simplefilter("ignore", FutureWarning)
                self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as e:  # RuntimeError / ValueError on a non-TorchScript file
            raise UserError(f"cannot load TorchScript SSCD model {path}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        p_edge, p_crop, self.mean, self.std = PRESETS[preprocessing]
        self.preset = preprocessing
        self.short_edge = short_edge or p_edge
        self.crop = crop if crop is not None else p_crop
        if self.crop is not None and self.crop > self.short_edge:
            raise UserError("crop larger than the resized short edge")
        self.preprocessing = preprocessing
        if short_edge or crop is not None:
            self.preprocessing += f"-s{self.short_edge}" + (f"-c{self.crop}" if self.crop else "")
        with torch.inference_mode():
            probe = torch.zeros(1, 3, 64, 64, device=self.device)
            self.dim = int(self.model(probe).shape[-1])
        self.set_precision(precision, self.model)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"weights": self.url or str(self.weights),
                               "preprocessing": self.preset,
                               "weights_sha256": self.weights_sha256}
        if self.precision != "fp32":
            cfg["precision"] = self.precision
        if self.short_edge != PRESETS[self.preset][0]:
            cfg["short_edge"] = self.short_edge
        if self.crop != PRESETS[self.preset][1]:
            cfg["crop"] = self.crop
        return cfg

    def preprocess(self, image) -> torch.Tensor:
        import torchvision.transforms.functional as TF

        image = image.convert("RGB")
        image = TF.resize(image, self.short_edge,
                          interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        if self.crop is not None:
            image = TF.center_crop(image, [self.crop, self.crop])
        t = TF.to_tensor(image)
        return TF.normalize(t, list(self.mean), list(self.std))

    tensor_preprocess = True

    def preprocess_tensor(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] on any device (GPU-decoded JPEG) -> the model input there: the
        preset's resize (bilinear, antialiased, in float, without PIL's rounding to 8 bits),
        crop and mean/std, as `preprocess`."""
        return self._tensor_preprocess(u8[None].float() / 255.0)[0]

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """Short edge resized to `short_edge` (288, or 256 before the 224 crop), aspect kept."""
        s = self.short_edge
        return (s, max(1, round(w * s / h))) if h <= w else (max(1, round(h * s / w)), s)

    def _tensor_preprocess(self, x01: torch.Tensor) -> torch.Tensor:
        h, w = x01.shape[-2:]
        nh, nw = self.input_size(h, w)
        if (nh, nw) != (h, w):
            x01 = F.interpolate(x01, size=(nh, nw), mode="bilinear", align_corners=False,
                                antialias=True)
        if self.crop is not None:
            c = self.crop
            top, left = (nh - c) // 2, (nw - c) // 2
            x01 = x01[..., top:top + c, left:left + c]
        mean = torch.tensor(self.mean, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
        return (x01 - mean) / std

    def embed_tensor(self, x01: torch.Tensor) -> torch.Tensor:
        """Differentiable descriptor of [B, 3, H, W] images in [0, 1], L2-normalised."""
        with self.autocast():
            out = self.model(self.memory_format(self._tensor_preprocess(x01.to(self.device))))
        return F.normalize(out.float(), dim=-1)
