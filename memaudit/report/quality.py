"""The report's "Quality and alignment" table: per method, the copy rate beside text alignment,
CLIP score and the quality distances (KID +- std, FD) with their feature space and n, each as
a ratio to `cfg` in the same run (METHODS 4)."""

from __future__ import annotations

from typing import Any


def quality_rows(store: Any, rid: int, methods: list[str], criterion: str | None,
                 calibrated: bool) -> list[dict[str, Any]]:
    """One row per method x feature space (one per method when the run has no quality)."""
    cost = {r["method"]: r for r in store.query(
        "SELECT * FROM method_cost WHERE run_id = ?", [rid])}
    copy = {r["method"]: r for r in store.query(
        "SELECT method, copy_rate_fixed, copy_rate_calibrated FROM method_summary "
        "WHERE run_id = ? AND criterion = ?", [rid, criterion])} if criterion else {}
    qual: dict[str, list[dict[str, Any]]] = {}
    for r in store.query("SELECT * FROM method_quality WHERE run_id = ? ORDER BY features",
                         [rid]):
        qual.setdefault(r["method"], []).append(r)
    cfg_copy = copy.get("cfg", {}).get("copy_rate_calibrated" if calibrated
                                       else "copy_rate_fixed")
    rows = []
    for m in methods:
        c, k = cost.get(m, {}), copy.get(m, {})
        rate = k.get("copy_rate_calibrated" if calibrated else "copy_rate_fixed")
        base = {"method": m, "copy_rate": rate,
                "copy_ratio": None if rate is None or not cfg_copy else rate / cfg_copy,
                "alignment": c.get("alignment"),
                "alignment_ratio": c.get("alignment_ratio_to_cfg"),
                "clip_score": c.get("clip_score"),
                "clip_score_ratio": c.get("clip_score_ratio_to_cfg"),
                "unet_ratio": c.get("unet_ratio_to_cfg"), "features": None}
        for i, q in enumerate(qual.get(m) or [None]):
            row = dict(base, first=i == 0, span=len(qual.get(m) or [None]))
            if q is not None:
                row.update({"features": q["features"], "n": q["n"],
                            "n_reference": q["n_reference"], "kid": q["kid"],
                            "kid_std": q["kid_std"], "kid_subset_size": q["kid_subset_size"],
                            "fd": q["fd"], "fd_ratio": q["fd_ratio_to_cfg"]})
            rows.append(row)
    return rows
