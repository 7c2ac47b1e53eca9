"""`cwr` caption word repetition (Somepalli et al. NeurIPS 2023; METHODS.md 3.3): insert n = 4
words drawn uniformly (with replacement) from the prompt itself at uniformly random word
positions, seeded per row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memaudit.guidance.base import Guidance
from memaudit.guidance.perturb import insert_items, row_rng
from memaudit.models.base import TEXT


class CWR(Guidance):
    name = "cwr"
    requires = frozenset({TEXT})

    @dataclass
    class Params:
        n: int = 4

    def prepare_prompts(self, prompts: list[str], seeds: list[int], model: Any) -> list[str]:
        out = []
        for p, s in zip(prompts, seeds, strict=True):
            words = p.split()
            if not words:
                out.append(p)
                continue
            rng = row_rng(s, 3)
            items = [words[int(i)] for i in rng.integers(0, len(words), self.params.n)]
            out.append(insert_items(p, items, rng))
        return out
