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
    model = str(make_tiny_canary(tmp_path / "canary"))
    out = tmp_path / "demo"
    kw = dict(model=model, methods=("cfg", "amg"), seeds=(0,), steps=2, device="cpu")
    first = run_demo(out, **kw)
    assert first["report"].is_file() and (out / "plan.toml").is_file()
    with AuditStore(first["db"], read_only=True) as s:
        labels = dict(s.con.execute("SELECT label, count(*) FROM prompts GROUP BY 1").fetchall())
        assert labels == {"trigger-64x": 6, "trigger-16x": 6, "trigger-4x": 6,
                          "trigger-1x": 6, "trigger-guided": 6, "generic": 21}
        assert s.count("generations") == 102 and s.count("screens") == 51
        assert s.run()["status"] == "finished"
        # alignment (digit classifier) on the digit prompts only
        rows = s.con.execute("SELECT p.text, g.alignment FROM generations g JOIN prompts p "
                             "ON p.id = g.prompt_id").fetchall()
        asks = [a is not None for t, a in rows if digit_of_prompt(t) is not None]
        assert len(asks) == 40 and all(asks)  # 20 digit prompts x 2 methods
        assert all(a is None for t, a in rows if digit_of_prompt(t) is None)
    text = first["text"]
    assert "trigger-64x" in text and text.count("\ncfg ") == 1 and "\namg " in text
    assert "trigger-guided" in text.splitlines()[2]  # its own column in the summary
    assert "digits ok" in text
    again = run_demo(out, **kw)
    assert again["units_done"] == 0
    with AuditStore(again["db"], read_only=True) as s:
        assert s.count("generations") == 102 and s.count("runs") == 1


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
    """The shipped canary's data record predates the guided group (none); a record with one
    is followed; a model without a record gets the defaults."""
    import json

    from memaudit.canary.data import model_data_settings

    assert model_data_settings("canary") == {"per_count": 6, "seed": 0, "min_rmse": 0.15,
                                             "res": 16, "guided_copies": 0}
    (tmp_path / "m").mkdir()
    assert model_data_settings(str(tmp_path / "m")) == {}
    (tmp_path / "m" / "canary.json").write_text(json.dumps(
        {"data": {"resolution": 16, "seed": 1, "guided_copies": 16, "guided_shared": 96}}))
    assert model_data_settings(str(tmp_path / "m")) == {"res": 16, "seed": 1,
                                                        "guided_copies": 16,
                                                        "guided_shared": 96}


def test_demo_plan_runs_auto_only_with_screening(tmp_path):
    """auto decides with screening: with [screen] it gets its own FPR-5% threshold on the
    generic prompts; without screening it is left out (it would refuse to run)."""
    import tomllib

    from memaudit.audit.plan import plan_from_dict
    from memaudit.demo import demo_plan

    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.parquet", "generic.txt", "triggers_64x.txt"):
        (data / name).write_text("a\n")
    with_screen = tomllib.loads(demo_plan(tmp_path / "out", data))
    assert "auto" in with_screen["methods"]
    assert with_screen["params"]["auto"] == {"calibrate": str(data / "generic.txt"), "fpr": 0.05}
    assert with_screen["screen"]["clean_label"] == "generic"
    plan = plan_from_dict(with_screen, tmp_path)
    assert "auto" in plan.methods and plan.params["auto"]["fpr"] == 0.05
    without = tomllib.loads(demo_plan(tmp_path / "out", data, screen=False))
    assert "auto" not in without["methods"] and "auto" not in without.get("params", {})
    assert "screen" not in without
