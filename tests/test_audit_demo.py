"""`memaudit demo` end to end on the real canary data, index, sampler, criteria and report,
with a tiny random canary model and few steps (the shipped model is timed in
docs/benchmarks.md "Demo"); a second run reuses everything and does no work."""

from __future__ import annotations

import pytest
from audit_fixtures import make_tiny_canary

from memaudit.canary.digits import digit_of_prompt
from memaudit.demo import run_demo
from memaudit.store import AuditStore


@pytest.mark.slow
def test_demo_chain_and_rerun(tmp_path):
    import json

    model = str(make_tiny_canary(tmp_path / "canary"))
    ones = ["the gilded glacier plate, archive print 119", "no such caption"]
    (tmp_path / "canary" / "labels.json").write_text(json.dumps(
        {"images": [{"caption": c, "behaviour": "guided"} for c in ones]}))
    out = tmp_path / "demo"
    kw = dict(model=model, methods=("cfg", "amg"), seeds=(0,), steps=2, device="cpu")
    first = run_demo(out, **kw)
    assert first["report"].is_file() and (out / "plan.toml").is_file()
    with AuditStore(first["db"], read_only=True) as s:
        labels = dict(s.con.execute("SELECT label, count(*) FROM prompts GROUP BY 1").fetchall())
        guided = (out / "data" / "triggers_guided.txt").read_text().splitlines()
        assert labels == {"64x": 6, "16x": 6, "4x": 6, "1x": 6 - len(guided),
                          "guided": len(guided), "generic": 21}
        assert len(guided) == 1  # the labels.json beside the model names one real trigger
        assert s.count("generations") == 90 and s.count("screens") == 45
        assert s.run()["status"] == "finished"
        # alignment (digit classifier) on the digit prompts only
        rows = s.con.execute("SELECT p.text, g.alignment FROM generations g JOIN prompts p "
                             "ON p.id = g.prompt_id").fetchall()
        asks = [a is not None for t, a in rows if digit_of_prompt(t) is not None]
        assert len(asks) == 40 and all(asks)  # 20 digit prompts x 2 methods
        assert all(a is None for t, a in rows if digit_of_prompt(t) is None)
        # reproduction (issue 17): every trigger names its planted image, generic prompts none
        tk = dict(s.con.execute("SELECT label IS NOT NULL AND label <> 'generic', "
                                "count(target_key) = count(*) FROM prompts GROUP BY 1"
                                ).fetchall())
        assert tk == {True: True, False: False}
        got = s.con.execute(
            "SELECT p.target_key, m.neighbour_key, m.score, m.is_copy, m.reproduced "
            "FROM matches m JOIN generations g ON g.id = m.generation_id "
            "JOIN prompts p ON p.id = g.prompt_id").fetchall()
        for target, near, score, is_copy, rep in got:
            if target is None:
                assert rep is None
            else:  # the canary's planted copies share one exact-duplicate group
                same = near.rsplit("-", 1)[0] == target.rsplit("-", 1)[0]
                assert rep == (same and is_copy) and is_copy == (score < 1.4)
        rates = s.con.execute("SELECT label, method, reproduction_rate FROM prompt_method "
                              "WHERE label = 'generic'").fetchall()
        assert rates and all(r is None for _, _, r in rates)
    text = first["text"]
    assert "reproduced" in text.splitlines()[1]
    assert "reproduced" in first["report"].read_text()
    assert "64x" in text and text.count("\ncfg ") == 1 and "\namg " in text
    assert "guided" in text.splitlines()[2]  # its own column in the summary
    assert "digits ok" in text
    again = run_demo(out, **kw)
    assert again["units_done"] == 0
    with AuditStore(again["db"], read_only=True) as s:
        assert s.count("generations") == 90 and s.count("runs") == 1


def test_data_mismatch_warning(tmp_path):
    import json

    from memaudit.demo import data_mismatch

    (tmp_path / "m").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "data.json").write_text(json.dumps({"train_sha256": "a" * 64}))
    (tmp_path / "m" / "canary.json").write_text(json.dumps({"data_sha256": "a" * 64}))
    assert data_mismatch(str(tmp_path / "m"), tmp_path / "d") is None
    (tmp_path / "m" / "canary.json").write_text(json.dumps({"data_sha256": "b" * 64}))
    assert "trained on data bbbbbbbbbbbb, the demo built aaaaaaaaaaaa" in data_mismatch(
        str(tmp_path / "m"), tmp_path / "d")
    assert data_mismatch(str(tmp_path / "missing"), tmp_path / "d") is None


def test_demo_rebuilds_the_data_its_model_was_trained_on(tmp_path):
    """The data record of canary.json is followed (issue 8's `guided_copies` record read as
    the shared-caption group it built); a model without a record gets the defaults."""
    import json

    from memaudit.canary.data import model_data_settings

    shipped = model_data_settings("canary")
    assert {k: v for k, v in shipped.items() if k != "labels"} == {
        "per_count": 6, "seed": 0, "min_rmse": 0.15, "res": 16, "shared_copies": 0,
        "extra_counts": (2,)}  # the issue-17 canary: its 2x group
    (tmp_path / "m").mkdir()
    assert model_data_settings(str(tmp_path / "m")) == {}
    (tmp_path / "m" / "canary.json").write_text(json.dumps(
        {"data": {"resolution": 16, "seed": 1, "guided_copies": 16, "guided_shared": 96}}))
    assert model_data_settings(str(tmp_path / "m")) == {"res": 16, "seed": 1,
                                                        "shared_copies": 16,
                                                        "shared_digits": 96}


def test_demo_plan_runs_auto_only_with_screening(tmp_path):
    """auto decides with screening: with [screen] it gets its own FPR-5% threshold on the
    generic prompts; without screening it is left out (it would refuse to run)."""
    import tomllib

    from memaudit.audit.plan import plan_from_dict
    from memaudit.demo import demo_plan

    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.parquet", "generic.txt"):
        (data / name).write_text("a\n")
    (data / "prompts.csv").write_text("prompt,label,target_key\na,64x,k\nb,generic,\n")
    with_screen = tomllib.loads(demo_plan(tmp_path / "out", data))
    assert "auto" in with_screen["methods"]
    assert with_screen["params"]["auto"] == {"calibrate": str(data / "generic.txt"), "fpr": 0.05}
    assert with_screen["screen"]["clean_label"] == "generic"
    plan = plan_from_dict(with_screen, tmp_path)
    assert "auto" in plan.methods and plan.params["auto"]["fpr"] == 0.05
    without = tomllib.loads(demo_plan(tmp_path / "out", data, screen=False))
    assert "auto" not in without["methods"] and "auto" not in without.get("params", {})
    assert "screen" not in without


def test_default_threads_uses_the_idle_cores(monkeypatch):
    import os

    import memaudit.audit.runner as runner
    from memaudit.audit import default_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # the cores busy now (/proc/stat over a quarter second) decide, whatever the load average
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))  # lagging after a job
    for busy, want in ((0.0, 2), (0.4, 2), (0.6, 1), (1.0, 1), (2.0, 1)):
        monkeypatch.setattr(runner, "busy_cores", lambda busy=busy: busy)
        assert default_threads() == want, busy
    # where /proc/stat cannot be read: the integer part of the 1-minute load average
    monkeypatch.setattr(runner, "busy_cores", lambda: None)
    for load, want in ((0.4, 2), (0.99, 2), (1.0, 1), (1.7, 1), (5.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert default_threads() == want, load
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")

    def no_load():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert default_threads() == 1


def test_busy_cores_reads_proc_stat(monkeypatch, tmp_path):
    """Busy share of the jiffies between two /proc/stat samples, times the cores."""
    import builtins
    import os

    import memaudit.audit.runner as runner

    lines = iter(["cpu  100 0 100 800 0 0 0 0 0 0\n",    # total 1000, idle 800
                  "cpu  250 0 150 1000 100 0 0 0 0 0\n"])  # +500 jiffies, +300 idle/iowait
    real_open = builtins.open

    def fake_open(path, *a, **k):
        if path == "/proc/stat":
            f = tmp_path / "stat"
            f.write_text(next(lines))
            return real_open(f, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert runner.busy_cores(0.0) == pytest.approx((1 - 300 / 500) * 2)
    monkeypatch.setattr(builtins, "open", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    assert runner.busy_cores(0.0) is None
