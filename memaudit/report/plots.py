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


def axis_ticks(lo: float, hi: float, n: int = 6, integer: bool = False) -> list[float]:
    """At most `n` ticks in [lo, hi] at multiples of a round step (1, 2, 2.5 or 5 x 10^k);
    with `integer`, the step is a whole number (an axis of steps: 0, 10, 20, ..., never
    9.8, 19.6, ...)."""
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return [float(lo)] if np.isfinite(lo) else []
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10.0 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, float(np.ceil(step)))
    first = np.ceil(lo / step - 1e-9) * step
    count = int((hi - first) / step + 1e-9) + 1
    ticks = [round(float(first + k * step), 12) for k in range(count)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks]


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
    for v in axis_ticks(lo, hi):
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


def line_plot_svg(series: list[dict], *, title: str, x_label: str, y_label: str,
                  width: int = 520, height: int = 260, x_max: float | None = None,
                  markers: list[dict] | None = None, y_min: float | None = 0.0,
                  legend: bool = True) -> str:
    """Line plot with optional spread bands and vertical markers (inline SVG).

    series: {"label", "y" (list, NaN = gap), "x" (optional, default 0..n-1), "lo"/"hi"
    (optional band), "colour" (optional), "dash" (optional)}. markers: {"x", "colour",
    "label" (tooltip)} drawn as short ticks under the plot area. Text is escaped here.
    """
    ys = [np.asarray(s["y"], float) for s in series]
    xs = [np.asarray(s.get("x", np.arange(len(y))), float) for s, y in zip(series, ys,
                                                                          strict=True)]
    vals = np.concatenate([v for s, y in zip(series, ys, strict=True)
                           for v in (y, np.asarray(s.get("lo", y), float),
                                     np.asarray(s.get("hi", y), float))]) if ys else np.zeros(0)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return ""
    lo = float(vals.min()) if y_min is None else min(float(y_min), float(vals.min()))
    hi = float(vals.max())
    if hi - lo < 1e-12:
        hi = lo + 1.0
    allx = np.concatenate(xs)
    x0, x1 = float(allx.min()), float(allx.max() if x_max is None else x_max)
    if x1 - x0 < 1e-12:
        x1 = x0 + 1.0
    left, right, top, bottom = 56, 150 if legend else 12, 26, 44
    pw, ph = width - left - right, height - top - bottom

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * pw

    def py(v: float) -> float:
        return top + ph - (v - lo) / (hi - lo) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
             f'<text x="{left}" y="15" font-size="12" font-weight="bold">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999" '
             'stroke-width="0.5"/>']
    for k in range(5):
        v = lo + k * (hi - lo) / 4
        parts.append(f'<text x="{left - 4}" y="{py(v) + 4:.1f}" font-size="10" '
                     f'text-anchor="end">{_fmt(v)}</text>')
    whole = bool(np.all(np.mod(allx, 1) == 0))  # steps: ticks at whole steps only
    for v in axis_ticks(x0, x1, integer=whole):
        parts.append(f'<text x="{px(v):.1f}" y="{top + ph + 14}" font-size="10" '
                     f'text-anchor="middle">{_fmt(v)}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 6}" font-size="11" '
                 f'text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text x="12" y="{top + ph / 2:.1f}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + ph / 2:.1f})">{escape(y_label)}</text>')
    for i, (s, x, y) in enumerate(zip(series, xs, ys, strict=True)):
        colour = s.get("colour") or PALETTE[i % len(PALETTE)]
        if "lo" in s and "hi" in s:
            lo_v, hi_v = np.asarray(s["lo"], float), np.asarray(s["hi"], float)
            ok = np.isfinite(lo_v) & np.isfinite(hi_v)
            if ok.any():
                pts = [f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x[ok], hi_v[ok], strict=True)]
                pts += [f"{px(a):.1f},{py(b):.1f}" for a, b in
                        zip(x[ok][::-1], lo_v[ok][::-1], strict=True)]
                parts.append(f'<polygon points="{" ".join(pts)}" fill="{colour}" '
                             'fill-opacity="0.15" stroke="none"/>')
        runs: list[list[str]] = [[]]
        for a, b in zip(x, y, strict=True):
            if np.isfinite(b):
                runs[-1].append(f"{px(a):.1f},{py(b):.1f}")
            elif runs[-1]:
                runs.append([])
        dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
        for run in runs:
            if len(run) > 1:
                parts.append(f'<polyline points="{" ".join(run)}" fill="none" '
                             f'stroke="{colour}" stroke-width="1.6"{dash}/>')
            elif run:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{colour}"/>')
        ly = top + 12 + 15 * i
        if not legend:
            continue
        parts.append(f'<line x1="{left + pw + 10}" y1="{ly - 4}" x2="{left + pw + 28}" '
                     f'y2="{ly - 4}" stroke="{colour}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{left + pw + 32}" y="{ly}" font-size="10">'
                     f'{escape(str(s["label"]))}</text>')
    for m in markers or []:
        colour = m.get("colour", "#555")
        parts.append(f'<line x1="{px(m["x"]):.1f}" y1="{top + ph - 8}" x2="{px(m["x"]):.1f}" '
                     f'y2="{top + ph}" stroke="{colour}" stroke-width="1.5">'
                     f'<title>{escape(str(m.get("label", "")))}</title></line>')
    parts.append("</svg>")
    return "\n".join(parts)


def magnitude_d(extra: dict, guidance_norm: float | None) -> float:
    """||e_c - e_u|| of one step from the trace: `d` when traced, else guidance_norm / |scale|
    (traces written before every transition rule traced d); NaN when neither tells."""
    d = extra.get("d")
    if isinstance(d, (int, float)):
        return float(d)
    scale = extra.get("scale")
    if isinstance(scale, (int, float)) and scale != 0 and guidance_norm is not None:
        return float(guidance_norm) / abs(float(scale))
    return float("nan")


def magnitude_plots(rows: list[dict], max_plots: int = 120) -> list[dict]:
    """Per (method, prompt): ||e_c - e_u|| over the steps, one line per seed, each seed's
    switch step marked (the paper's Figure 2 for an audited prompt).

    rows: {method, prompt, label, seed, step, d, switch_step} (switch_step: the sample's
    final value, -1 = never switched). Returns [{method, prompt, label, svg, switches}] in
    input order, at most `max_plots`."""
    groups: dict[tuple[str, str], dict] = {}
    for r in rows:
        g = groups.setdefault((r["method"], r["prompt"]), {
            "method": r["method"], "prompt": r["prompt"], "label": r["label"], "seeds": {}})
        g["seeds"].setdefault(r["seed"], {})[int(r["step"])] = (r["d"], r["switch_step"])
    out = []
    for g in list(groups.values())[:max_plots]:
        series, markers, switches = [], [], []
        n = 1 + max(max(v) for v in g["seeds"].values())
        for i, (seed, per) in enumerate(sorted(g["seeds"].items())):
            y = [per[j][0] if j in per and per[j][0] is not None else float("nan")
                 for j in range(n)]
            colour = PALETTE[i % len(PALETTE)]
            series.append({"label": f"seed {seed}", "y": y, "colour": colour})
            sw = per[max(per)][1]
            switches.append(None if sw is None or sw < 0 else int(sw))
            if sw is not None and sw >= 0:
                markers.append({"x": int(sw), "colour": colour,
                                "label": f"seed {seed}: switch at step {int(sw)}"})
        svg = line_plot_svg(series, title=f"{g['method']}: ||e_c - e_u||", x_label="step",
                            y_label="magnitude", width=320, height=170, markers=markers,
                            x_max=n - 1, legend=False)
        out.append({"method": g["method"], "prompt": g["prompt"], "label": g["label"],
                    "svg": svg, "switches": switches})
    return out
