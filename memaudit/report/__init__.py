"""`memaudit report DB`: one self-contained HTML page (and a PDF) from an audit database.

Summary per method (copy rate per criterion, fixed and calibrated; 95th percentile and most
similar score; alignment; cost relative to cfg), score distributions per method (inline SVG),
screening scores, every flagged output beside the training image it copies (re-read from the
training Parquet through the index's items.parquet source_file/source_row) with key,
caption, duplicate count, criterion and score, a table per prompt and method, provenance.
A database or index may come from someone else, so the report reads only generated images
under the database's own folder and training images from the Parquet files the index
recorded as its sources, and lists what it left out.
Images are inlined as base64 data URIs; prompts and captions are escaped (Jinja2
autoescape) and the page carries a Content-Security-Policy that forbids scripts.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from memaudit.common import UserError
from memaudit.store import AuditStore

__all__ = ["build_context", "find_chromium", "render_html", "render_pdf", "screenshot",
           "training_image_bytes", "write_report"]


# --- images -------------------------------------------------------------------------------
def png_data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_file_uri(path: Path, root: Path | None = None) -> str | None:
    """A generated image file as a PNG data URI (re-encoded, so any format is fine); None
    when missing or, with `root`, when its real path is not under `root`."""
    from memaudit.paths import real

    if root is not None and not real(path).is_relative_to(real(root)):
        return None
    if not path.is_file():
        return None
    return _to_png_uri(path.read_bytes())


def _to_png_uri(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGB")
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except Exception:  # noqa: BLE001 - an undecodable image is shown as unavailable
        return None
    return png_data_uri(buf.getvalue())


def training_image_bytes(source_file: str | Path, source_row: int,
                         image_col: str | None = None) -> bytes | None:
    """The encoded image of one training row, read from its Parquet file (one row group)."""
    import pyarrow.parquet as pq

    from memaudit.data.parquet import detect_columns

    path = Path(source_file)
    if not path.exists():
        return None
    pf = pq.ParquetFile(path)
    cols = detect_columns(pf.schema_arrow, path, image_col=image_col)
    start = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if start <= source_row < start + n:
            value = pf.read_row_group(g, columns=[cols.image]).column(0)[source_row - start]
            v = value.as_py()
            if isinstance(v, dict):
                v = v.get("bytes")
            return v
        start += n
    return None


class _TrainingImages:
    """Neighbour row id -> PNG data URI, through the run's index (None when unavailable).

    Only Parquet files the index's manifest records as its sources are read; a row whose
    source_file is anything else is left out and counted in `refused`."""

    def __init__(self, index_path: str | Path | None):
        from memaudit.paths import real

        self.index = None
        self.image_col = None
        self.paths: dict[str, Path] = {}
        self.allowed: set[Path] = set()
        self.cache: dict[int, str | None] = {}
        self.refused: set[str] = set()
        self.error: str | None = None
        if index_path and Path(index_path).exists():
            try:
                from memaudit.index import TrainingIndex

                self.index = TrainingIndex.open(index_path)
                src = self.index.manifest.get("source") or {}
                src = src if isinstance(src, dict) else {}
                self.image_col = src.get("image_col")
                paths = [Path(str(p)) for p in src.get("paths") or []]
                self.paths = {p.name: p for p in paths}
                self.allowed = {real(p) for p in paths}
            except Exception as e:  # noqa: BLE001 - the report still renders without images
                self.index = None
                self.error = f"the index {index_path} could not be opened ({e})"
        elif index_path:
            self.error = f"the index {index_path} was not found"

    def uri(self, row: int | None) -> str | None:
        from memaudit.paths import real

        if row is None or self.index is None:
            return None
        if row not in self.cache:
            self.cache[row] = None
            try:
                item = self.index.item(int(row))
                src = Path(item["source_file"])
                if not src.exists():  # a relative path from the build: the manifest's copy
                    src = self.paths.get(src.name, src)
                if real(src) not in self.allowed:
                    self.refused.add(str(item["source_file"]))
                    return None
                data = training_image_bytes(src, int(item["source_row"]), self.image_col)
                self.cache[row] = _to_png_uri(data) if data else None
            except Exception:  # noqa: BLE001
                self.cache[row] = None
        return self.cache[row]


# --- context ------------------------------------------------------------------------------
def _ordered(values: list[str], order: list[str]) -> list[str]:
    rank = {v: i for i, v in enumerate(order)}
    return sorted(values, key=lambda v: (rank.get(v, len(rank)), v))


def build_context(db: str | Path, run_id: int | None = None, max_flagged: int = 200,
                  index: str | Path | None = None) -> dict[str, Any]:
    """Everything the template shows, read from the database (one run, default latest).

    `index`: the run's training index (default: the path the database records)."""
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

        verdict_col = "m.is_copy_calibrated" if has_cal else "m.is_copy"
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
        n_flagged_verdict = store.con.execute(
            # verdict_col is one of two fixed column names, never user text
            f"SELECT count(DISTINCT g.id) FROM matches m JOIN generations g "
            f"ON g.id = m.generation_id WHERE g.run_id = ? AND {verdict_col}", [rid]
        ).fetchone()[0]
        screens = store.query(
            "SELECT p.text AS prompt, p.label, s.score, s.steps, s.seeds, s.threshold, "
            "s.flagged, s.score_name, s.params_json FROM screens s "
            "JOIN prompts p ON p.id = s.prompt_id "
            "WHERE s.run_id = ? ORDER BY s.score DESC", [rid])
        for s in screens:  # the score's parameters and where they come from (METHODS 2.1)
            rec = json.loads(s.pop("params_json") or "{}")
            s["score_params"], s["score_notes"] = rec.get("params", {}), rec.get("notes", [])
        pm = store.query("SELECT * FROM prompt_method WHERE run_id = ? ORDER BY prompt_id",
                         [rid])
        by_label = store.query(
            "SELECT g.method, p.label, m.criterion, count(*) AS n, "
            "avg(CASE WHEN m.is_copy THEN 1.0 ELSE 0.0 END) AS fixed, "
            "avg(CASE WHEN m.is_copy_calibrated THEN 1.0 ELSE 0.0 END) "
            "FILTER (WHERE m.is_copy_calibrated IS NOT NULL) AS calibrated "
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

    # flagged cards, most similar first (by the best similarity rank within its criterion)
    cards: dict[int, dict[str, Any]] = {}
    for r in flagged_rows:
        card = cards.setdefault(r["gid"], {
            "gid": r["gid"], "method": r["method"], "seed": r["seed"], "prompt": r["prompt"],
            "label": r["label"], "final_prompt": r["final_prompt"],
            "image_path": r["image_path"], "matches": [], "rank": -np.inf})
        card["matches"].append(r)
        card["rank"] = max(card["rank"], _rank(r))
    ordered = sorted(cards.values(), key=lambda c: -c["rank"])[:max_flagged]
    train = _TrainingImages(index if index is not None else run["index_path"])
    outside: list[str] = []
    for c in ordered:
        path = db.parent / str(c["image_path"])
        c["image_uri"] = image_file_uri(path, root=db.parent)
        if c["image_uri"] is None and path.exists():
            outside.append(str(c["image_path"]))
        for m in c["matches"]:
            m["train_uri"] = train.uri(m["neighbour_row"])
    left_out = []
    if outside:
        left_out.append(f"{len(outside)} generated image path(s) outside {db.parent}, e.g. "
                        f"{outside[0]}")
    if train.refused:
        left_out.append(f"training images from {len(train.refused)} file(s) the index does "
                        f"not record as its sources, e.g. {sorted(train.refused)[0]}")
    if train.error and ordered:
        left_out.append(f"every training image: {train.error}")

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

    # copy rate per method x prompt label, one table per criterion (when labels exist)
    label_tables = []
    if any(lab is not None for lab in label_order):
        cells = {(r["criterion"], r["method"], r["label"]): r for r in by_label}
        for c in criteria:
            label_tables.append({"criterion": c, "labels": label_order, "rows": [
                {"method": m, "cells": [cells.get((c, m, lab)) for lab in label_order]}
                for m in methods]})

    versions = json.loads(run["versions_json"] or "{}")
    return {
        "run": run, "db_path": str(db), "schema_version": schema_version,
        "methods": methods, "criteria": criteria, "criteria_info": crit_info,
        "summary": summary, "plots": plots, "screens": screens, "flagged": ordered,
        "n_flagged": n_flagged_verdict if has_cal else len(cards),
        "n_any_flagged": len(cards),
        "verdict_kind": "calibrated" if has_cal else "fixed",
        "prompt_tables": tables, "label_tables": label_tables, "max_screens": 200,
        "magnitudes": _magnitude_context(magnitude_rows, methods),
        "n_generations": n_generations, "n_prompts": n_prompts,
        "has_alignment": align_n > 0, "quality": quality,
        "has_quality": any(q["features"] or q["clip_score"] is not None for q in quality),
        "alignment_note": ("share of generations whose content agrees with the prompt: on "
                           "the canary, a digit classifier trained on the real digits reads "
                           "the digit the prompt asks for (METHODS 4)"),
        "versions": versions, "left_out": left_out,
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


def _rank(r: dict[str, Any]) -> float:
    """How far past its threshold a flagged match is (similarity units), for ordering."""
    thr = r["calibrated_threshold"] if r["calibrated_threshold"] is not None else r["threshold"]
    if thr is None:
        return float(r["similarity"])
    sign = 1.0 if r["higher_is_more_similar"] else -1.0
    return float(r["similarity"] - sign * thr)


# --- rendering ----------------------------------------------------------------------------
def _num(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not np.isfinite(v):
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{float(v):.3g}"


def _ts(v: Any) -> str:
    return v.strftime("%Y-%m-%d %H:%M:%S") if hasattr(v, "strftime") else str(v)


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.1f}%"


def _ratio(v: Any) -> str:
    return "–" if v is None else f"{float(v):.2f}×"


def render_html(context: dict[str, Any]) -> str:
    """Render the report template (autoescape on; plots and data URIs are the only markup)."""
    import jinja2
    from markupsafe import Markup

    from memaudit.report.template import REPORT_TEMPLATE

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    ctx = dict(context)
    ctx["plots"] = [Markup(p) for p in context["plots"]]  # built escaped in plots.py
    tpl = env.from_string(REPORT_TEMPLATE)
    return tpl.render(**ctx, num=_num, pct=_pct, ratio=_ratio, ts=_ts)


def write_report(db: str | Path, out: str | Path, run_id: int | None = None,
                 max_flagged: int = 200, index: str | Path | None = None,
                 overwrite: bool = False) -> Path:
    """Render the report of one run (default latest) to `out` (written atomically).

    `out` must not be the database or the index, nor an existing file that is not a
    memaudit report unless `overwrite` (`memaudit.paths.check_output_file`)."""
    from memaudit.paths import atomic_write, check_output_file, is_memaudit_html

    out = check_output_file(out, [db, index], own=is_memaudit_html, overwrite=overwrite,
                            what="report")
    html = render_html(build_context(db, run_id=run_id, max_flagged=max_flagged, index=index))
    with atomic_write(out, "report") as tmp:
        tmp.write_text(html, encoding="utf-8")
    return out


# --- headless chromium (PDF, screenshots, the browser test) --------------------------------
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """Path of a chromium/chrome binary, or None (MEMAUDIT_CHROMIUM overrides)."""
    env = os.environ.get("MEMAUDIT_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in CHROMIUM_NAMES:
        p = shutil.which(name)
        if p:
            return p
    return None


def _chromium(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise UserError("chromium not found: install Debian's chromium (apt-get install "
                        "chromium) or set MEMAUDIT_CHROMIUM to a chrome binary")
    with tempfile.TemporaryDirectory(prefix="memaudit-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--hide-scrollbars",
               f"--user-data-dir={profile}", *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired as e:
            raise UserError(f"chromium timed out after {timeout:.0f} s") from e


def render_pdf(html: str | Path, pdf: str | Path) -> Path:
    """Print the report to PDF with headless chromium (`--print-to-pdf`)."""
    pdf = Path(pdf).resolve()
    p = _chromium([f"--print-to-pdf={pdf}", "--no-pdf-header-footer",
                   Path(html).resolve().as_uri()])
    if not pdf.exists() or pdf.stat().st_size == 0:
        raise UserError(f"chromium did not write {pdf}: {p.stderr.strip()[-300:]}")
    return pdf


def screenshot(html: str | Path, png: str | Path, width: int = 1280,
               height: int = 2000) -> Path:
    """A PNG screenshot of the rendered page (headless chromium `--screenshot`)."""
    png = Path(png).resolve()
    p = _chromium([f"--screenshot={png}", f"--window-size={width},{height}",
                   Path(html).resolve().as_uri()])
    if not png.exists() or png.stat().st_size == 0:
        raise UserError(f"chromium did not write {png}: {p.stderr.strip()[-300:]}")
    return png


def dump_dom(html: str | Path) -> str:
    """The DOM after chromium loaded the page and ran whatever it would run."""
    return _chromium(["--dump-dom", Path(html).resolve().as_uri()]).stdout
