# ruff: noqa: E501  (HTML template lines)
"""The report's Jinja2 template (kept in Python so it ships with any install of the package).

Rendered with autoescape on: every prompt, caption, key and plan value is escaped; only the
SVG plots (escaped where they are built, memaudit.report.plots) and base64 data URIs are
inserted as markup.
"""

REPORT_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="memaudit report">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>memaudit report: run {{ run.id }} of {{ run.model }}</title>
<style>
 body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em;
        color: #222; max-width: 1200px; }
 h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em;
      border-bottom: 2px solid #ddd; padding-bottom: 0.2em; }
 .sub { color: #666; margin-top: 0; }
 table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
 th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: left;
          vertical-align: top; }
 th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
 .copy { background: #fde2e1; } .ok { background: #e4f5e4; }
 .verdict { font-size: 1.1em; padding: 0.6em 1em; border-radius: 4px; display: inline-block; }
 .cards { display: flex; flex-wrap: wrap; gap: 14px; }
 .card { border: 1px solid #ccc; border-radius: 6px; padding: 8px; width: 330px;
         font-size: 0.86em; page-break-inside: avoid; }
 .pair { display: flex; gap: 8px; } .pair figure { margin: 0; text-align: center; }
 .pair img, td img { image-rendering: pixelated; border: 1px solid #999; background: #fff; }
 figcaption { font-size: 0.8em; color: #555; }
 .prompt { font-weight: 600; word-break: break-word; }
 code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85em; }
 pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; }
 .note { color: #555; font-size: 0.9em; }
 .label { display: inline-block; background: #eef; border-radius: 3px; padding: 0 4px;
          font-size: 0.85em; }
 .checks { list-style: none; padding-left: 0.4em; } .checks li { margin: 0.2em 0; }
 .checks .fail b.v { color: #b00020; } .checks .pass b.v { color: #1b7e1b; }
 nav { font-size: 0.9em; margin: 0.6em 0; } nav a { margin-right: 0.8em; }
 details { margin: 0.6em 0; } summary { cursor: pointer; font-weight: 600; }
 details.diag > summary { font-size: 1.1em; }
 .prow { border-top: 1px solid #ddd; padding: 8px 0; break-inside: avoid; }
 .strip { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
 .strip figure { margin: 0; text-align: center; }
 .thumbs { display: flex; gap: 2px; }
 .strip img { image-rendering: pixelated; border: 2px solid #fff; outline: 1px solid #999; }
 .strip img.copy { border-color: #d62728; } .strip img.fixed { border-color: #ff9f40; }
 a.anchor { color: #999; text-decoration: none; margin-right: 0.3em; }
 @media print { nav { display: none; } body { margin: 0; max-width: none; }
   h2, h3, summary { break-after: avoid; } .card, .prow, tr { break-inside: avoid; } }
</style>
</head>
<body>
{% macro card(f) %}
<div class="card">
 <div class="prompt">{{ f.prompt }}</div>
 <div class="note">{{ f.method }} · seed {{ f.seed }}{% if f.label %} ·
  <span class="label">{{ f.label }}</span>{% endif %}{% if f.anchor in row_anchors %} ·
  <a href="#{{ f.anchor }}">all outputs of this prompt</a>{% endif %}</div>
 {% if f.final_prompt and f.final_prompt != f.prompt %}<div class="note">as sampled:
  {{ f.final_prompt }}</div>{% endif %}
 {% for m in f.matches %}
 <div class="pair">
  <figure><img src="{{ f.image_uri }}" width="128" height="128" alt="generated image">
   <figcaption>generated</figcaption></figure>
  <figure>{% if m.train_uri %}<img src="{{ m.train_uri }}" width="128" height="128"
   alt="training image {{ m.neighbour_key }}">{% else %}<div style="width:128px;height:128px;
   border:1px dashed #999">image unavailable</div>{% endif %}
   <figcaption>training item</figcaption></figure>
 </div>
 <table>
  <tr><th>criterion</th><td>{{ m.criterion }}: score {{ num(m.score) }}
   ({{ "copy" if m.is_copy else "no copy" }} at fixed {{ num(m.threshold) }}{% if m.calibrated_threshold is not none %};
   {{ "copy" if m.is_copy_calibrated else "no copy" }} at calibrated {{ num(m.calibrated_threshold) }}{% endif %})</td></tr>
  <tr><th>key</th><td><code>{{ m.neighbour_key }}</code></td></tr>
  <tr><th>caption</th><td>{{ m.neighbour_caption }}</td></tr>
  <tr><th>duplicates</th><td>{{ m.dup_count }}</td></tr>
 </table>
 {% endfor %}
</div>
{% endmacro %}
<h1>Memorization audit: {{ run.model }}</h1>
<p class="sub">run {{ run.id }} · {{ run.status }} · started {{ ts(run.started_at) }} ·
 {{ n_generations }} generations of {{ n_prompts }} prompts · {{ methods|length }} methods ·
 criteria: {{ criteria|join(", ") }}</p>
<nav>{% for id, name in sections %}<a href="#{{ id }}">{{ name }}</a>{% endfor %}</nav>

{% if index_mismatch %}<p class="verdict copy">The training images shown are from an index
 that is not the index this run recorded (<code>--index-mismatch-ok</code>): {{ index_mismatch }}.
 A flagged output may be shown beside an image it was not matched with.</p>{% endif %}
<h2 id="verdict">Verdict</h2>
{% if run.status != "finished" %}<p class="verdict copy">This run is <b>{{ run.status }}</b>:
 the audit is incomplete, so these figures cover only the units committed so far.</p>{% endif %}
<p class="verdict {{ 'copy' if n_flagged else 'ok' }}">
{% if n_flagged %}{{ n_flagged }} generation(s) flagged as copies of training images
{% else %}No generation flagged as a copy of a training image{% endif %}
 (verdict: {{ verdict_kind }} thresholds).</p>
{% if gate.verdict == "NONE" %}<p>Gate: nothing to check ({{ gate.reason }}).</p>
{% else %}
<p><b>Gate: {{ gate.verdict }}.</b>
{% if gate.verdict == "INCOMPLETE" %}{{ gate.reason }}.
{% elif gate.failed_methods %}{{ gate.failed_methods|length }} of {{ methods|length }} method(s)
 produce copies of training images: {{ gate.failed_methods|join(", ") }}.
{% else %}No method produces a copy of a training image.{% endif %}</p>
<ul class="checks">
{% for c in gate.checks %}<li class="{{ 'pass' if c.passed else 'fail' }}"><b class="v">{{ "pass" if c.passed else "FAIL" }}</b>
 <b>{{ c.method }}</b>: {{ c.words }}</li>
{% endfor %}</ul>
<p class="note">These are the checks <code>memaudit gate</code> makes with its defaults: every
method and criterion, no copy allowed (<code>--max-copy-rate 0</code>), the calibrated threshold
where the index has a calibration, else the fixed (published) one. A CI job may set its own
limits.</p>
{% endif %}
{% if screening_words %}<p>{{ screening_words }}</p>{% endif %}

<h2 id="flagged">Flagged outputs beside the training images they copy</h2>
{% if flagged %}
<p class="note">Showing {{ flagged|length }} of {{ n_flagged }} generation(s) flagged as copies by
the {{ verdict_kind }} copy threshold of a criterion, furthest past the threshold first.</p>
<div class="cards">
{% for f in flagged %}{{ card(f) }}{% endfor %}
</div>
{% else %}
<p>None{% if n_any_flagged %} by the {{ verdict_kind }} threshold{% endif %}.</p>
{% endif %}
{% if verdict_kind == "calibrated" %}
{% if n_any_flagged > n_flagged %}
<details class="fold" id="fixed-only"><summary>Folded away: {{ n_any_flagged - n_flagged }}
generation(s) that only the fixed (published) threshold flags, not the calibrated one{% if flagged_fixed_only|length < n_any_flagged - n_flagged %} (showing {{ flagged_fixed_only|length }}){% endif %}</summary>
<p class="note">The fixed thresholds were set on other data; the calibrated threshold of this
index (1% false positives on training-vs-training pairs, METHODS 1.2) does not call these copies.</p>
<div class="cards">
{% for f in flagged_fixed_only %}{{ card(f) }}{% endfor %}
</div>
</details>
{% else %}<p class="note">No generation is flagged by the fixed (published) threshold alone.</p>{% endif %}
{% endif %}

<h2 id="summary">Summary per method</h2>
<p class="note">Copy rate = share of generations whose nearest training image passes the
criterion's copy threshold. <b>fixed</b>: the published threshold; <b>calibrated</b>: the
threshold at 1% false positives on training-vs-training pairs of this index (METHODS 1.2).
Scores keep each criterion's own direction: {% for c in criteria_info %}{{ c.name }}
({{ "higher" if c.higher else "lower" }} = more similar){{ ", " if not loop.last }}{% endfor %}.
"95th pct." is the 95th percentile of similarity, shown in the criterion's units.
Cost is relative to <code>cfg</code> in this run.</p>
<table>
<tr><th>method</th><th>criterion</th><th>n</th><th>copy rate (fixed)</th>
<th>copy rate (calibrated)</th><th>95th pct. score</th><th>most similar</th>
<th>alignment</th><th>UNet rows / image</th><th>cost vs cfg (UNet)</th>
<th>s / image</th><th>time vs cfg</th></tr>
{% for r in summary %}
<tr>
<td>{{ r.method }}</td><td>{{ r.criterion }}</td><td class="num">{{ r.n }}</td>
<td class="num {{ 'copy' if r.copy_rate_fixed else '' }}">{{ pct(r.copy_rate_fixed) }}
 <span class="note">({{ ">" if r.higher_is_more_similar else "<" }} {{ num(r.threshold) }})</span></td>
<td class="num {{ 'copy' if r.copy_rate_calibrated else '' }}">{{ pct(r.copy_rate_calibrated) }}
 {% if r.calibrated_threshold is not none %}<span class="note">({{ num(r.calibrated_threshold) }})</span>{% endif %}</td>
<td class="num">{{ num(r.p95_score) }}</td><td class="num">{{ num(r.best_score) }}</td>
<td class="num">{{ pct(r.alignment) }}</td><td class="num">{{ num(r.unet_calls_per_image) }}</td>
<td class="num">{{ ratio(r.unet_ratio_to_cfg) }}</td><td class="num">{{ num(r.wall_per_image) }}</td>
<td class="num">{{ ratio(r.wall_ratio_to_cfg) }}</td>
</tr>
{% endfor %}
</table>
{% if has_alignment %}<p class="note">Alignment: {{ alignment_note }}</p>{% endif %}
{% if label_tables %}
<h2 id="groups">Copy rate per prompt group</h2>
{% for t in label_tables %}
<h3>Copy rate by prompt label: {{ t.criterion }}, calibrated (fixed){% if t.has_reproduction %};
reproduction{% endif %}</h3>
{% if t.has_reproduction %}<p class="note"><b>Reproduction</b>: share of a group's images whose
nearest training item is the prompt's own target (the prompt list's <code>target_key</code>)
and whose score passes the fixed, published cut; it counts the contrast-amplified copies that
a threshold calibrated at 1% FPR misses (docs/criteria.md "Reproduction").</p>{% endif %}
<table>
<tr><th>method</th>{% for lab in t.labels %}<th>{{ lab if lab is not none else "(no label)" }}</th>{% endfor %}</tr>
{% for row in t.rows %}
<tr><td>{{ row.method }}</td>
{% for c in row.cells %}<td class="num {{ 'copy' if c and ((c.calibrated if c.calibrated is not none else c.fixed)) else '' }}">{% if c %}{{ pct(c.calibrated) }} ({{ pct(c.fixed) }}){% if c.reproduction is not none %}; <b>{{ pct(c.reproduction) }}</b> reproduced{% endif %} <span class="note">n={{ c.n }}</span>{% endif %}</td>{% endfor %}
</tr>
{% endfor %}
</table>
{% endfor %}

{% endif %}
{% if has_quality %}
<h2 id="quality">Quality and alignment beside the copy rate</h2>
<p class="note">What a method costs in image quality and text alignment, each also as a ratio
to <code>cfg</code> in this run (METHODS 4). Copy rate: {{ criteria[0] }}, {{ verdict_kind }}
threshold. <b>KID</b>: kernel distance to a sample of the training set (unbiased; ± its
standard deviation over random subsets of the size shown). <b>FD</b>: Fréchet distance,
biased upwards at small n, so compare it only at the same n and feature space. Lower is
closer to the training images. The feature space is named on every row: FID proper is FD in
<code>fid-inception-v3</code>.</p>
<table>
<tr><th>method</th><th>copy rate (× cfg)</th><th>alignment (× cfg)</th>
<th>CLIP score (× cfg)</th><th>UNet × cfg</th><th>feature space</th><th>n / reference</th>
<th>KID ± std (subset)</th><th>FD (× cfg)</th></tr>
{% for q in quality %}
<tr>
{% if q.first %}<td rowspan="{{ q.span }}">{{ q.method }}</td>
<td rowspan="{{ q.span }}" class="num {{ 'copy' if q.copy_rate else '' }}">{{ pct(q.copy_rate) }} ({{ ratio(q.copy_ratio) }})</td>
<td rowspan="{{ q.span }}" class="num">{{ pct(q.alignment) }} ({{ ratio(q.alignment_ratio) }})</td>
<td rowspan="{{ q.span }}" class="num">{{ num(q.clip_score) }} ({{ ratio(q.clip_score_ratio) }})</td>
<td rowspan="{{ q.span }}" class="num">{{ ratio(q.unet_ratio) }}</td>{% endif %}
{% if q.features %}<td><code>{{ q.features }}</code></td><td class="num">{{ q.n }} / {{ q.n_reference }}</td>
<td class="num">{{ num(q.kid) }} ± {{ num(q.kid_std) }} ({{ q.kid_subset_size }})</td>
<td class="num">{{ num(q.fd) }} ({{ ratio(q.fd_ratio) }})</td>
{% else %}<td colspan="4" class="note">no quality figures (quality = false)</td>{% endif %}
</tr>
{% endfor %}
</table>
{% endif %}

<h2 id="prompts">Per prompt</h2>
{% if prompt_rows %}
<p class="note">Each prompt with a flagged output: every generation per method (red frame: a
copy by the {{ verdict_kind }} threshold{% if verdict_kind == "calibrated" %}; orange: by the fixed
threshold only{% endif %}), beside the training image its most similar flagged output matches.
Each row has a stable address: <code>report.html#prompt-</code> and the first 12 hex digits of
the SHA-256 of the prompt's text.</p>
{% for r in prompt_rows %}
<div class="prow" id="{{ r.anchor }}">
 <div class="prompt"><a class="anchor" href="#{{ r.anchor }}">#</a>{{ r.prompt }}</div>
 <div class="note">{% if r.label %}<span class="label">{{ r.label }}</span> · {% endif %}{{ r.copies }}
  of {{ r.n }} generation(s) copy ({{ verdict_kind }}) · nearest training item
  <code>{{ r.train.neighbour_key }}</code> ({{ r.train.dup_count }} duplicate(s)), {{ r.train.criterion }}
  score {{ num(r.train.score) }}</div>
 <div class="strip">
  <figure>{% if r.train.train_uri %}<img src="{{ r.train.train_uri }}" width="64" height="64"
   alt="training image {{ r.train.neighbour_key }}">{% else %}<div style="width:64px;height:64px;
   border:1px dashed #999" class="note">unavailable</div>{% endif %}
   <figcaption>training item</figcaption></figure>
  {% for c in r.cells %}<figure><div class="thumbs">{% for i in c.images %}{% if i.uri %}<img
   src="{{ i.uri }}" width="48" height="48" class="{{ i.state }}" alt="{{ c.method }} seed {{ i.seed }}"
   title="{{ c.method }}, seed {{ i.seed }}{{ ': copy' if i.state == 'copy' else (': fixed threshold only' if i.state == 'fixed' else '') }}">{% else %}<span
   class="note">n/a</span>{% endif %}{% endfor %}</div>
   <figcaption>{{ c.method }}</figcaption></figure>{% endfor %}
 </div>
</div>
{% endfor %}
{% if prompt_rows|length < n_flagged_prompts %}<p class="note">... {{ n_flagged_prompts - prompt_rows|length }}
more prompt(s) with a flagged output (in the tables below).</p>{% endif %}
{% else %}<p class="note">No prompt has a flagged output.</p>{% endif %}
{% for t in prompt_tables %}
<h3>{{ t.criterion }}: copies / generations (best score)</h3>
<table>
<tr><th>prompt</th><th>label</th>{% for m in methods %}<th>{{ m }}</th>{% endfor %}</tr>
{% for row in t.rows %}
<tr{% if row.place_id %} id="{{ row.anchor }}"{% endif %}><td class="prompt">{% if row.link %}<a href="#{{ row.anchor }}">{{ row.prompt }}</a>{% else %}{{ row.prompt }}{% endif %}</td><td>{{ row.label or "" }}</td>
{% for c in row.cells %}
<td class="num {{ 'copy' if c and c.copies else '' }}">{% if c %}{{ c.copies }}/{{ c.n }}
 ({{ num(c.best_score) }}){% endif %}</td>
{% endfor %}</tr>
{% endfor %}
</table>
{% endfor %}

<h2 id="diagnostics">Diagnostics</h2>
<p class="note">The plots and scores behind the figures above, folded: click a line to unfold
it (the PDF prints them unfolded).</p>
<details class="diag" id="distributions"><summary>Similarity distributions: one plot per
 criterion</summary>
{% for p in plots %}<div class="plot">{{ p }}</div>{% endfor %}
</details>
{% if magnitudes %}
<details class="diag" id="magnitudes"><summary>Guidance magnitude and switch steps (transition-point
 methods): {{ n_magnitude_plots }} plot(s)</summary>
<p class="note">||e_c - e_u||<sub>2</sub> per sampling step of each seed (Jain et al. CVPR 2025,
Figure 2), with each seed's switch step (the step from which full CFG applies) marked under
the axis. Before the switch a transition rule samples without CFG; a memorized prompt shows a
high magnitude that falls once the trajectory leaves the attraction basin.</p>
{% for m in magnitudes %}
<h3>{{ m.method }}</h3>
<div class="cards">
{% for p in m.plots %}<div class="card"><div class="prompt">{{ p.prompt }}</div>
<div class="note">{% if p.label %}<span class="label">{{ p.label }}</span> · {% endif %}switch
 step per seed: {% for s in p.switches %}{{ s if s is not none else "none" }}{{ ", " if not loop.last }}{% endfor %}</div>
{{ p.svg }}</div>{% endfor %}
</div>
{% endfor %}
</details>
{% endif %}

{% if screens %}
<details class="diag" id="screening"><summary>Pre-generation screening: {{ screens|length }}
 prompt(s)</summary>
{% if not screens[0].score_name or screens[0].score_name == "wen" %}
<p class="note">Wen et al. (ICLR 2024) score: mean magnitude of the text-conditional noise
prediction, ||e_c - e_u||, over {{ screens[0].seeds }} seeds and the first
{{ screens[0].steps }} step(s) (METHODS 2).
{% else %}
<p class="note">Score <code>{{ screens[0].score_name }}</code>{% if screens[0].score_paper %}
 ({{ screens[0].score_paper }}){% endif %}
({% for k, v in screens[0].score_params.items() %}{{ k }}={{ v }}{{ ", " if not loop.last }}
{%- endfor %}),
mean over {{ screens[0].seeds }} seeds (METHODS 2.1).
{% endif %}
{% for n in screens[0].score_notes %}{{ n }}. {% endfor %}
Threshold: {{ num(screens[0].threshold) }}.</p>
<table><tr><th>prompt</th><th>label</th><th>score</th><th>flagged</th></tr>
{% for s in screens[:max_screens] %}
<tr class="{{ 'copy' if s.flagged else '' }}"><td class="prompt">{{ s.prompt }}</td>
<td>{{ s.label or "" }}</td><td class="num">{{ num(s.score) }}</td>
<td>{{ "yes" if s.flagged else ("no" if s.flagged is not none else "") }}</td></tr>
{% endfor %}</table>
{% if screens|length > max_screens %}<p class="note">... {{ screens|length - max_screens }} more
prompts with lower scores (all in the database's <code>screens</code> table).</p>{% endif %}
</details>
{% endif %}

<h2 id="provenance">Provenance</h2>
<table>
<tr><th>database</th><td><code>{{ db_path }}</code> (schema version {{ schema_version }})</td></tr>
<tr><th>run</th><td>{{ run.id }}, started {{ ts(run.started_at) }} UTC, finished
 {{ ts(run.finished_at) if run.finished_at else "(not finished)" }}</td></tr>
<tr><th>model</th><td>{{ run.model }}<br><code>{{ run.model_hash }}</code></td></tr>
<tr><th>index</th><td><code>{{ run.index_path }}</code><br>content hash
 <code>{{ run.index_hash }}</code></td></tr>
<tr><th>device</th><td>{{ run.device }}</td></tr>
<tr><th>seeds</th><td>{{ run.seeds_json }}</td></tr>
<tr><th>versions</th><td>{% for k, v in versions.items() %}{{ k }} {{ v }}{{ ", " if not loop.last }}{% endfor %}</td></tr>
<tr><th>report</th><td>generated {{ generated_at }} by memaudit {{ versions.get("memaudit", "") }}</td></tr>
</table>
{% if left_out %}<h3>Files not shown</h3>
<p class="note">The report inlines only images under the database's folder and training
images from the sources the index recorded; it left out:</p>
<ul>{% for line in left_out %}<li>{{ line }}</li>{% endfor %}</ul>{% endif %}
<h3>Settings</h3>
<pre>{{ settings_json }}</pre>
<h3>Plan</h3>
<pre>{{ plan_json }}</pre>
</body>
</html>
"""
