"""The audit on the real pieces: a real pixel index built from Parquet by the plan, a tiny
random canary model loaded by path, the real sampler, guidances, criteria and screening."""

from __future__ import annotations

import json

import pytest
from audit_fixtures import make_tiny_canary, make_training_parquet, write_plan

from memaudit.audit import load_plan, run_audit
from memaudit.store import AuditStore


def test_real_chain(tmp_path):
    src = make_training_parquet(tmp_path / "train.parquet")
    canary = make_tiny_canary(tmp_path / "canary")
    plan = load_plan(write_plan(tmp_path, src, str(canary),
                                methods=("cfg", "dynamic", "amg:spe,sim", "rna")))
    res = run_audit(plan, device="cpu")
    assert (tmp_path / "out" / "index" / "manifest.json").exists()  # built by the plan
    with AuditStore(res.db_path, read_only=True) as s:
        # 4 prompts x 2 seeds x 4 methods; 2 criteria each; 3 steps each
        assert s.count("generations") == 32 and s.count("matches") == 64
        assert s.count("steps") == 96 and s.count("screens") == 4
        run = s.run()
        assert run["status"] == "finished" and len(run["model_hash"]) == 64
        manifest = json.loads(run["settings_json"])["index_manifest"]
        assert run["index_hash"] == manifest["content_hash"]
        assert json.loads(run["versions_json"])["torch"]
        cal = s.query("SELECT DISTINCT criterion, threshold, calibrated_threshold FROM matches "
                      "ORDER BY criterion")
        assert [(r["criterion"], r["threshold"]) for r in cal] == [("l2-tiled", 0.15),
                                                                   ("nl2", 1.4)]
        assert all(r["calibrated_threshold"] is not None for r in cal)
        # the rna perturbation is recorded as the final prompt (4 numbers inserted)
        rna = s.query("SELECT p.text, g.final_prompt FROM generations g JOIN prompts p "
                      "ON p.id = g.prompt_id WHERE g.method = 'rna'")
        assert all(len(r["final_prompt"].split()) == len(r["text"].split()) + 4 for r in rna)
        # AMG traces its similarity per step; cost: cfg = 2 rows per step
        amg = s.query("SELECT count(sigma_t) AS n FROM steps st JOIN generations g "
                      "ON g.id = st.generation_id WHERE g.method = 'amg:spe,sim'")[0]
        assert amg["n"] == 24
        cost = {r["method"]: r for r in s.query("SELECT * FROM method_cost")}
        assert cost["cfg"]["unet_calls_per_image"] == 6.0
        assert cost["cfg"]["unet_ratio_to_cfg"] == 1.0
        # every row references an image that exists
        for r in s.query("SELECT image_path FROM generations"):
            assert (res.db_path.parent / r["image_path"]).is_file()
        # quality by default: on the canary the digit classifier's features, one row per
        # method against all 27 training items (fewer than the 500 asked for)
        q = s.query("SELECT * FROM method_quality ORDER BY method")
        assert [r["method"] for r in q] == sorted(["cfg", "dynamic", "amg:spe,sim", "rna"])
        assert {r["features"] for r in q} == {"digits-logits-16px"}
        assert all(r["n"] == 8 and r["n_reference"] == 27 and r["kid_subset_size"] == 4
                   and r["fd"] > 0 and r["kid_std"] >= 0 for r in q)
        cfg_row = next(r for r in q if r["method"] == "cfg")
        assert cfg_row["fd_ratio_to_cfg"] == 1.0 and cfg_row["kid_minus_cfg"] == 0.0
        qs = json.loads(run["settings_json"])["quality"]
        assert qs["reference"] == {"n": 27, "requested": 500, "seed": 0, "skipped": 0}
        assert qs["features"][0]["name"] == "digits-logits-16px"


@pytest.mark.slow
def test_audit_cli_resume_and_changed_plan(tmp_path):
    """The CLI: a finished plan reruns as a no-op; a changed plan exits 2 naming the change;
    --new-run starts run 2."""
    import subprocess
    import sys

    src = make_training_parquet(tmp_path / "train.parquet")
    canary = make_tiny_canary(tmp_path / "canary")
    plan = write_plan(tmp_path, src, str(canary), methods=("cfg",), seeds=(0,), screen=False,
                      criteria=("nl2",))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "memaudit", "--quiet", "audit", *args],
                              capture_output=True, text=True)

    p = cli(str(plan), "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert "run 1: 2 units done, 0 already done" in p.stdout  # generation + quality
    p = cli(str(plan))
    assert p.returncode == 0 and "run 1: 0 units done, 2 already done" in p.stdout
    plan.write_text(plan.read_text().replace("steps = 3", "steps = 2"))
    p = cli(str(plan))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "the plan differs from run 1" in p.stderr and "steps: 3 -> 2" in p.stderr
    p = cli(str(plan), "--new-run")
    assert p.returncode == 0 and "run 2: 2 units done" in p.stdout
    p = cli(str(tmp_path / "missing.toml"))
    assert p.returncode == 2 and "not found" in p.stderr


_CHILD = """
import sys
from memaudit.audit import load_plan, run_audit
run_audit(load_plan(sys.argv[1]), device="cpu")
"""


def _rows(db):
    with AuditStore(db, read_only=True) as s:
        gens = s.con.execute(
            "SELECT p.text, g.method, g.seed, g.image_path, g.final_prompt, m.score "
            "FROM generations g JOIN prompts p ON p.id = g.prompt_id "
            "JOIN matches m ON m.generation_id = g.id ORDER BY 1, 2, 3").fetchall()
        counts = {t: s.count(t) for t in ("generations", "matches", "steps", "screens",
                                          "units", "runs", "quality")}
        quality = s.con.execute("SELECT method, features, n, n_reference, kid, kid_std, fd "
                                "FROM quality ORDER BY 1, 2").fetchall()
    return gens + quality, counts


@pytest.mark.slow
def test_real_run_killed_mid_unit_resumes(tmp_path):
    """The real chain killed in the middle of a unit (images written, rows not committed),
    then resumed: the same rows as an uninterrupted run, none twice."""
    import os
    import subprocess
    import sys

    src = make_training_parquet(tmp_path / "train.parquet")
    canary = make_tiny_canary(tmp_path / "canary")
    ref_dir, work = tmp_path / "ref", tmp_path / "work"
    ref_dir.mkdir()
    work.mkdir()
    kw = dict(methods=("cfg", "rna"), seeds=(0, 1), criteria=("nl2",), batch_size=2)
    ref = run_audit(load_plan(write_plan(ref_dir, src, str(canary), **kw)), device="cpu")
    plan = write_plan(work, src, str(canary), **kw)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEMAUDIT_TEST_KILL_BEFORE_COMMIT": "4"}
    p = subprocess.run([sys.executable, "-c", _CHILD, str(plan)], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 4, p.stderr
    _, partial = _rows(work / "out" / "audit.duckdb")
    assert partial["units"] == 3 and partial["generations"] == 6
    res = run_audit(load_plan(plan), device="cpu")
    assert res.units_done == 11 - 3  # 8 generation units, screening, 2 quality units
    got, counts = _rows(res.db_path)
    want, ref_counts = _rows(ref.db_path)
    assert counts == ref_counts and counts["generations"] == 16 and counts["quality"] == 2
    assert [r[:4] for r in got] == [r[:4] for r in want]
    assert [x for r in got for x in r[4:] if x is not None] == pytest.approx(
        [x for r in want for x in r[4:] if x is not None], abs=1e-5)
