"""`memaudit canary basin` (memaudit.canary.basin): the magnitude curves are ||e_c - e_u|| of
the model, the switch steps are the dynamic rule's, the calibration's tau = 1 is cfg, the
calibrated rules join the table, and the Markdown section is regenerated in place. Runs on
the real canary data (two once-seen images labelled guided, as `canary evaluate` would) and
index with a tiny random model."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from audit_fixtures import make_tiny_canary

from memaudit.canary.basin import basin_groups, run_basin, switch_steps
from memaudit.canary.basin_doc import BEGIN, END, goals
from memaudit.canary.data import build_canary_data


@pytest.fixture(scope="module")
def basin(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("basin")
    data = tmp / "data"
    build_canary_data(data, digits_limit=1200)
    ones = (data / "triggers_1x.txt").read_text().splitlines()
    build_canary_data(data, digits_limit=1200, labels={p: "guided" for p in ones[:2]})
    model = make_tiny_canary(tmp / "canary")
    doc = tmp / "docs" / "basin.md"
    doc.parent.mkdir()
    doc.write_text(f"# Title\n\nwritten by hand before\n\n{BEGIN}\nold\n{END}\n\nand after\n")
    res = run_basin(str(model), tmp / "work", data_dir=data, seeds=1, sweep_seeds=1, steps=4,
                    methods=("cfg", "static", "dynamic"), taus=(1.0, 0.5, 0.0),
                    timing_repeats=1, device="cpu", doc=doc, img_dir=tmp / "docs" / "img",
                    log=lambda s: None)
    return res, model, data, doc


def test_groups_are_the_prompt_lists(basin):
    res, _, data, _ = basin
    assert list(res["groups"]) == ["guided", "64x", "16x", "4x", "1x", "generic"]
    assert res["groups"]["guided"] == (data / "triggers_guided.txt").read_text().splitlines()
    assert len(res["groups"]["generic"]) == 10  # one digit prompt per digit
    assert basin_groups(data) == res["groups"]


def test_magnitude_is_e_c_minus_e_u_of_the_model(basin):
    """Step 0 sees x_T, so d there is ||eps(x_T, c) - eps(x_T, null)|| computed directly."""
    from memaudit.models import load_model
    from memaudit.sampler import initial_noise

    res, model, _, _ = basin
    m = load_model(str(model), device="cpu")
    mag = res["magnitude"]
    prompts = [p for ps in res["groups"].values() for p in ps]  # 1 seed: seed 0 each
    assert len(mag["d_s1"]) == len(prompts) and len(mag["d_s1"][0]) == 4
    sched = m.make_scheduler("ddim")
    sched.set_timesteps(4)
    x = initial_noise(m, [0] * 3)
    with torch.no_grad():
        e_c = m.eps(x, sched.timesteps[0], m.encode_prompts(prompts[:3]))
        e_u = m.eps(x, sched.timesteps[0], m.null_embedding(3))
    want = (e_c - e_u).flatten(1).norm(dim=1).numpy()
    np.testing.assert_allclose(np.asarray(mag["d_s1"])[:3, 0], want, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(mag["d_s0"])[:3, 0], want, rtol=1e-4)  # same x_T
    # after step 0 the s = 0 and s = 1 trajectories differ
    assert not np.allclose(np.asarray(mag["d_s0"])[:, 1:], np.asarray(mag["d_s1"])[:, 1:])


def test_switch_steps_are_the_dynamic_rules(basin):
    """`dynamic` samples with s = 1 until it switches, so its traced switch steps equal the
    rule applied to the s = 1 curves."""
    res, _, _, _ = basin
    dyn = next(r for r in res["methods"] if r["method"] == "dynamic")
    sw = np.asarray(res["magnitude"]["switch"], float)
    labels = np.array(res["magnitude"]["labels"])
    for g, mean in dyn["switch_step"].items():
        assert mean == pytest.approx(sw[labels == g].mean())
    # the rule by hand: a strict minimum at j-1 seen at j >= 2, else forced at u <= 0.2
    d = np.array([[3.0, 2.0, 1.0, 2.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    u = [0.9, 0.7, 0.5, 0.3, 0.1]
    assert switch_steps(d, u, min_step=2, force_u=0.2).tolist() == [3, 4]


def test_calibration_sweeps_the_guided_group_against_digits(basin):
    """tau = 1 (CFG from the first step) is cfg on the guided and generic prompts; every
    static tau is tried with s_before 0 and 1, opposite's tau and dynamic's min_step too; each
    chosen rule joins the table as "RULE (calibrated)" with its parameters."""
    res, _, _, _ = basin
    cal = res["calibration"]
    cfg = next(r for r in res["methods"] if r["method"] == "cfg")
    static = [c for c in cal["candidates"] if c["method"] == "static"]
    assert sorted((c["params"]["s_before"], c["params"]["tau"]) for c in static) == \
        [(s, t) for s in (0.0, 1.0) for t in (0.0, 0.5, 1.0)]
    at1 = next(c for c in static if c["params"] == {"tau": 1.0, "s_before": 0.0})
    assert at1["alignment_ratio"] == pytest.approx(1.0)
    assert at1["alignment"] == pytest.approx(cal["cfg_alignment"])
    assert {c["method"] for c in cal["candidates"]} == {"static", "opposite", "dynamic"}
    # 1 sweep seed = the table's first seed: cfg's reproduction of the guided group agrees
    assert cal["cfg_reproduction"] == pytest.approx(cfg["rates"]["guided"]["reproduction"])
    for rule, c in cal["chosen"].items():
        row = next(r for r in res["methods"] if r["method"] == f"{rule} (calibrated)")
        assert row["params"] == c["params"] and c["alignment_ratio"] >= cal["keep"]
    static_row = next(r for r in res["methods"] if r["method"] == "static")
    assert static_row["switch_step"]["guided"] == 1  # timesteps 750, 500, 250, 0: u <= 0.5


def test_doc_section_regenerated_in_place_and_figures_written(basin):
    res, _, _, doc = basin
    text = doc.read_text()
    assert text.startswith("# Title\n\nwritten by hand before\n\n" + BEGIN)
    assert text.rstrip().endswith(END + "\n\nand after")
    assert "\nold\n" not in text and text.count(BEGIN) == 1
    assert "| cfg |" in text and "| static |" in text and "tau 0.5, s_before 0" in text
    assert "](img/basin_tau_sweep.svg)" in text
    for name in ("basin_magnitude_s0.svg", "basin_magnitude_s1.svg", "basin_tau_sweep.svg"):
        root = ET.parse(doc.parent / "img" / name).getroot()
        assert root.tag.endswith("svg")
    s1 = (doc.parent / "img" / "basin_magnitude_s1.svg").read_text()
    assert s1.count("median dynamic switch step") == 6
    saved = json.loads((Path(res["groups"] and doc.parent.parent) / "work" / "basin.json")
                       .read_text())
    assert saved["methods"][0]["method"] == "cfg"
    # goals are stated for each calibrated transition rule
    assert [g["method"] for g in goals(res)] == [f"{m} (calibrated)"
                                                 for m in res["calibration"]["chosen"]]
