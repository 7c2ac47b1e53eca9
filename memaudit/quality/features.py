"""Feature spaces for the quality distances (METHODS 4): images -> float vectors, each with the
name that is printed beside every KID and FD computed in it.

- `inception`: Inception-v3 pool3 features (2048), the FID network (Heusel et al. 2017) as
  torch-fidelity implements it (TF-compatible resize to 299, the 2015-12-05 graph's
  weights). Used only when the user names the weights file; never downloaded. The file is
  read as tensors only (safetensors, or `torch.load(weights_only=True)`: a pickle that would
  run code is refused) and its SHA-256 is recorded; `FID_INCEPTION_SHA256` names the
  reference file, so a figure says "fid-inception-v3" only for that file.
- `index`: the audit index's own descriptor (SSCD, CLIP or pixels) through its embedder.
- `digits`: on the canary, the digit classifier's 10 class logits (a linear read-out trained
  on the real digits, the canary's stand-in for Inception's ImageNet features).
`resolve_spaces(["auto"], ...)` picks Inception when named, else an SSCD/CLIP index, else the
digit classifier on the canary, else the index's pixels.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memaudit.common import UserError, sha256_file

#: SHA-256 of weights-inception-2015-12-05-6726825d.pth (torch-fidelity's release file, the
#: same TF graph as pytorch-fid's pt_inception-2015-12-05-6726825d.pth); the name's suffix is
#: its first 8 hex digits. Taken from a public record of the file (not downloadable here).
FID_INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

SPACES = ("auto", "inception", "index", "digits")


class FeatureSpace:
    """images01 [B, 3, H, W] in [0, 1] -> float64 [B, dim]; `name` tags every figure."""

    name: str
    dim: int

    def features(self, images01: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(images01), batch_size):
                out.append(np.asarray(self._forward(images01[i:i + batch_size].float()),
                                      dtype=np.float64))
        return np.concatenate(out) if out else np.zeros((0, self.dim))

    def _forward(self, x01: torch.Tensor) -> Any:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim}


class InceptionFeatures(FeatureSpace):
    """Inception-v3 pool3 (2048) features from a local weights file (torch-fidelity)."""

    def __init__(self, weights: str | Path, sha256: str | None = None,
                 device: str = "cpu") -> None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"Inception weights not found: {path}")
        self.sha256 = sha256_file(path)
        if sha256 and sha256.lower() != self.sha256:
            raise UserError(f"Inception weights {path} have SHA-256 {self.sha256}, "
                            f"expected {sha256.lower()}")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import (
                FeatureExtractorInceptionV3,
            )
        except ImportError as e:
            raise UserError("Inception features need torch-fidelity: pip install "
                            "'memaudit[quality]'") from e
        state = _load_tensors(path)
        with tempfile.TemporaryDirectory(prefix="memaudit-inception-") as tmp:
            # torch-fidelity reads its weights with a full unpickle; it gets a copy that we
            # wrote from plain tensors, never the user's file
            safe = Path(tmp) / "inception.pt"
            torch.save(state, safe)
            try:
                net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                  feature_extractor_weights_path=str(safe))
            except (RuntimeError, KeyError) as e:
                raise UserError(f"{path} is not an FID Inception-v3 state dict: "
                                f"{str(e).splitlines()[0][:200]}") from e
        self.net = net.to(device).eval()
        self.device = device
        self.path = str(path.resolve())
        self.dim = 2048
        self.name = ("fid-inception-v3" if self.sha256 == FID_INCEPTION_SHA256
                     else f"inception-v3@{self.sha256[:12]}")

    def _forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = (x01.clamp(0, 1) * 255).round().to(torch.uint8).to(self.device)
        return self.net(x)[0].double().cpu()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "weights": self.path, "sha256": self.sha256,
                "fid_reference_weights": self.sha256 == FID_INCEPTION_SHA256}


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors only (safetensors, or a torch file without code in it)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, or a pickle that is not just tensors
        raise UserError(f"cannot read Inception weights {path} as plain tensors: "
                        f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return state


class EmbedderFeatures(FeatureSpace):
    """The index's own descriptor (SSCD, CLIP or pixels), via `Embedder.embed_tensor`."""

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self.dim = int(embedder.dim)
        self.name = f"{embedder.name}:{embedder.preprocessing}"

    def _forward(self, x01: torch.Tensor) -> torch.Tensor:
        dev = getattr(self.embedder, "device", "cpu")
        return self.embedder.embed_tensor(x01.to(dev)).double().cpu()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "embedder": self.embedder.describe()}


class DigitFeatures(FeatureSpace):
    """The canary digit classifier's 10 class logits (memaudit.canary.digits), divided by
    their standard deviation over the real digits it was trained on: a fixed scale that
    brings them to O(1), the range KID's kernel (x.y / d + 1)^3 is made for (raw logits,
    std about 2.4, made its subset estimates ten times noisier on the canary)."""

    def __init__(self) -> None:
        from memaudit.canary.data import digit_images
        from memaudit.canary.digits import DigitClassifier

        self.clf = DigitClassifier()
        x, _ = digit_images(self.clf.res)
        self.scale = float(self.clf.clf.decision_function(x.reshape(len(x), -1)).std())
        self.dim = 10
        self.name = f"digits-logits-{self.clf.res}px"

    def _forward(self, x01: torch.Tensor) -> np.ndarray:
        return self.clf.logits(x01) / self.scale

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "scale": self.scale}


def resolve_spaces(specs: list[str], *, index: Any = None, is_canary: bool = False,
                   inception: str | None = None, inception_sha256: str | None = None,
                   device: str = "cpu") -> list[FeatureSpace]:
    """Feature spaces for the names in `specs` (auto | inception | index | digits), in order,
    without repeats."""
    out: dict[str, FeatureSpace] = {}
    for spec in specs:
        kind = spec
        if spec == "auto":
            emb = (index.manifest.get("embedder") or {}).get("name") if index is not None \
                else None
            kind = ("inception" if inception else "index" if emb in ("sscd", "clip")
                    else "digits" if is_canary else "index")
        if kind in out:
            continue
        if kind == "inception":
            if not inception:
                raise UserError("quality: features 'inception' needs the weights file "
                                "([quality] inception = PATH)")
            out[kind] = InceptionFeatures(inception, inception_sha256, device=device)
        elif kind == "index":
            if index is None:
                raise UserError("quality: features 'index' needs an index")
            out[kind] = EmbedderFeatures(index.embedder)
        elif kind == "digits":
            out[kind] = DigitFeatures()
        else:
            raise UserError(f"quality: unknown feature space {spec!r}; choose from "
                            f"{', '.join(SPACES)}")
    return list(out.values())
