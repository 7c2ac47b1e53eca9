"""Reproduction of a known training image (issue 17; docs/criteria.md "Reproduction").

A generation *reproduces* its prompt's target (the training image the prompt is known to
trigger: a canary trigger's planted image, a `target_key` column of a trigger list) when the
nearest training item belongs to the target's exact-duplicate group and the criterion's fixed,
published cut passes (nL2 < 1.4, AMG Eq. 8; SSCD > 0.5). This counts what the eye sees: a
pixel criterion calibrated at 1% FPR counts only near-exact copies, and guidance-induced
reproductions are contrast-amplified copies that it misses. It is a column beside the copy
verdicts, not a criterion of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from memaudit.criteria.base import Scores


def target_groups(index, target_keys: Sequence[str | None]) -> np.ndarray:
    """Duplicate-group id of each target key in `index` (-1: no target, or a key the index
    does not hold)."""
    keys = [k if k else None for k in target_keys]
    rows = index.rows_of_keys([k or "" for k in keys])
    out = np.full(len(keys), -1, dtype=np.int64)
    ok = (rows >= 0) & np.array([k is not None for k in keys], dtype=bool)
    out[ok] = index.group_of_rows(rows[ok])
    return out


def reproduced(index, scores: Scores, groups: np.ndarray) -> list[bool | None]:
    """Per image: None without a target (group -1), else whether the nearest item is in the
    target's group and the fixed cut passes."""
    near = index.group_of_rows(np.asarray(scores.neighbour, dtype=np.int64))
    return [None if g < 0 else bool(n == g and c)
            for g, n, c in zip(np.asarray(groups), near, scores.is_copy, strict=True)]
