"""Calibration of the copy criteria on the training set itself (METHODS.md 1.2).

For a seeded sample of training ITEMS (default 2,000, without replacement; METHODS 1.2 "for
a sample of training items"), each item is scored against the rest of the index EXCLUDING
its own exact-duplicate group (leave-one-group-out): this is the null distribution of a
criterion on images that are certainly not copies of anything else in the set (Somepalli et
al. 2023 use the same train-vs-train second-neighbour baseline). Sampling items rather than
groups weights a group by its size, as the training set does: an image planted 64 times is
64 times as likely to be drawn (its copies share one vector, so they share one score).
The calibrated threshold at false-positive rate f is the f-quantile of the null scores from
below for lower-is-copy criteria (nl2, l2-tiled) and the (1 - f)-quantile for higher-is-copy
ones (sscd, clip).

`calibrate_index(index, sample=2000, fprs=(0.01, 0.001), seed=0) -> dict` returns what goes
into manifest["calibration"]:

    {"settings": {"sample", "sampled", "unit", "items", "groups", "seed", "fprs",
                  "exclusion", "k", "k_effective", "alpha", "grid", "embedder", "metric",
                  "quantile_method", "seconds"},
     "nl2": {"direction": "lower", "n": 2000, "fpr": {"0.01": t1, "0.001": t2},
             "quantiles": {"0.001": ..., "0.5": ...}, "min", "mean", "max",
             "fixed_threshold": 1.4, "fixed_flag_rate": share of the null flagged at 1.4,
             "extra_flag_rates": {"copy@1.6": ...}}, "l2-tiled": {...}}
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from memaudit.common import UserError, progress_bar
from memaudit.criteria.common import embedder_name, fpr_key, supported_criteria

QUANTILES = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)


def threshold_at_fpr(null_scores: np.ndarray, fpr: float, higher_is_copy: bool) -> float:
    """The score beyond which a share `fpr` of the null distribution lies (numpy's linear
    quantile): from below for lower-is-copy criteria, from above for higher-is-copy ones."""
    q = 1.0 - fpr if higher_is_copy else fpr
    return float(np.quantile(np.asarray(null_scores, np.float64), q))


def summarise(null_scores: np.ndarray, crit: Any, fprs: Sequence[float]) -> dict:
    """Null-distribution summary and thresholds of one criterion (see module docstring)."""
    s = np.asarray(null_scores, np.float64)
    higher = bool(crit.higher_is_more_similar)
    out: dict[str, Any] = {
        "direction": "higher" if higher else "lower",
        "n": int(len(s)),
        "fpr": {fpr_key(f): threshold_at_fpr(s, f, higher) for f in fprs},
        "quantiles": {fpr_key(q): float(np.quantile(s, q)) for q in QUANTILES},
        "min": float(s.min()), "mean": float(s.mean()), "max": float(s.max()),
        "fixed_threshold": float(crit.threshold),
        "fixed_flag_rate": float(np.mean(crit.is_copy(s))),
        "extra_flag_rates": {label: float(np.mean(crit.is_copy(s, t)))
                             for label, t in crit.extra_thresholds.items()},
    }
    small = [fpr_key(f) for f in fprs if f * len(s) < 1]
    if small:
        out["note"] = (f"fpr {', '.join(small)} is below 1/n for n={len(s)}: the threshold is "
                       "the sample's extreme, raise --sample")
    return out


def check_calibration_args(sample: int, fprs: Sequence[float]) -> None:
    """`UserError` unless sample >= 1 and every false-positive rate is in (0, 1)."""
    if int(sample) < 1:
        raise UserError(f"--sample must be at least 1, got {sample}")
    if not list(fprs):
        raise UserError("give at least one --fpr")
    for f in fprs:
        if not 0.0 < float(f) < 1.0:
            raise UserError(f"--fpr must be between 0 and 1 (exclusive), got {f:g}")


def null_scores(crit: Any, group_ids: np.ndarray, batch: int = 512) -> np.ndarray:
    """Leave-one-out scores of the given groups' representatives against the other groups."""
    group_ids = np.asarray(group_ids, np.int64)
    out = []
    with progress_bar(f"calibrate {crit.name}", total=len(group_ids), unit="groups") as adv:
        for start in range(0, len(group_ids), batch):
            ids = group_ids[start:start + batch]
            vectors = crit.groups.gather(ids)
            out.append(np.asarray(crit.score_vectors(vectors, exclude=ids)[0], np.float64))
            adv(len(ids))
    return np.concatenate(out) if out else np.zeros(0)


def calibrate_index(index: Any, sample: int = 2000, fprs: Sequence[float] = (0.01, 0.001),
                    seed: int = 0, k: int = 50, alpha: float = 0.5, grid: int = 4,
                    criteria: Sequence[str] | None = None) -> dict:
    """Null distributions and calibrated thresholds of every criterion the index supports
    (pixels: nl2, l2-tiled; sscd: sscd; clip: clip) -> the manifest "calibration" dict."""
    from memaudit.criteria import make_criterion

    t0 = time.perf_counter()
    check_calibration_args(sample, fprs)
    fprs = [float(f) for f in fprs]
    ngroups = int(index.index.ntotal)
    names = list(criteria) if criteria is not None else list(supported_criteria(index))
    rng = np.random.default_rng(seed)
    nitems = int(index.nitems)
    n = min(int(sample), nitems)
    rows = np.sort(rng.choice(nitems, size=n, replace=False)) if n > 0 else np.zeros(0, int)
    # each item's own group (repeated for duplicates), read for the sampled rows only
    sampled = np.asarray(index.group_of_rows(rows), np.int64)
    settings: dict[str, Any] = {
        "sample": int(sample), "sampled": int(n), "unit": "training items",
        "items": nitems, "groups": ngroups, "seed": int(seed),
        "fprs": [fpr_key(f) for f in fprs],
        "exclusion": "own exact-duplicate group (leave-one-out over groups)",
        "k": int(k), "k_effective": int(max(0, min(k, ngroups - 1))), "alpha": float(alpha),
        "grid": int(grid), "embedder": embedder_name(index),
        "metric": str(index.manifest.get("metric")), "quantile_method": "numpy linear",
    }
    result: dict[str, Any] = {"settings": settings}
    if ngroups < 2:
        settings["note"] = "fewer than 2 duplicate groups: nothing to calibrate against"
        settings["seconds"] = time.perf_counter() - t0
        return result
    for name in names:
        opts: dict[str, Any] = {"calibrated_threshold": None}
        if name == "nl2":
            opts.update(k=k, alpha=alpha)
        elif name == "l2-tiled":
            opts.update(grid=grid, k=k)
        crit = make_criterion(name, index, **opts)
        result[name] = summarise(null_scores(crit, sampled), crit, fprs)
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    return result
