"""The report's HTML: the Jinja2 template rendered with autoescape on (plots and data URIs are
the only markup) and written atomically, never over an input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from memaudit.report.context import build_context


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
                 overwrite: bool = False, sources: list[str | Path] | None = None,
                 index_mismatch_ok: bool = False) -> Path:
    """Render the report of one run (default latest) to `out` (written atomically).

    `out` must not be the database or the index, nor an existing file that is not a
    memaudit report unless `overwrite` (`memaudit.paths.check_output_file`). `sources`,
    `index_mismatch_ok`: see `build_context`."""
    from memaudit.paths import atomic_write, check_output_file, is_memaudit_html
    from memaudit.report.images import source_files

    out = check_output_file(out, [db, index, *source_files(sources)], own=is_memaudit_html,
                            overwrite=overwrite, what="report")
    html = render_html(build_context(db, run_id=run_id, max_flagged=max_flagged, index=index,
                                     sources=sources, index_mismatch_ok=index_mismatch_ok))
    with atomic_write(out, "report") as tmp:
        tmp.write_text(html, encoding="utf-8")
    return out
