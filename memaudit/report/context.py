"""The report's data: everything the template shows, read from an audit database (one run).

Summary per method (copy rate per criterion, fixed and calibrated; 95th percentile and most
similar score; alignment; cost relative to cfg), score distributions per method, screening
scores, every flagged output with the training item it copies, a table per prompt and method,
copy rate per prompt label, the transition-point methods' magnitude plots, quality,
provenance.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import numpy as np

from memaudit.common import UserError
from memaudit.report.images import _TrainingImages, image_file_uri
from memaudit.report.prompts import link_prompt_tables, prompt_anchor, prompt_rows
from memaudit.report.verdict import gate_verdict, screening_words
from memaudit.store import AuditStore


def _ordered(values: list[str], order: list[str]) -> list[str]:
    rank = {v: i for i, v in enumerate(order)}
    return sorted(values, key=lambda v: (rank.get(v, len(rank)), v))


def build_context(db: str | Path, run_id: int | None = None, max_flagged: int = 200,
                  index: str | Path | None = None, sources: list[str | Path] | None = None,
                  index_mismatch_ok: bool = False) -> dict[str, Any]:
    """Everything the template shows, read from the database (one run, default latest).

    `index`: the run's training index (default: the path the database records); an index
    whose content hash is not the run's is a `UserError` unless `index_mismatch_ok`, which
    the page then states at its top. `sources`: training files or folders the user names;
    images are read only from them and from files inside the index folder."""
    from memaudit.report.plots import distribution_svg
    from memaudit.report.quality import quality_rows

    db = Path(db)
    with AuditStore(db, read_only=True) as store:
        run = store.run(run_id)
        rid = int(run["id"])
        plan = json.loads(run["plan_json"])
        settings = json.loads(run["settings_json"] or "{}")
        summary = store.query("SELECT * FROM method_summary WHERE run_id = ?", [rid])
        method_order = list(plan.get("methods") or [])
        methods = _ordered(list({r["method"] for r in summary}), method_order)
        criteria = _ordered(list({r["criterion"] for r in summary}),
                            list(plan.get("criteria") or []))
        for r in summary:
            sign = 1.0 if r["higher_is_more_similar"] else -1.0
            r["p95_score"] = None if r["p95_similarity"] is None else sign * r["p95_similarity"]
            r["best_score"] = None if r["max_similarity"] is None else sign * r["max_similarity"]
        summary.sort(key=lambda r: (methods.index(r["method"]), criteria.index(r["criterion"])))
        has_cal = any(r["copy_rate_calibrated"] is not None for r in summary)

        crit_info = []
        plots = []
        for c in criteria:
            rows = store.query(
                "SELECT g.method, m.score, m.threshold, m.calibrated_threshold, "
                "m.higher_is_more_similar FROM matches m JOIN generations g "
                "ON g.id = m.generation_id WHERE g.run_id = ? AND m.criterion = ?", [rid, c])
            higher = bool(rows[0]["higher_is_more_similar"]) if rows else True
            crit_info.append({"name": c, "higher": higher})
            per = {m: np.array([r["score"] for r in rows if r["method"] == m]) for m in methods}
            per = {m: v for m, v in per.items() if v.size}
            plots.append(distribution_svg(
                per, c, threshold=rows[0]["threshold"] if rows else None,
                calibrated=rows[0]["calibrated_threshold"] if rows else None,
                higher_is_more_similar=higher))

            # flagged: a copy by the fixed or the calibrated verdict under any criterion
        flagged_rows = store.query(
            "SELECT g.id AS gid, g.method, g.seed, g.image_path, g.final_prompt, p.text AS "
            "prompt, p.label, m.criterion, m.score, m.similarity, m.higher_is_more_similar, "
            "m.is_copy, "
            "m.is_copy_calibrated, m.threshold, m.calibrated_threshold, m.neighbour_row, "
            "m.neighbour_key, m.neighbour_caption, m.dup_count "
            "FROM matches m JOIN generations g ON g.id = m.generation_id "
            "JOIN prompts p ON p.id = g.prompt_id "
            "WHERE g.run_id = ? AND (m.is_copy OR coalesce(m.is_copy_calibrated, false)) "
            "ORDER BY g.id, m.criterion", [rid])
        flagged_gens = store.query(
            "SELECT g.id AS gid, g.method, g.seed, g.image_path, p.text AS prompt, p.label "
            "FROM generations g JOIN prompts p ON p.id = g.prompt_id WHERE g.run_id = ? AND "
            "g.prompt_id IN (SELECT g2.prompt_id FROM matches m JOIN generations g2 ON g2.id = "
            "m.generation_id WHERE g2.run_id = ? AND (m.is_copy OR "
            "coalesce(m.is_copy_calibrated, false))) ORDER BY g.method, g.seed", [rid, rid])
        screens = store.query(
            "SELECT p.text AS prompt, p.label, s.score, s.steps, s.seeds, s.threshold, "
            "s.flagged, s.score_name, s.params_json FROM screens s "
            "JOIN prompts p ON p.id = s.prompt_id "
            "WHERE s.run_id = ? ORDER BY s.score DESC", [rid])
        for s in screens:  # the score's parameters and where they come from (METHODS 2.1)
            rec = _json_object(s.pop("params_json"))
            params, notes = rec.get("params"), rec.get("notes")
            s["score_params"] = params if isinstance(params, dict) else {}
            s["score_notes"] = [str(n) for n in notes] if isinstance(notes, list) else []
            s["score_paper"] = str(rec.get("paper") or "")
        pm = store.query("SELECT * FROM prompt_method WHERE run_id = ? ORDER BY prompt_id",
                         [rid])
        by_label = store.query(
            "SELECT g.method, p.label, m.criterion, count(*) AS n, "
            "avg(CASE WHEN m.is_copy THEN 1.0 ELSE 0.0 END) AS fixed, "
            "avg(CASE WHEN m.is_copy_calibrated THEN 1.0 ELSE 0.0 END) "
            "FILTER (WHERE m.is_copy_calibrated IS NOT NULL) AS calibrated, "
            "avg(CASE WHEN m.reproduced THEN 1.0 ELSE 0.0 END) "
            "FILTER (WHERE m.reproduced IS NOT NULL) AS reproduction "
            "FROM generations g JOIN prompts p ON p.id = g.prompt_id "
            "JOIN matches m ON m.generation_id = g.id WHERE g.run_id = ? "
            "GROUP BY ALL", [rid])
        label_order = [r[0] for r in store.con.execute(
            "SELECT p.label FROM prompts p JOIN generations g ON g.prompt_id = p.id "
            "WHERE g.run_id = ? GROUP BY p.label ORDER BY min(p.id)", [rid]).fetchall()]
        n_generations = store.con.execute(
            "SELECT count(*) FROM generations WHERE run_id = ?", [rid]).fetchone()[0]
        n_prompts = store.con.execute(
            "SELECT count(DISTINCT prompt_id) FROM generations WHERE run_id = ?",
            [rid]).fetchone()[0]
        align_n = store.con.execute(
            "SELECT count(alignment) FROM generations WHERE run_id = ?", [rid]).fetchone()[0]
        schema_version = store.schema_version
        magnitude_rows = _magnitude_rows(store, rid)
        quality = quality_rows(store, rid, methods, criteria[0] if criteria else None, has_cal)

    # flagged cards: copies by the verdict in use (calibrated where the criterion has a
    # calibration) first, then those only the fixed threshold flags (folded in the page);
    # each group furthest past its threshold first
    cards: dict[int, dict[str, Any]] = {}
    for r in flagged_rows:
        card = cards.setdefault(r["gid"], {
            "gid": r["gid"], "method": r["method"], "seed": r["seed"], "prompt": r["prompt"],
            "label": r["label"], "final_prompt": r["final_prompt"],
            "image_path": r["image_path"], "matches": [], "rank": -np.inf,
            "verdict_copy": False, "anchor": prompt_anchor(r["prompt"])})
        r["rank"] = _rank(r)
        card["matches"].append(r)
        card["rank"] = max(card["rank"], r["rank"])
        card["verdict_copy"] |= bool(_verdict(r))
    ordered = sorted(cards.values(), key=lambda c: (not c["verdict_copy"], -c["rank"]))
    ordered = ordered[:max_flagged]
    train = _TrainingImages(index if index is not None else run["index_path"], sources)
    index_mismatch = train.mismatch(run)
    if index_mismatch and not index_mismatch_ok:
        raise UserError(f"{index_mismatch}: its images would be shown beside outputs they "
                        "were not matched with; pass --index-mismatch-ok to show them anyway")
    outside: list[str] = []
    for c in ordered:
        path = db.parent / str(c["image_path"])
        c["image_uri"] = image_file_uri(path, root=db.parent)
        if c["image_uri"] is None and path.exists():
            outside.append(str(c["image_path"]))
        for m in c["matches"]:
            m["train_uri"] = train.uri(m["neighbour_row"])
    left_out = []
    per_prompt, outside_rows = prompt_rows(flagged_gens, methods, list(cards.values()),
                                           db.parent, train, max_flagged)
    outside += [p for p in outside_rows if p not in outside]
    if outside:
        left_out.append(f"{len(outside)} generated image path(s) outside {db.parent}, e.g. "
                        f"{outside[0]}")
    left_out += train.left_out(bool(ordered))

    # per prompt x method tables, one per criterion
    tables = []
    for c in criteria:
        by_prompt: dict[int, dict[str, Any]] = {}
        for r in pm:
            if r["criterion"] != c:
                continue
            row = by_prompt.setdefault(r["prompt_id"], {"prompt": r["prompt"],
                                                        "label": r["label"], "cells": {}})
            copies = r["copies_calibrated"] if has_cal and r["copy_rate_calibrated"] \
                is not None else r["copies_fixed"]
            row["cells"][r["method"]] = {"copies": int(copies or 0), "n": r["n"],
                                         "best_score": r["best_score"]}
        rows = [{"prompt": v["prompt"], "label": v["label"],
                 "cells": [v["cells"].get(m) for m in methods]} for v in by_prompt.values()]
        rows.sort(key=lambda v: (-sum(x["copies"] for x in v["cells"] if x), v["prompt"]))
        tables.append({"criterion": c, "rows": rows})
    link_prompt_tables(tables, per_prompt)

    # copy rate per method x prompt label, one table per criterion (when labels exist)
    label_tables = []
    if any(lab is not None for lab in label_order):
        cells = {(r["criterion"], r["method"], r["label"]): r for r in by_label}
        for c in criteria:
            label_tables.append({"criterion": c, "labels": label_order, "rows": [
                {"method": m, "cells": [cells.get((c, m, lab)) for lab in label_order]}
                for m in methods], "has_reproduction": any(
                    r["reproduction"] is not None for r in by_label if r["criterion"] == c)})

    magnitudes = _magnitude_context(magnitude_rows, methods)
    has_quality = any(q["features"] or q["clip_score"] is not None for q in quality)
    versions = json.loads(run["versions_json"] or "{}")
    return {
        "run": run, "db_path": str(db), "schema_version": schema_version,
        "methods": methods, "criteria": criteria, "criteria_info": crit_info,
        "summary": summary, "plots": plots, "screens": screens,
        "flagged": [c for c in ordered if c["verdict_copy"]],
        "flagged_fixed_only": [c for c in ordered if not c["verdict_copy"]],
        "n_flagged": sum(c["verdict_copy"] for c in cards.values()),
        "n_any_flagged": len(cards), "prompt_rows": per_prompt,
        "row_anchors": {r["anchor"] for r in per_prompt},
        "n_flagged_prompts": len({c["prompt"] for c in cards.values()}),
        "sections": _sections(bool(label_tables), has_quality),
        "gate": gate_verdict(db, rid, methods, criteria),
        "screening_words": screening_words(screens),
        "verdict_kind": "calibrated" if has_cal else "fixed",
        "prompt_tables": tables, "label_tables": label_tables, "max_screens": 200,
        "magnitudes": magnitudes,
        "n_magnitude_plots": sum(len(m["plots"]) for m in magnitudes),
        "n_generations": n_generations, "n_prompts": n_prompts,
        "has_alignment": align_n > 0, "quality": quality,
        "has_quality": has_quality,
        "alignment_note": ("share of generations whose content agrees with the prompt: on "
                           "the canary, a digit classifier trained on the real digits reads "
                           "the digit the prompt asks for (METHODS 4)"),
        "versions": versions, "left_out": left_out, "index_mismatch": index_mismatch,
        "settings_json": json.dumps(settings, indent=2, sort_keys=True, default=str),
        "plan_json": json.dumps(plan, indent=2, sort_keys=True),
        "generated_at": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _magnitude_rows(store: AuditStore, rid: int) -> list[dict[str, Any]]:
    """Per-step ||e_c - e_u|| of every generation whose trace has a switch step (the
    transition-point methods), with the sample's final switch step."""
    from memaudit.report.plots import magnitude_d

    rows = store.query(
        "SELECT g.id AS gid, g.method, g.seed, p.id AS pid, p.text AS prompt, p.label, s.step, "
        "s.guidance_norm, s.extra_json FROM steps s JOIN generations g ON g.id = "
        "s.generation_id JOIN prompts p ON p.id = g.prompt_id WHERE g.run_id = ? AND "
        "s.extra_json LIKE '%\"switch_step\"%' ORDER BY p.id, g.method, g.seed, s.step", [rid])
    out, last = [], {}
    for r in rows:
        try:
            extra = json.loads(r["extra_json"])
        except (TypeError, ValueError):
            continue
        sw = extra.get("switch_step")
        last[r["gid"]] = sw if isinstance(sw, (int, float)) else None
        out.append({"gid": r["gid"], "method": r["method"], "prompt": r["prompt"],
                    "label": r["label"], "seed": r["seed"], "step": r["step"],
                    "d": magnitude_d(extra, r["guidance_norm"])})
    for r in out:
        r["switch_step"] = last.get(r["gid"])
    return out


def _magnitude_context(rows: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Per transition-point method: its per-prompt magnitude plots (template section)."""
    from markupsafe import Markup

    from memaudit.report.plots import magnitude_plots

    plots = magnitude_plots(rows)
    out = []
    for m in methods:
        mine = [dict(p, svg=Markup(p["svg"])) for p in plots if p["method"] == m]
        if mine:
            out.append({"method": m, "plots": mine})
    return out


def _sections(groups: bool, quality: bool) -> list[tuple[str, str]]:
    """The page's sections, in reading order (id, title), for its table of contents."""
    return [(i, t) for i, t, shown in (
        ("verdict", "Verdict", True), ("flagged", "Flagged outputs", True),
        ("summary", "Per method", True), ("groups", "Per group", groups),
        ("quality", "Quality", quality), ("prompts", "Per prompt", True),
        ("diagnostics", "Diagnostics", True), ("provenance", "Provenance", True)) if shown]


def _verdict(r: dict[str, Any]) -> bool:
    """A match's copy verdict in use: calibrated where its criterion has one, else fixed."""
    cal = r["is_copy_calibrated"]
    return bool(r["is_copy"] if cal is None else cal)


def _rank(r: dict[str, Any]) -> float:
    """How far past its threshold a flagged match is (similarity units), for ordering."""
    thr = r["calibrated_threshold"] if r["calibrated_threshold"] is not None else r["threshold"]
    if thr is None:
        return float(r["similarity"])
    sign = 1.0 if r["higher_is_more_similar"] else -1.0
    return float(r["similarity"] - sign * thr)


def _json_object(text) -> dict:
    """A JSON object from a database column, {} for anything else (the database is
    untrusted: a bad cell shows nothing rather than failing the report)."""
    try:
        rec = json.loads(text or "{}")
    except (TypeError, ValueError, RecursionError):
        return {}
    return rec if isinstance(rec, dict) else {}
