"""The pieces the audit runner orchestrates (other areas' libraries), injectable for tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Components:
    """Callables the runner uses; defaults are memaudit's own. Tests may swap one."""

    load_model: Callable[..., Any]
    open_index: Callable[[str], Any]
    build_index: Callable[..., Any]
    make_criterion: Callable[[str, Any], Any]
    make_method: Callable[[str, dict[str, Any]], Any]
    sample: Callable[..., Any]
    read_prompts: Callable[[str], list[Any]]
    screen_prompts: Callable[..., np.ndarray]
    calibrate_threshold: Callable[[np.ndarray, float], float]
    alignment: Callable[[Any, list[str], Any], list[float | None]] | None = None
    quality: Callable[..., Any] | None = None  # QualityStage(spec, index, model, device, log)


def make_method(spec: str, params: dict[str, Any]) -> Any:
    """A guidance from a method spec ("amg:spe,dup") and the plan's [params.METHOD] tables."""
    from memaudit.guidance import build_guidance, params_from_table

    return build_guidance(spec, params_from_table(params))


_CLASSIFIERS: dict[str, Any] = {}


def _digits_alignment(model: Any, prompts: list[str], images: Any) -> list[float | None]:
    """Canary text alignment (METHODS 4): 1 when the digit classifier reads the prompt's
    digit in the image, 0 when not, None for prompts that name no digit."""
    from memaudit.canary.digits import DigitClassifier, digit_of_prompt

    want = [digit_of_prompt(p) for p in prompts]
    if all(w is None for w in want):
        return [None] * len(prompts)
    if "digits" not in _CLASSIFIERS:
        _CLASSIFIERS["digits"] = DigitClassifier()
    got = np.asarray(_CLASSIFIERS["digits"].predict(images)).reshape(-1)
    return [None if w is None else float(int(g) == int(w)) for w, g in zip(want, got,
                                                                            strict=True)]


def default_components() -> Components:
    from memaudit.audit.quality import QualityStage
    from memaudit.criteria import make_criterion
    from memaudit.data.prompts import read_prompts
    from memaudit.index import TrainingIndex, build_index
    from memaudit.models import load_model
    from memaudit.sampler import sample
    from memaudit.screen import calibrate_threshold, screen_prompts

    try:  # the canary's digit classifier (text alignment, METHODS 4), when installed
        import memaudit.canary.digits  # noqa: F401

        alignment = _digits_alignment
    except ImportError:
        alignment = None
    return Components(load_model=load_model, open_index=TrainingIndex.open,
                      build_index=build_index, make_criterion=make_criterion,
                      make_method=make_method, sample=sample, read_prompts=read_prompts,
                      screen_prompts=screen_prompts, calibrate_threshold=calibrate_threshold,
                      alignment=alignment, quality=QualityStage)

