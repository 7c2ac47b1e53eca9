"""Copy criteria over a training index (METHODS.md section 1).

`make_criterion(name, index, **opts)` for "sscd", "nl2", "l2-tiled", "clip". Each criterion
reads its fixed threshold (METHODS 1) and the index's calibrated threshold (1% FPR,
manifest["calibration"], METHODS 1.2) and scores images with `score(images) -> Scores`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memaudit.common import UserError
from memaudit.criteria.base import Criterion, Scores
from memaudit.criteria.common import describe_rows, supported_criteria

CRITERIA = ("sscd", "nl2", "l2-tiled", "clip")
_ALIASES = {"l2tiled": "l2-tiled", "l2_tiled": "l2-tiled", "tiled": "l2-tiled", "nL2": "nl2"}


def canonical_name(name: str) -> str:
    """"l2_tiled" -> "l2-tiled"; unknown names are a UserError listing the known ones."""
    key = _ALIASES.get(name, _ALIASES.get(name.lower(), name.lower()))
    if key not in CRITERIA:
        raise UserError(f"unknown criterion {name!r}; choose from {', '.join(CRITERIA)}")
    return key


def open_index(index: Any, device: str | None = None, weights: str | None = None) -> Any:
    """A TrainingIndex, opened from a directory when given a path. With `device`, the
    index's embedder is rebuilt on that device (criteria embed images with it); `weights`
    is the embedder weights file the user names (SSCD: never the manifest's)."""
    if isinstance(index, (str, Path)):
        from memaudit.index import TrainingIndex

        path = Path(index)
        if not (path / "manifest.json").is_file():
            raise UserError(f"{path} is not an index directory (no manifest.json)")
        index = TrainingIndex.open(path, weights=weights)
    elif weights is not None and hasattr(index, "weights"):
        index.weights = str(weights)
    if device is not None and hasattr(index, "make_embedder"):
        from memaudit.common import resolve_device

        index.set_embedder(index.make_embedder(resolve_device(device)))
    return index


def criterion_class(name: str) -> type[Criterion]:
    """The class of criterion `name` (aliases accepted; unknown names are a UserError)."""
    key = canonical_name(name)
    if key == "nl2":
        from memaudit.criteria.nl2 import NL2Criterion as cls
    elif key == "l2-tiled":
        from memaudit.criteria.l2tiled import TiledL2Criterion as cls
    elif key == "sscd":
        from memaudit.criteria.sscd import SSCDCriterion as cls
    else:
        from memaudit.criteria.clip import ClipCriterion as cls
    return cls


def check_guiding(name: str, method: str = "amg") -> str:
    """The canonical name of a criterion that can guide `method` (AMG needs a differentiable
    similarity, METHODS 3.2); a one-line UserError naming the ones that can otherwise."""
    cls = criterion_class(name)
    if not cls.differentiable:
        ok = [c for c in CRITERIA if criterion_class(c).differentiable]
        raise UserError(f"criterion {cls.name!r} has no differentiable similarity, so it cannot "
                        f"guide {method}; use one of {', '.join(ok)}")
    return cls.name


def make_criterion(name: str, index: Any, **opts: Any) -> Criterion:
    """Build criterion `name` over `index` (TrainingIndex or its directory).

    Options: threshold (override the fixed one), calibrated_threshold, fpr (which calibrated
    threshold, default 0.01); nl2: alpha (0.5), k (50); l2-tiled: grid (4), k (50)."""
    cls = criterion_class(name)
    index = open_index(index)
    try:
        return cls(index, **opts)
    except TypeError as e:
        raise UserError(f"bad option for criterion {cls.name!r}: {e}") from e


__all__ = ["CRITERIA", "Criterion", "Scores", "canonical_name", "check_guiding",
           "criterion_class", "describe_rows", "make_criterion", "open_index",
           "supported_criteria"]
