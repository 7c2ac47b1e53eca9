"""The audit's quality stage (METHODS 4): the plan's `[quality]` table, the CLIP score of every
generation, and one resumable `quality|<method>` unit per method that compares the method's
images with a reference sample of the training set (KID, FD) in each feature space.

    [quality]                      # on by default; quality = false turns it off
    features = "auto"              # auto | inception | index | digits, or a list of them
    reference = 500                # training images drawn from the index's sources ...
    seed = 0                       # ... with this seed
    kid_subsets = 100
    kid_subset_size = 0            # 0: half the smaller set, at most 1000
    inception = "pt_inception-2015-12-05-6726825d.pth"   # FID's Inception-v3 (local file)
    inception_sha256 = "..."       # optional pin
    clip_model = "ViT-B-32"        # CLIP score per generation, with a local checkpoint:
    clip_pretrained = "open_clip_pytorch_model.bin"
    clip_model_config = "my-clip.json"                   # optional (a custom open_clip model)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memaudit.common import UserError

_CHUNK = 64  # images decoded at a time

_KEYS = {"features", "reference", "seed", "kid_subsets", "kid_subset_size", "inception",
         "inception_sha256", "clip_model", "clip_pretrained", "clip_model_config"}
_PATHS = ("inception", "clip_pretrained", "clip_model_config")


@dataclass
class QualitySpec:
    features: list[str] = field(default_factory=lambda: ["auto"])
    reference: int = 500
    seed: int = 0
    kid_subsets: int = 100
    kid_subset_size: int = 0
    inception: str | None = None
    inception_sha256: str | None = None
    clip_model: str | None = None
    clip_pretrained: str | None = None
    clip_model_config: str | None = None


def quality_from_plan(raw: Any, base: Path) -> QualitySpec | None:
    """The plan's `quality` value (absent: defaults; false: off; a table) -> a spec."""
    from memaudit.quality.features import SPACES

    if raw is None or raw is True:
        return QualitySpec()
    if raw is False:
        return None
    if not isinstance(raw, dict):
        raise UserError("plan: 'quality' must be a [quality] table or false")
    bad = set(raw) - _KEYS
    if bad:
        raise UserError(f"plan: unknown [quality] key(s) {', '.join(sorted(bad))}; "
                        f"known: {', '.join(sorted(_KEYS))}")
    d = dict(raw)
    feats = d.get("features", ["auto"])
    feats = [feats] if isinstance(feats, str) else feats
    if not isinstance(feats, list) or not feats or not all(f in SPACES for f in feats):
        raise UserError(f"plan: [quality] features must be one or more of {', '.join(SPACES)}")
    d["features"] = list(feats)
    for k, low in (("reference", 2), ("seed", 0), ("kid_subsets", 1), ("kid_subset_size", 0)):
        if k in d and (not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < low):
            raise UserError(f"plan: [quality] {k} must be an integer >= {low}")
    if d.get("kid_subset_size") == 1:
        raise UserError("plan: [quality] kid_subset_size must be 0 (auto) or >= 2")
    for k in _PATHS + ("clip_model", "inception_sha256"):
        if k in d and not isinstance(d[k], str):
            raise UserError(f"plan: [quality] {k} must be a string")
    for k in _PATHS:
        if d.get(k):
            p = Path(d[k]).expanduser()
            d[k] = str(p if p.is_absolute() else (base / p).resolve())
    sha = d.get("inception_sha256")
    if sha and not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
        raise UserError("plan: [quality] inception_sha256 must be 64 hex digits")
    if bool(d.get("clip_model")) != bool(d.get("clip_pretrained")):
        raise UserError("plan: [quality] clip_model and clip_pretrained (a local checkpoint) "
                        "go together")
    return QualitySpec(**d)


class QualityStage:
    """What the runner needs for quality: built before any run row (bad weights, a missing
    training source or an unknown feature space fail the audit early)."""

    def __init__(self, spec: QualitySpec, index: Any, model: Any, device: str,
                 log: Callable[[str], None]) -> None:
        from memaudit.quality import reference_sample, resolve_spaces
        from memaudit.quality.clipscore import ClipScorer

        self.spec = spec
        self.log = log
        self.clip = (ClipScorer(spec.clip_model, spec.clip_pretrained, spec.clip_model_config,
                                device=device) if spec.clip_model else None)
        is_canary = "canary" in type(model).__name__.lower()
        self.spaces = resolve_spaces(spec.features, index=index, is_canary=is_canary,
                                     inception=spec.inception,
                                     inception_sha256=spec.inception_sha256, device=device)
        self.reference = reference_sample(index, spec.reference, spec.seed)
        self._ref: dict[tuple[str, tuple[int, int]], Any] = {}

    def settings(self) -> dict[str, Any]:
        """Recorded in the run's settings_json under "quality"."""
        return {"features": [s.describe() for s in self.spaces],
                "reference": self.reference.describe(),
                "clip_score": self.clip.describe() if self.clip else None}

    def clip_scores(self, images: Any, prompts: list[str]) -> list[float | None]:
        if self.clip is None:
            return [None] * len(prompts)
        return [float(v) for v in self.clip.score(images, prompts)]

    def measure(self, images: Any) -> list[dict[str, Any]]:
        """KID and FD of generated images [n, 3, H, W] against the reference, per space."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return self.compare({s.name: s.features(images) for s in self.spaces}, size)

    def compare(self, gen: dict[str, Any], size: tuple[int, int]) -> list[dict[str, Any]]:
        """Rows for the quality table from the generated images' features per space."""
        from memaudit.quality import default_subset_size, fd, kid

        rows = []
        for space in self.spaces:
            ref = self._reference_features(space, size)
            g = gen[space.name]
            n, n_ref = len(g), len(ref)
            row: dict[str, Any] = {"features": space.name, "dim": space.dim, "n": n,
                                   "n_reference": n_ref, "reference_seed": self.spec.seed,
                                   "kid": None, "kid_std": None, "fd": None,
                                   "kid_subsets": self.spec.kid_subsets,
                                   "kid_subset_size": None}
            if n >= 2:
                m = min(self.spec.kid_subset_size or default_subset_size(n, n_ref), n, n_ref)
                row["kid"], row["kid_std"] = kid(g, ref, subsets=self.spec.kid_subsets,
                                                 subset_size=m, seed=self.spec.seed)
                row["kid_subset_size"] = m
                row["fd"] = fd(g, ref)
            rows.append(row)
        return rows

    def _reference_features(self, space: Any, size: tuple[int, int]) -> Any:
        from memaudit.quality.reference import images_to_tensor

        key = (space.name, size)
        if key not in self._ref:
            imgs = self.reference.images
            self._ref[key] = np.concatenate([
                space.features(images_to_tensor(imgs[i:i + _CHUNK], size))
                for i in range(0, len(imgs), _CHUNK)])
        return self._ref[key]

    def unit(self, store: Any, run_id: int, method: str, out: Path, unit: str) -> None:
        """One method's quality rows, committed with the unit (resumable). The stored PNGs
        are read back in chunks, so memory does not grow with the number of images."""
        from memaudit.quality.reference import load_pngs

        paths = [out / r["image_path"] for r in store.query(
            "SELECT image_path FROM generations WHERE run_id = ? AND method = ? ORDER BY id",
            [run_id, method])]
        feats: dict[str, list[Any]] = {s.name: [] for s in self.spaces}
        size = None
        for i in range(0, len(paths), _CHUNK):
            x = load_pngs(paths[i:i + _CHUNK])
            if size is not None and tuple(x.shape[-2:]) != size:
                raise UserError(f"quality: the images of {method} differ in size")
            size = (int(x.shape[-2]), int(x.shape[-1]))
            for s in self.spaces:
                feats[s.name].append(s.features(x))
        rows = self.compare({k: np.concatenate(v) for k, v in feats.items()}, size) \
            if size is not None else []
        with store.transaction():
            for r in rows:
                store.add_quality(run_id=run_id, method=method, **r)
            store.mark_unit(run_id, unit)
