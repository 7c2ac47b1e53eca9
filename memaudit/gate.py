"""`memaudit gate`: pass/fail an audit for CI (exit 0 pass, 1 fail, 2 usage or input error,
3 incomplete: the run is unfinished or failed, which is never a pass).

Two modes:
- `gate_db`: read an audit database and fail when a method's copy rate under a criterion
  exceeds `max_copy_rate`, or a screened prompt's score exceeds `max_screen_score`
  (METHODS 1 copy verdicts; METHODS 2 screening). The copy verdict is the index-calibrated
  one where the index has a calibration (METHODS 1.2 "Calibration"), else the fixed one,
  unless `threshold` forces one; the result says which was used. The run's status is read
  first: a run that is still `running` (or was killed) or `failed` gates INCOMPLETE (exit 3)
  whatever its committed units show.
- `--max-quality-loss X` (`gate_db(max_quality_loss=X)`): fail a method whose image quality
  or text alignment is more than X (a fraction) worse than `cfg`'s in the same run (METHODS
  4): FD above (1 + X) x cfg's in a feature space, or digit agreement / CLIP score below
  (1 - X) x cfg's.
- `gate_screen`: screening only (METHODS 2, 2.1), straight from a model and a prompt
  list, no generation: the fast per-checkpoint check.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memaudit.common import EXIT_FAIL, EXIT_INCOMPLETE, EXIT_OK, UserError
from memaudit.store import AuditStore
from memaudit.text import terminal_text, xml_text

THRESHOLD_KINDS = ("auto", "calibrated", "fixed")


@dataclass
class Check:
    """One gate condition: `value` compared with `limit` (pass when value <= limit)."""

    name: str
    value: float
    limit: float
    passed: bool
    detail: str
    offending: list[dict[str, Any]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # the figures, for the report's words


@dataclass
class GateResult:
    checks: list[Check]
    source: str
    incomplete: str | None = None  # why the audit cannot be gated (unfinished/failed run)

    @property
    def passed(self) -> bool:
        return self.incomplete is None and all(c.passed for c in self.checks)

    @property
    def verdict(self) -> str:
        return "INCOMPLETE" if self.incomplete else "PASS" if self.passed else "FAIL"

    @property
    def exit_code(self) -> int:
        if self.incomplete:
            return EXIT_INCOMPLETE
        return EXIT_OK if self.passed else EXIT_FAIL


def gate_db(db: str | Path, *, criteria: list[str] | None = None,
            methods: list[str] | None = None, max_copy_rate: float | None = 0.0,
            max_screen_score: float | None = None, threshold: str = "auto",
            run_id: int | None = None, max_quality_loss: float | None = None) -> GateResult:
    """Evaluate the gate on one run (default the latest) of an audit database."""
    if threshold not in THRESHOLD_KINDS:
        raise UserError(f"--threshold must be one of {', '.join(THRESHOLD_KINDS)}")
    if max_copy_rate is None and max_screen_score is None and max_quality_loss is None:
        raise UserError("nothing to gate on: give --max-copy-rate, --max-screen-score and/or "
                        "--max-quality-loss")
    checks: list[Check] = []
    with AuditStore(db, read_only=True) as store:
        run = store.run(run_id)
        rid = int(run["id"])
        incomplete = _incomplete(store, run)
        try:
            if max_copy_rate is not None:
                checks += _copy_checks(store, rid, criteria, methods, max_copy_rate, threshold)
            if max_screen_score is not None:
                checks.append(_screen_check_db(store, rid, max_screen_score))
            if max_quality_loss is not None:
                checks += _quality_checks(store, rid, methods, max_quality_loss)
        except UserError:
            if incomplete is None:
                raise
            # an unfinished run may have nothing to check yet; the verdict is INCOMPLETE
    return GateResult(checks=checks, source=f"{db} (run {rid})", incomplete=incomplete)


def _incomplete(store: AuditStore, run: dict[str, Any]) -> str | None:
    """Why a run cannot pass (None when it finished)."""
    status = str(run.get("status"))
    if status == "finished":
        bad = store.query(  # written before NaN became an error of its unit
            "SELECT (SELECT count(*) FROM matches m JOIN generations g ON g.id = "
            "m.generation_id WHERE g.run_id = ? AND NOT isfinite(m.score)) + (SELECT count(*) "
            "FROM screens WHERE run_id = ? AND NOT isfinite(score)) AS n",
            [int(run["id"]), int(run["id"])])[0]["n"]
        return None if not bad else (
            f"run {run['id']} holds {bad} NaN or infinite score(s): a score that is not a "
            "number is never a pass; rerun the audit with --new-run")
    units = store.con.execute("SELECT count(*) FROM units WHERE run_id = ?",
                              [int(run["id"])]).fetchone()[0]
    why = ("an error ended it part-way" if status == "failed"
           else "still running, or killed part-way")
    return (f"run {run['id']} is {status} ({why}; {units} unit(s) committed): an unfinished "
            "audit is never a pass; rerun `memaudit audit PLAN` to finish it")


def _copy_checks(store: AuditStore, rid: int, criteria: list[str] | None,
                 methods: list[str] | None, limit: float, threshold: str) -> list[Check]:
    have = store.query("SELECT DISTINCT g.method, m.criterion FROM generations g "
                       "JOIN matches m ON m.generation_id = g.id WHERE g.run_id = ? "
                       "ORDER BY 1, 2", [rid])
    all_methods = list(dict.fromkeys(r["method"] for r in have))
    all_crit = list(dict.fromkeys(r["criterion"] for r in have))
    if not have:
        raise UserError("the run has no scored generations to gate on")
    for name, want, known in (("criterion", criteria, all_crit),
                              ("method", methods, all_methods)):
        for w in want or []:
            if w not in known:
                raise UserError(f"{name} {w!r} not in this run; it has: {', '.join(known)}")
    checks = []
    for crit in criteria or all_crit:
        cal = store.con.execute(
            "SELECT count(*) FILTER (WHERE m.is_copy_calibrated IS NULL), count(*) "
            "FROM matches m JOIN generations g ON g.id = m.generation_id "
            "WHERE g.run_id = ? AND m.criterion = ?", [rid, crit]).fetchone()
        has_cal = cal[1] > 0 and cal[0] == 0
        if threshold == "calibrated" and not has_cal:
            raise UserError(f"criterion {crit!r} has no calibrated threshold in this run "
                            "(the index has no calibration); use --threshold fixed")
        kind = "calibrated" if (threshold == "calibrated" or
                                (threshold == "auto" and has_cal)) else "fixed"
        col = "m.is_copy_calibrated" if kind == "calibrated" else "m.is_copy"
        thr_col = "m.calibrated_threshold" if kind == "calibrated" else "m.threshold"
        for method in methods or all_methods:
            # `col`/`thr_col` are one of two fixed column names chosen above, never user text
            r = store.con.execute(
                f"SELECT count(*), count(*) FILTER (WHERE {col}), any_value({thr_col}) "
                "FROM matches m JOIN generations g ON g.id = m.generation_id "
                "WHERE g.run_id = ? AND m.criterion = ? AND g.method = ?",
                [rid, crit, method]).fetchone()
            n, copies, thr = int(r[0]), int(r[1]), r[2]
            if n == 0:
                continue
            rate = copies / n
            off = store.query(
                f"SELECT p.text AS prompt, p.label, count(*) FILTER (WHERE {col}) AS copies, "
                "count(*) AS n, CASE WHEN bool_and(m.higher_is_more_similar) THEN max(m.score) "
                "ELSE min(m.score) END AS best_score, "
                "arg_max(m.neighbour_key, m.similarity) AS neighbour_key "
                "FROM matches m JOIN generations g ON g.id = m.generation_id "
                "JOIN prompts p ON p.id = g.prompt_id "
                "WHERE g.run_id = ? AND m.criterion = ? AND g.method = ? "
                f"GROUP BY p.text, p.label HAVING count(*) FILTER (WHERE {col}) > 0 "
                "ORDER BY copies DESC, p.text",
                [rid, crit, method])
            thr_s = "?" if thr is None else f"{thr:.4g}"
            checks.append(Check(
                name=f"copy_rate[{method},{crit}]", value=rate, limit=limit,
                passed=rate <= limit,
                detail=(f"{method}: {copies}/{n} generations are copies by {crit} "
                        f"({kind} threshold {thr_s}); copy rate {rate:.3f}, limit {limit:g}"),
                offending=off, facts={"method": method, "criterion": crit, "copies": copies,
                                      "n": n, "kind": kind, "threshold": thr}))
    if not checks:
        raise UserError("no generations match the requested method(s) and criterion(s)")
    return checks


def _quality_checks(store: AuditStore, rid: int, methods: list[str] | None,
                    limit: float) -> list[Check]:
    """Quality and alignment of each method relative to cfg's in the same run (METHODS 4)."""
    cost = {r["method"]: r for r in store.query(
        "SELECT * FROM method_cost WHERE run_id = ?", [rid])}
    if "cfg" not in cost:
        raise UserError("--max-quality-loss is relative to cfg, and this run has no cfg")
    for w in methods or []:
        if w not in cost:
            raise UserError(f"method {w!r} not in this run; it has: {', '.join(cost)}")
    quality = store.query("SELECT * FROM method_quality WHERE run_id = ? AND method != 'cfg' "
                          "ORDER BY method, features", [rid])
    checks = []
    for m in [m for m in methods or list(cost) if m != "cfg"]:
        for q in (q for q in quality if q["method"] == m and q["fd_ratio_to_cfg"] is not None):
            loss = q["fd_ratio_to_cfg"] - 1.0
            checks.append(Check(
                name=f"quality[{m},{q['features']}]", value=loss, limit=limit,
                passed=loss <= limit,
                detail=(f"{m}: FD {q['fd']:.4g} vs cfg {q['cfg_fd']:.4g} in {q['features']} "
                        f"(n {q['n']}, reference {q['n_reference']}; KID {q['kid']:.4g} "
                        f"± {q['kid_std']:.2g} vs cfg {q['cfg_kid']:.4g}); quality loss "
                        f"{loss:+.3f}, limit {limit:g}")))
        for key, what in (("alignment", "digit agreement"), ("clip_score", "CLIP score")):
            v, base = cost[m][key], cost["cfg"][key]
            if v is None or not base:
                continue
            loss = 1.0 - v / base
            checks.append(Check(
                name=f"{key}[{m}]", value=loss, limit=limit, passed=loss <= limit,
                detail=(f"{m}: {what} {v:.4g} vs cfg {base:.4g}; loss {loss:+.3f}, "
                        f"limit {limit:g}")))
    if not checks:
        raise UserError("no quality or alignment figures to compare with cfg in this run "
                        "(plan quality = false, no alignment, no CLIP model?)")
    return checks


def _screen_check_db(store: AuditStore, rid: int, limit: float) -> Check:
    rows = store.query("SELECT p.text AS prompt, p.label, s.score, s.steps, s.seeds "
                       "FROM screens s JOIN prompts p ON p.id = s.prompt_id "
                       "WHERE s.run_id = ? ORDER BY s.score DESC", [rid])
    if not rows:
        raise UserError("the run has no screening scores; add a [screen] table to the plan "
                        "or use `memaudit gate --screen`")
    return _screen_check([r["prompt"] for r in rows], np.array([r["score"] for r in rows]),
                         limit, "given threshold", [r["label"] for r in rows])


def _screen_check(prompts: list[str], scores: np.ndarray, limit: float, how: str,
                  labels: list[str | None] | None = None) -> Check:
    labels = labels or [None] * len(prompts)
    off = [{"prompt": p, "label": lab, "score": float(s)}
           for p, s, lab in zip(prompts, scores, labels, strict=True) if s > limit]
    off.sort(key=lambda r: -r["score"])
    worst = float(np.max(scores)) if len(scores) else 0.0
    return Check(name="screen_score", value=worst, limit=limit, passed=not off,
                 detail=(f"{len(off)}/{len(prompts)} prompts screen above {limit:.4g} "
                         f"({how}); max score {worst:.4g}"),
                 offending=off)


def gate_screen(model: str, prompts: str | Path, *, max_screen_score: float | None = None,
                calibrate: str | Path | None = None, fpr: float = 0.01, steps: int = 1,
                seeds: int = 4, device: str | None = None, score: str | None = None
                ) -> GateResult:
    """Screening-only gate: score a prompt list on a model (no generation, METHODS 2); `score`
    a memaudit.screen score (default: the default score)."""
    if (max_screen_score is None) == (calibrate is None):
        raise UserError("--screen needs exactly one of --max-screen-score X or --calibrate CLEAN")
    from memaudit.data.prompts import read_prompts
    from memaudit.models import load_model
    from memaudit.screen import calibrate_threshold, screen_prompts

    texts = [r.text for r in read_prompts(str(prompts))]
    if not texts:
        raise UserError(f"{prompts} holds no prompts")
    m = load_model(model, device)
    scores = np.asarray(screen_prompts(m, texts, steps=steps, seeds=seeds, score=score),
                        dtype=float)
    if calibrate is not None:
        clean = [r.text for r in read_prompts(str(calibrate))]
        clean_scores = np.asarray(screen_prompts(m, clean, steps=steps, seeds=seeds,
                                                 score=score), float)
        limit = float(calibrate_threshold(clean_scores, fpr))
        how = f"threshold calibrated on {len(clean)} clean prompts at {fpr:g} FPR"
    else:
        assert max_screen_score is not None
        limit, how = float(max_screen_score), "given threshold"
    from memaudit.screen import DEFAULT_SCORE

    how += f"; score {score or DEFAULT_SCORE}"
    return GateResult(checks=[_screen_check(texts, scores, limit, how)],
                      source=f"{model} on {prompts}")


def format_result(res: GateResult, max_rows: int = 20) -> str:
    """The text the CLI prints: verdict, one line per check, offending prompts (every line
    through the terminal sanitiser: prompts are untrusted)."""
    lines = [f"memaudit gate: {res.verdict} ({res.source})"]
    if res.incomplete:
        lines.append(f"  [INCOMPLETE] {res.incomplete}")
    for c in res.checks:
        lines.append(f"  [{'pass' if c.passed else 'FAIL'}] {c.name}: {c.detail}")
    for c in res.checks:
        if c.passed or not c.offending:
            continue
        lines.append(f"\noffending prompts for {c.name}:")
        if c.name.startswith("copy_rate"):
            lines.append(f"  {'copies':>7}  {'best':>8}  {'neighbour':<24}  prompt")
            for r in c.offending[:max_rows]:
                lines.append(f"  {r['copies']:>3}/{r['n']:<3}  {r['best_score']:>8.4g}  "
                             f"{str(r['neighbour_key'])[:24]:<24}  {_one_line(r['prompt'])}")
        else:
            lines.append(f"  {'score':>8}  prompt")
            for r in c.offending[:max_rows]:
                lines.append(f"  {r['score']:>8.4g}  {_one_line(r['prompt'])}")
        if len(c.offending) > max_rows:
            lines.append(f"  ... and {len(c.offending) - max_rows} more")
    return "\n".join(terminal_text(line) for line in "\n".join(lines).split("\n"))


def _one_line(s: str, n: int = 80) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _offending_line(r: dict[str, Any]) -> str:
    if "copies" in r:
        return (f"{r['copies']}/{r['n']} copies, best score {r['best_score']:.4g}, "
                f"neighbour {r['neighbour_key']}: {r['prompt']}")
    return f"score {r['score']:.4g}: {r['prompt']}"


def write_junit(res: GateResult, path: str | Path) -> Path:
    """JUnit XML: one testcase per check, a <failure> listing the offending prompts; an
    incomplete run is one <error> testcase. Every text goes through the XML sanitiser and
    the file is written atomically."""
    from memaudit.paths import atomic_write

    path = Path(path)
    failures = sum(not c.passed for c in res.checks)
    errors = 1 if res.incomplete else 0
    tests = len(res.checks) + errors
    suites = ET.Element("testsuites", name="memaudit", tests=str(tests),
                        failures=str(failures), errors=str(errors))
    suite = ET.SubElement(suites, "testsuite", name="memaudit gate",
                          tests=str(tests), failures=str(failures), errors=str(errors))
    ET.SubElement(ET.SubElement(suite, "properties"), "property", name="source",
                  value=xml_text(res.source))
    if res.incomplete:
        case = ET.SubElement(suite, "testcase", classname="memaudit.gate", name="run_status")
        ET.SubElement(case, "error", message=xml_text(res.incomplete), type="AuditIncomplete")
    for c in res.checks:
        case = ET.SubElement(suite, "testcase", classname="memaudit.gate",
                             name=xml_text(c.name))
        if c.passed:
            ET.SubElement(case, "system-out").text = xml_text(c.detail)
        else:
            fail = ET.SubElement(case, "failure", message=xml_text(c.detail),
                                 type="GateFailure")
            fail.text = xml_text("\n".join(_offending_line(r) for r in c.offending))
    with atomic_write(path, "JUnit file") as tmp:
        ET.ElementTree(suites).write(tmp, encoding="utf-8", xml_declaration=True)
    return path
