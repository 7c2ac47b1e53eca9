"""`memaudit calibrate` (issue 17): the transition rules' switch points measured on a model.
The choice rule on exact candidates, then the command end to end on a tiny canary over the
real canary data and a real pixel index (its written plan loads, its record holds every
candidate), and the bad inputs."""

from __future__ import annotations

import json
import tomllib

import pytest
from audit_fixtures import make_tiny_canary

from memaudit.cli import main
from memaudit.guidance.calibrate import Calibration, Candidate, choose, sweep, sweep_rule


def _c(method, alignment_ratio, reproduction, **params):
    return Candidate(method, params, alignment_ratio, alignment_ratio, reproduction, 1.0)


def test_choose_latest_switch_keeping_alignment_then_lowest_reproduction():
    cands = [  # static, s_before 0: alignment falls as tau falls
        _c("static", 1.00, 0.9, tau=1.0, s_before=0.0),
        _c("static", 0.97, 0.5, tau=0.5, s_before=0.0),
        _c("static", 0.90, 0.0, tau=0.2, s_before=0.0),
        _c("static", 0.96, 0.1, tau=0.1, s_before=0.0),  # latest that keeps 0.95
        # s_before 1: keeps alignment to tau 0, but reproduces more
        _c("static", 1.00, 0.9, tau=1.0, s_before=1.0),
        _c("static", 0.99, 0.3, tau=0.0, s_before=1.0),
    ]
    best = choose("static", cands, 0.95)
    assert best.params == {"tau": 0.1, "s_before": 0.0}
    # ties in reproduction: the higher alignment
    tie = choose("static", [_c("static", 0.96, 0.3, tau=0.1, s_before=0.0),
                            _c("static", 0.99, 0.3, tau=0.05, s_before=1.0)], 0.95)
    assert tie.params["s_before"] == 1.0
    # CFG never on (tau 0) is no transition: measured, never chosen
    assert choose("static", [_c("static", 1.0, 0.0, tau=0.0, s_before=1.0)], 0.95) is None
    assert choose("opposite", [_c("opposite", 1.0, 0.5, tau=0.5),
                               _c("opposite", 1.0, 0.0, tau=0.0)], 0.95).params == {"tau": 0.5}
    dyn = [_c("dynamic", 1.0, 0.8, min_step=2), _c("dynamic", 0.95, 0.4, min_step=10),
           _c("dynamic", 0.94, 0.1, min_step=20)]
    assert choose("dynamic", dyn, 0.95).params == {"min_step": 10}
    assert choose("dynamic", dyn[2:], 0.95) is None


def test_sweeps_run_from_cfg_to_never():
    st = sweep("static", 50)
    assert len(st) == 42 and st[0] == {"tau": 1.0, "s_before": 0.0}
    assert st[20] == {"tau": 0.0, "s_before": 0.0} and st[21]["s_before"] == 1.0
    assert [p["tau"] for p in sweep("opposite", 50, (0.5, 1.0))] == [1.0, 0.5]
    dyn = [p["min_step"] for p in sweep("dynamic", 50)]
    assert dyn[0] == 2 and dyn == sorted(dyn) and dyn[-1] <= 40
    with pytest.raises(ValueError):
        sweep("amg", 50)


def test_each_sweep_stops_at_its_first_lost_alignment():
    """static's two sweeps (s_before 0, 1) each stop after the first candidate under keep."""
    align = {(0.0, 1.0): 1.0, (0.0, 0.5): 0.9, (0.0, 0.0): 0.99,  # s_before 0 loses at 0.5
             (1.0, 1.0): 1.0, (1.0, 0.5): 0.97, (1.0, 0.0): 0.96}
    seen = []

    def measure(method, p):
        seen.append((p["s_before"], p["tau"]))
        return _c(method, align[p["s_before"], p["tau"]], p["tau"], **p)

    got = sweep_rule("static", sweep("static", 50, (1.0, 0.5, 0.0)), measure, 0.95)
    assert seen == [(0.0, 1.0), (0.0, 0.5), (1.0, 1.0), (1.0, 0.5), (1.0, 0.0)]
    assert [c.params["tau"] for c in got] == [1.0, 0.5, 1.0, 0.5, 0.0]
    assert choose("static", got, 0.95).params == {"tau": 0.5, "s_before": 1.0}  # not tau 0


def test_toml_of_the_choice_is_plan_params():
    cal = Calibration(cfg_alignment=1.0, cfg_reproduction=0.6, keep=0.95)
    cal.chosen["static"] = _c("static", 0.97, 0.1, tau=0.35, s_before=1.0)
    cal.chosen["dynamic"] = _c("dynamic", 0.99, 0.2, min_step=12)
    doc = tomllib.loads(cal.toml())
    assert doc == {"params": {"static": {"tau": 0.35, "s_before": 1.0},
                              "dynamic": {"min_step": 12}}}


@pytest.fixture(scope="module")
def canary_setup(tmp_path_factory):
    from memaudit.canary.data import build_canary_data
    from memaudit.index.build import build_index

    tmp = tmp_path_factory.mktemp("cal")
    build_canary_data(tmp / "data", digits_limit=600)
    build_index(tmp / "data" / "train.parquet", "pixels", tmp / "index")
    return tmp, make_tiny_canary(tmp / "canary")


def test_calibrate_command_writes_a_plan_that_loads(canary_setup, capsys):
    from memaudit.audit.plan import load_plan

    tmp, model = canary_setup
    plan = tmp / "plan.toml"
    plan.write_text(f'out = "run"\nmodel = "{model}"\nmethods = ["cfg", "static"]\n'
                    f'index = "{tmp / "index"}"\n'
                    f'[[prompts]]\nfile = "{tmp / "data" / "generic.txt"}"\n')
    out = tmp / "calibrated.toml"
    args = ["calibrate", "--model", str(model), "--clean", str(tmp / "data" / "generic.txt"),
            "--triggers", str(tmp / "data" / "prompts.csv"), "--trigger-label", "1x",
            "--index", str(tmp / "index"), "--methods", "static,dynamic", "--seeds", "1",
            "--steps", "4", "--keep", "0.0", "--plan", str(plan), "--out", str(out),
            "--device", "cpu"]
    main(args)
    written = load_plan(out)
    # keep 0: every candidate passes, so the latest switch of each sweep that turns CFG on
    assert written.params["static"]["tau"] == 0.05
    assert written.params["dynamic"] == {"min_step": 3}  # 4 steps: min_step 2, 3
    assert written.methods == ["cfg", "static"]
    record = json.loads(out.with_suffix(".json").read_text())
    assert len([c for c in record["candidates"] if c["method"] == "static"]) == 42
    assert record["chosen"]["dynamic"]["params"] == {"min_step": 3}
    assert all(0.0 <= c["reproduction"] <= 1.0 for c in record["candidates"])
    assert "[params.static]" in capsys.readouterr().out
    # a plan that already sets a calibrated table is refused; the output is never an input
    plan2 = tmp / "plan2.toml"
    plan2.write_text(plan.read_text() + "[params.static]\ntau = 0.5\n")
    for bad, match in ((args[:-6] + ["--plan", str(plan2), "--out", str(tmp / "o2.toml")],
                        "already sets"),
                       (args[:-6] + ["--plan", str(plan), "--out", str(plan)], "input")):
        with pytest.raises(SystemExit) as e:
            main(bad + ["--device", "cpu"])
        assert e.value.code == 2
        assert match in capsys.readouterr().err
    assert not (tmp / "o2.toml").exists()


def test_calibrate_bad_inputs(canary_setup, capsys):
    tmp, model = canary_setup
    base = ["calibrate", "--model", str(model), "--clean", str(tmp / "data" / "generic.txt"),
            "--triggers", str(tmp / "data" / "prompts.csv"), "--index", str(tmp / "index"),
            "--out", str(tmp / "x.toml"), "--device", "cpu"]
    for extra, match in ((["--methods", "amg"], "--methods"),
                         (["--trigger-label", "nope"], "no prompts labelled"),
                         (["--seeds", "0"], "--seeds"), (["--keep", "1.5"], "--keep")):
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2, extra
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1
    assert not (tmp / "x.toml").exists()
