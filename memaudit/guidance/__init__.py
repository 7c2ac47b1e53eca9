"""Mitigations as guidances. Adding one: a file here and one registry line below."""

from __future__ import annotations

from typing import Any

from memaudit.common import UserError
from memaudit.guidance.base import Guidance, StepState
from memaudit.guidance.cfg import CFG

REGISTRY: dict[str, type[Guidance]] = {
    "cfg": CFG,
}


def make_guidance(name: str, **params: Any) -> Guidance:
    """Instantiate a registered guidance; unknown names are a one-line error."""
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**params)


__all__ = ["REGISTRY", "Guidance", "StepState", "make_guidance"]
