"""`rna` random number addition (Somepalli et al. NeurIPS 2023; METHODS.md 3.3): insert n = 4
random integers in [0, 100000) at uniformly random word positions, seeded per row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memaudit.guidance.base import Guidance
from memaudit.guidance.perturb import insert_items, row_rng
from memaudit.models.base import TEXT


class RNA(Guidance):
    name = "rna"
    requires = frozenset({TEXT})

    @dataclass
    class Params:
        n: int = 4
        high: int = 100000

    def prepare_prompts(self, prompts: list[str], seeds: list[int], model: Any) -> list[str]:
        out = []
        for p, s in zip(prompts, seeds, strict=True):
            rng = row_rng(s, 1)
            items = [str(int(v)) for v in rng.integers(0, self.params.high, self.params.n)]
            out.append(insert_items(p, items, rng))
        return out
