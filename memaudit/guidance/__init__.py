"""Mitigations as guidances. Adding one: a file here and one registry line below."""

from __future__ import annotations

from typing import Any

from memaudit.common import UserError
from memaudit.guidance.amg import AMG
from memaudit.guidance.auto import Auto
from memaudit.guidance.base import Guidance, StepState
from memaudit.guidance.cfg import CFG
from memaudit.guidance.cwr import CWR
from memaudit.guidance.dynamic import Dynamic
from memaudit.guidance.gni import GNI
from memaudit.guidance.init_noise import InitNoise
from memaudit.guidance.opposite import Opposite, OppositeDynamic
from memaudit.guidance.reanchor import Reanchor
from memaudit.guidance.rna import RNA
from memaudit.guidance.rta import RTA
from memaudit.guidance.static import Static
from memaudit.guidance.wen import Wen

REGISTRY: dict[str, type[Guidance]] = {
    "cfg": CFG,
    "static": Static,
    "dynamic": Dynamic,
    "opposite": Opposite,
    "opposite-dynamic": OppositeDynamic,
    "amg": AMG,
    "rna": RNA,
    "rta": RTA,
    "cwr": CWR,
    "gni": GNI,
    "wen": Wen,
    "init-noise": InitNoise,
    "reanchor": Reanchor,
    "auto": Auto,
}


def make_guidance(name: str, **params: Any) -> Guidance:
    """Instantiate a registered guidance; unknown names are a one-line error."""
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**params)


__all__ = ["REGISTRY", "Guidance", "StepState", "make_guidance"]

from memaudit.guidance.spec import (  # noqa: E402
    build_guidance,
    params_from_table,
    parse_method_spec,
    parse_params,
)

__all__ += ["build_guidance", "parse_method_spec", "params_from_table", "parse_params"]
