"""Statistics of screening scores (METHODS 2): the calibrated threshold, ROC AUC and the true
positive rate at a false-positive rate. A prompt is flagged when its score is strictly above
the threshold, whatever the score."""

from __future__ import annotations

import numpy as np

from memaudit.common import UserError


def calibrate_threshold(clean_scores: np.ndarray, fpr: float = 0.01) -> float:
    """Smallest threshold among the clean scores with at most `fpr` of them strictly above it
    (a prompt is flagged when score > threshold): the (floor(fpr n) + 1)-th largest."""
    s = np.sort(np.asarray(clean_scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise UserError("no clean prompts to calibrate the screening threshold on")
    if not 0 <= fpr < 1:
        raise UserError(f"--fpr must be in [0, 1), got {fpr}")
    k = int(np.floor(fpr * s.size + 1e-9))
    return float(s[min(k, s.size - 1)])


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC = P(pos > neg) + 0.5 P(pos == neg) (Mann-Whitney U with ties as halves)."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        raise UserError("AUC needs at least one positive and one negative score")
    allv = np.concatenate([pos, neg])
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # average rank of each distinct value (1-based)
    avg_rank = upper - (counts - 1) / 2.0
    ranks = avg_rank[inv]
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    """Share of positives flagged (score > threshold) at the threshold calibrated on `neg`."""
    thr = calibrate_threshold(neg, fpr)
    return float(np.mean(np.asarray(pos, dtype=np.float64) > thr))
