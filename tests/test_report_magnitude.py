"""The report's per-prompt ||e_c - e_u|| plots with switch steps (issue 8, "In every audit"):
a real audit (real sampler, tiny canary, static and dynamic) -> database -> HTML."""

from __future__ import annotations

import json
import math
import re

import pytest
from audit_fixtures import make_tiny_canary, make_training_parquet, write_plan

from memaudit.report import write_report
from memaudit.report.plots import axis_ticks, line_plot_svg, magnitude_d, magnitude_plots
from memaudit.store import AuditStore


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    from memaudit.audit import load_plan, run_audit

    tmp = tmp_path_factory.mktemp("mag")
    src = make_training_parquet(tmp / "train.parquet")
    canary = make_tiny_canary(tmp / "canary")
    plan = write_plan(tmp, src, str(canary), methods=("cfg", "static", "dynamic"),
                      criteria=("nl2",), screen=False)
    db = run_audit(load_plan(plan), device="cpu").db_path
    return db, write_report(db, db.parent / "report.html").read_text()


def test_every_transition_rule_traces_the_magnitude(audit):
    """d = ||e_c - e_u|| is in the trace of static too, also before its switch where the
    applied guidance (guidance_norm = s * d) is 0."""
    db, _ = audit
    with AuditStore(db, read_only=True) as s:
        rows = s.query("SELECT g.method, st.step, st.guidance_norm, st.extra_json FROM steps st "
                       "JOIN generations g ON g.id = st.generation_id")
    static = [(r["step"], r["guidance_norm"], json.loads(r["extra_json"])) for r in rows
              if r["method"] == "static"]
    before = [(n, e) for _, n, e in static if e["switch_step"] < 0]
    assert before and all(n == 0.0 and e["d"] > 0 for n, e in before)
    after = [(n, e) for _, n, e in static if e["switch_step"] >= 0]
    assert after and all(n == pytest.approx(e["scale"] * e["d"], rel=1e-4) for n, e in after)
    assert not any("switch_step" in json.loads(r["extra_json"] or "{}") for r in rows
                   if r["method"] == "cfg")


def test_report_shows_one_plot_per_prompt_and_transition_method(audit):
    db, html = audit
    with AuditStore(db, read_only=True) as s:
        n_prompts = s.con.execute("SELECT count(*) FROM prompts").fetchone()[0]
        finals = s.query(
            "SELECT g.method, p.text, g.seed, st.extra_json FROM steps st JOIN generations g "
            "ON g.id = st.generation_id JOIN prompts p ON p.id = g.prompt_id WHERE st.step = "
            "(SELECT max(step) FROM steps) AND g.method <> 'cfg' ORDER BY p.id, g.seed")
    section = html.split('id="magnitudes">')[1].split("</details>")[0]  # folded: diagnostics
    assert "<h3>static</h3>" in section and "<h3>dynamic</h3>" in section
    assert "<h3>cfg</h3>" not in section  # cfg has no transition point
    assert section.count("<svg") == 2 * n_prompts
    assert section.count("<polyline") == 2 * n_prompts * 2  # one line per seed (2 seeds)
    # the switch steps listed for each prompt are the ones in the database
    for method in ("static", "dynamic"):
        part = section.split(f"<h3>{method}</h3>")[1].split("<h3>")[0]
        listed = re.findall(r"switch\s+step per seed: ([^<]+)</div>", part)
        want = {}
        for r in finals:
            if r["method"] == method:
                want.setdefault(r["text"], []).append(str(json.loads(r["extra_json"])
                                                          ["switch_step"]))
        assert [x.strip() for x in listed] == [", ".join(v) for v in want.values()]


def test_magnitude_from_old_traces_without_d():
    assert magnitude_d({"d": 2.5, "scale": 0.0}, 0.0) == 2.5
    assert magnitude_d({"scale": -2.0}, 3.0) == 1.5  # guidance_norm / |scale|
    assert math.isnan(magnitude_d({"scale": 0.0}, 0.0))  # s = 0 hides d
    assert math.isnan(magnitude_d({}, None))


def test_magnitude_plots_mark_each_seeds_switch_step():
    rows = [{"method": "dynamic", "prompt": "p <b>", "label": "x", "seed": s, "step": j,
             "d": float(j + s), "switch_step": sw}
            for s, sw in ((0, 3), (1, -1)) for j in range(5)]
    (plot,) = magnitude_plots(rows)
    assert plot["switches"] == [3, None]
    assert plot["svg"].count("<polyline") == 2
    assert plot["svg"].count("switch at step") == 1 and "seed 0: switch at step 3" in plot["svg"]


def test_line_plot_coordinates_by_hand():
    svg = line_plot_svg([{"label": "a<", "y": [0.0, 1.0, float("nan"), 1.0]}], title="t",
                        x_label="x", y_label="y", width=268, height=170, legend=False)
    # plot area: left 56, width 268 - 56 - 12 = 200, top 26, height 170 - 26 - 44 = 100;
    # x 0..3 -> 56..256, y 0..1 -> 126..26; the NaN splits the line (one point left over)
    assert '<polyline points="56.0,126.0 122.7,26.0"' in svg
    assert '<circle cx="256.0" cy="26.0"' in svg
    assert "a<" not in svg


def test_step_axis_ticks_at_whole_steps(audit):
    """issue 22: the step axis was labelled 0, 9.8, 19.6, 29.4, ... (fifths of 49 steps)."""
    assert axis_ticks(0, 49, integer=True) == [0, 10, 20, 30, 40]
    assert axis_ticks(0, 2, integer=True) == [0, 1, 2]
    assert axis_ticks(0, 9, integer=True) == [0, 2, 4, 6, 8]
    assert axis_ticks(0, 0.5, integer=True) == [0]
    assert axis_ticks(-0.03, 0.97) == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert axis_ticks(0.1, 1.6) == [0.5, 1.0, 1.5]
    svg = line_plot_svg([{"label": "s", "y": [float(j) for j in range(50)]}], title="t",
                        x_label="step", y_label="y", width=312, height=170, legend=False)
    # plot area: left 56, width 312 - 56 - 12 = 244, bottom 26 + 100; labels 14 below it
    ticks = re.findall(r'<text x="([\d.]+)" y="140" font-size="10" text-anchor="middle">'
                       r"([^<]+)</text>", svg)
    assert ticks == [(f"{56 + 244 * v / 49:.1f}", str(v)) for v in (0, 10, 20, 30, 40)]
    # in the report of a real audit (3 steps): every plot's step labels are whole steps
    _, html = audit
    section = html.split('id="magnitudes">')[1].split("</details>")[0]
    steps = re.findall(r'y="140" font-size="10" text-anchor="middle">([^<]+)</text>', section)
    assert len(steps) == 3 * section.count("<svg") and set(steps) == {"0", "1", "2"}


def test_flagged_section_precedes_every_plot(audit):
    """The magnitude plots (2 per prompt) and the distributions come after the flagged
    outputs, folded under Diagnostics (issue 22: 135 plots used to come first)."""
    from report_outline import SECTIONS, Outline

    page = Outline(audit[1])
    assert page.sections == SECTIONS
    assert len(page.plots) > 2
    assert all(page.at("flagged") < page.at("diagnostics") < i < page.at("provenance")
               and folded for i, folded in page.plots)
