"""`rta` random token addition (Somepalli et al. NeurIPS 2023; METHODS.md 3.3): insert n = 4
random tokenizer tokens (decoded, from `model.random_tokens`) at uniformly random word
positions, seeded per row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memaudit.guidance.base import Guidance
from memaudit.guidance.perturb import insert_items, row_rng, row_torch_generator
from memaudit.models.base import TEXT


class RTA(Guidance):
    name = "rta"
    requires = frozenset({TEXT})

    @dataclass
    class Params:
        n: int = 4

    def prepare_prompts(self, prompts: list[str], seeds: list[int], model: Any) -> list[str]:
        out = []
        for p, s in zip(prompts, seeds, strict=True):
            tokens = model.random_tokens(self.params.n, row_torch_generator(s, 2))
            tokens = [t.strip() or t for t in tokens]
            out.append(insert_items(p, list(tokens), row_rng(s, 2)))
        return out
