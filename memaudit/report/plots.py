"""Inline SVG plots for the report (no plotting dependency): score distributions per method.

Every text in the SVG (method names, criterion names) is escaped here; the returned string
is safe to insert into the page as markup.
"""

from __future__ import annotations

from html import escape

import numpy as np

PALETTE = ("#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477",
           "#66aa00", "#b82e2e", "#316395")


def histogram_counts(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Counts of `values` in `bins` equal bins over [lo, hi] (outside values clamped)."""
    v = np.clip(np.asarray(values, float), lo, hi)
    counts, _ = np.histogram(v, bins=bins, range=(lo, hi))
    return counts


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def distribution_svg(scores: dict[str, np.ndarray], criterion: str, *,
                     threshold: float | None = None, calibrated: float | None = None,
                     higher_is_more_similar: bool = True, bins: int = 30,
                     width: int = 720, row_height: int = 64) -> str:
    """Small multiples: one histogram row per method on a shared x axis, with the fixed
    (red, dashed) and calibrated (orange) copy thresholds as vertical lines."""
    methods = list(scores)
    allv = np.concatenate([np.asarray(v, float) for v in scores.values()]) if methods else \
        np.zeros(0)
    allv = allv[np.isfinite(allv)]
    marks = [t for t in (threshold, calibrated) if t is not None and np.isfinite(t)]
    if allv.size == 0:
        return ""
    lo = float(min(allv.min(), *marks)) if marks else float(allv.min())
    hi = float(max(allv.max(), *marks)) if marks else float(allv.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.02 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    left, right, top, bottom = 150, 20, 28, 50
    plot_w = width - left - right
    height = top + bottom + row_height * len(methods)

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    direction = "higher = more similar" if higher_is_more_similar else "lower = more similar"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(criterion)} score distribution per method">',
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{escape(criterion)} '
        f'score per method ({direction})</text>',
    ]
    bw = plot_w / bins
    for i, m in enumerate(methods):
        y0 = top + i * row_height
        v = np.asarray(scores[m], float)
        v = v[np.isfinite(v)]
        counts = histogram_counts(v, lo, hi, bins)
        peak = max(int(counts.max()) if counts.size else 0, 1)
        colour = PALETTE[i % len(PALETTE)]
        parts.append(f'<text x="{left - 8}" y="{y0 + row_height / 2 + 4:.1f}" font-size="12" '
                     f'text-anchor="end">{escape(m)} (n={v.size})</text>')
        parts.append(f'<line x1="{left}" y1="{y0 + row_height - 4}" x2="{left + plot_w}" '
                     f'y2="{y0 + row_height - 4}" stroke="#999" stroke-width="0.5"/>')
        for b, c in enumerate(counts):
            if c == 0:
                continue
            h = (row_height - 10) * c / peak
            parts.append(f'<rect x="{left + b * bw:.1f}" y="{y0 + row_height - 4 - h:.1f}" '
                         f'width="{max(bw - 1, 0.5):.1f}" height="{h:.1f}" fill="{colour}">'
                         f'<title>{escape(m)}: {int(c)} in [{_fmt(lo + b * (hi - lo) / bins)}, '
                         f'{_fmt(lo + (b + 1) * (hi - lo) / bins)})</title></rect>')
    axis_y = top + row_height * len(methods)
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" '
                 'stroke="#333"/>')
    for k in range(6):
        v = lo + k * (hi - lo) / 5
        parts.append(f'<line x1="{x(v):.1f}" y1="{axis_y}" x2="{x(v):.1f}" y2="{axis_y + 4}" '
                     'stroke="#333"/>')
        parts.append(f'<text x="{x(v):.1f}" y="{axis_y + 16}" font-size="11" '
                     f'text-anchor="middle">{_fmt(v)}</text>')
    for t, colour, dash, label, dy in ((threshold, "#d62728", "5,3", "fixed", 30),
                                       (calibrated, "#ff7f0e", "", "calibrated", 43)):
        if t is None or not np.isfinite(t):
            continue
        parts.append(f'<line x1="{x(t):.1f}" y1="{top - 6}" x2="{x(t):.1f}" y2="{axis_y}" '
                     f'stroke="{colour}" stroke-width="1.5"'
                     + (f' stroke-dasharray="{dash}"' if dash else "") + '>'
                     f'<title>{label} threshold {_fmt(t)}</title></line>')
        parts.append(f'<text x="{x(t) + 3:.1f}" y="{axis_y + dy}" font-size="11" '
                     f'fill="{colour}">{label} {_fmt(t)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
