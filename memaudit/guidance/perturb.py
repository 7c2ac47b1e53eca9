"""Shared helpers of the prompt perturbations (Somepalli et al., "Understanding and Mitigating
Copying in Diffusion Models", NeurIPS 2023; METHODS.md 3.3).

n items (default 4) are inserted at uniformly random word positions; every random choice is
drawn from generators seeded by the row's generation seed, so a run is reproducible.
"""

from __future__ import annotations

import numpy as np
import torch


def row_rng(seed: int, salt: int = 0) -> np.random.Generator:
    """numpy generator of one row, seeded from its generation seed."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, salt])


def row_torch_generator(seed: int, salt: int = 0) -> torch.Generator:
    """torch CPU generator of one row, seeded from its generation seed."""
    return torch.Generator().manual_seed(int(seed) * 1000003 + salt)


def insert_items(prompt: str, items: list[str], rng: np.random.Generator) -> str:
    """Insert each item at a uniformly random word position (0..len(words), inclusive)."""
    words = prompt.split()
    for item in items:
        pos = int(rng.integers(0, len(words) + 1))
        words.insert(pos, item)
    return " ".join(words)
