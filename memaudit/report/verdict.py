"""The report's verdict, in words: the checks `memaudit gate DB` makes with its defaults (every
method x criterion of the run, no copy allowed, the calibrated threshold where the index has
a calibration, METHODS 1.2), so the page and the CI gate never disagree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memaudit.common import UserError


def gate_verdict(db: str | Path, run_id: int, methods: list[str],
                 criteria: list[str]) -> dict[str, Any]:
    """{verdict: PASS | FAIL | INCOMPLETE | NONE, reason, checks: [{passed, method,
    criterion, words}], failed_methods}: one sentence per gate check, in the plan's order of
    `methods` and `criteria`."""
    from memaudit.gate import gate_db

    try:
        res = gate_db(db, run_id=run_id, max_copy_rate=0.0)
    except UserError as e:  # e.g. a run without scored generations: nothing to gate on
        return {"verdict": "NONE", "reason": str(e), "checks": [], "failed_methods": []}
    checks = [{"passed": c.passed, "method": c.facts.get("method"),
               "criterion": c.facts.get("criterion"), "words": check_words(c.facts)}
              for c in res.checks]
    m_rank, c_rank = {m: i for i, m in enumerate(methods)}, {c: i for i, c in enumerate(criteria)}
    checks.sort(key=lambda c: (m_rank.get(c["method"], len(m_rank)),
                               c_rank.get(c["criterion"], len(c_rank))))
    failed = list(dict.fromkeys(c["method"] for c in checks if not c["passed"]))
    return {"verdict": res.verdict, "reason": res.incomplete, "checks": checks,
            "failed_methods": failed}


def check_words(f: dict[str, Any]) -> str:
    """One copy-rate check as a sentence a non-engineer reads (after the method's name)."""
    n, copies = int(f["n"]), int(f["copies"])
    thr = "" if f.get("threshold") is None else f" {f['threshold']:.4g}"
    how = f"by {f['criterion']} at the {f['kind']} threshold{thr}"
    if copies == 0:
        return f"none of its {n} generations copies a training image ({how})."
    return (f"{copies} of its {n} generations ({100 * copies / n:.1f}%) copy a training "
            f"image ({how}).")


def screening_words(screens: list[dict[str, Any]]) -> str | None:
    """The pre-generation screening (METHODS 2, 2.1) in one sentence, naming the score the
    database records (no name: a database from before scores had names, when Wen's was the
    only one) and its paper."""
    if not screens:
        return None
    flagged = sum(1 for s in screens if s["flagged"])
    thr = screens[0]["threshold"]
    at = "" if thr is None else f" above the threshold {thr:.4g}"
    name = screens[0].get("score_name") or "wen"
    paper = screens[0].get("score_paper") or ("Wen et al., ICLR 2024" if name == "wen" else "")
    by = f"{name} score" + (f", {paper}" if paper else "")
    return (f"Screening before generation ({by}): {flagged} of {len(screens)} "
            f"prompts score{at} and are predicted to be memorized.")
