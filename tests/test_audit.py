"""The audit runner: plan parsing, resumability under a kill, plan-change refusal.

The runner is tested with small stand-ins of the other stages' contracts (sampler, index,
criterion, screening) so each test takes a second; the real chain runs in test_audit_real.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from memaudit.audit import Components, load_plan, plan_difference, run_audit
from memaudit.common import UserError
from memaudit.criteria.base import Criterion, Scores
from memaudit.data.prompts import read_prompts
from memaudit.store import AuditStore

HERE = Path(__file__).parent


class FakeIndex:
    manifest = {"content_hash": "idxhash", "calibration": {}}

    @classmethod
    def open(cls, path: str) -> FakeIndex:
        return cls()

    def item(self, row: int) -> dict:
        return {"key": f"k{row}", "caption": f"<i>caption {row}</i>", "group_count": 4}


class MeanCriterion(Criterion):
    """score = mean pixel (lower = more similar); neighbour = round(10 * mean)."""

    name = "mean"
    higher_is_more_similar = False
    threshold = 0.5
    calibrated_threshold = 0.4

    def score(self, images) -> Scores:
        s = images.flatten(1).mean(1).numpy().astype(float)
        return Scores(score=s, neighbour=np.round(s * 10).astype(np.int64),
                      is_copy=s < self.threshold, is_copy_calibrated=s < 0.4)


@dataclass
class FakeOut:
    images: torch.Tensor
    trace: list
    unet_rows: float
    wall_seconds: float
    prompts: list


def fake_sample(model, prompts, seeds, guidance, steps=4, guidance_scale=2.0, scheduler="ddim",
                criterion=None):
    imgs = []
    for p, s in zip(prompts, seeds, strict=True):
        g = torch.Generator().manual_seed(zlib.crc32(p.encode()) + 1000 * s)
        imgs.append(torch.rand(3, 8, 8, generator=g))
    b = len(prompts)
    trace = [{"t": 999 - j, "u": 1 - j / steps, "guidance_norm": torch.arange(b) + j,
              "scale": torch.full((b,), guidance_scale)} for j in range(steps)]
    return FakeOut(torch.stack(imgs), trace, 2.0 * steps, 0.01, list(prompts))


def fake_components() -> Components:
    model = SimpleNamespace(name="fake", model_hash="modelhash", default_steps=3,
                            default_guidance_scale=2.0)
    return Components(
        load_model=lambda spec, device: model,
        open_index=FakeIndex.open,
        build_index=lambda *a, **k: None,
        make_criterion=lambda name, index: MeanCriterion(),
        make_method=lambda spec, params: SimpleNamespace(name=spec, needs_criterion=False),
        sample=fake_sample,
        read_prompts=read_prompts,
        screen_prompts=lambda model, prompts, steps=1, seeds=4, **kw: np.array(
            [len(p) for p in prompts], dtype=float),
        calibrate_threshold=lambda clean, fpr: float(np.max(clean)),
        alignment=None,
    )


def write_plan(tmp: Path, methods=("cfg", "amg:spe,dup"), seeds=(0, 1, 2), extra: str = "") -> Path:
    (tmp / "idx").mkdir(exist_ok=True)
    (tmp / "trig.txt").write_text("a very specific caption\nanother <script>x</script>\n")
    (tmp / "gen.txt").write_text("a digit\nzero\nsomething\n")
    plan = tmp / "plan.toml"
    plan.write_text(f"""
out = "out"
model = "fake"
index = "idx"
criteria = ["mean"]
methods = {json.dumps(list(methods))}
seeds = {json.dumps(list(seeds))}
steps = 3
batch_size = 4
{extra}
[params.amg]
c3 = 50
[[prompts]]
file = "trig.txt"
label = "trigger"
[[prompts]]
file = "gen.txt"
label = "generic"
[screen]
steps = 1
seeds = 2
clean_label = "generic"
""")
    return plan


def run_plan(plan: Path, **kw):
    return run_audit(load_plan(plan), components=fake_components(), device="cpu", **kw)


def test_plan_parsing(tmp_path):
    plan = load_plan(write_plan(tmp_path, extra='"guidance_scale" = 1.5'))
    assert plan.out == str(tmp_path / "out") and plan.index == str(tmp_path / "idx")
    assert plan.params == {"amg": {"c3": 50}} and plan.guidance_scale == 1.5
    assert [p.label for p in plan.prompts] == ["trigger", "generic"]
    assert plan.screen is not None and plan.screen.clean_label == "generic"
    bad = tmp_path / "bad.toml"
    bad.write_text('out = "o"\nmodel = "m"\nindex = "idx"\nprompts = ["trig.txt"]\nsedes = 3\n')
    with pytest.raises(UserError, match="unknown key.*sedes"):
        load_plan(bad)
    bad.write_text('out = "o"\nmodel = "m"\nindex = "idx"\nprompts = ["nope.txt"]\n')
    with pytest.raises(UserError, match="nope.txt not found"):
        load_plan(bad)
    bad.write_text("out = [")
    with pytest.raises(UserError, match="invalid TOML"):
        load_plan(bad)


def test_full_run_rows(tmp_path):
    res = run_plan(write_plan(tmp_path))
    # 5 prompts x 3 seeds = 15 pairs -> 4 batches of 4, x 2 methods, + 1 screen unit
    assert res.units_done == 9 and res.units_skipped == 0
    with AuditStore(res.db_path, read_only=True) as s:
        assert s.count("prompts") == 5 and s.count("generations") == 30
        assert s.count("matches") == 30 and s.count("steps") == 90
        assert s.count("screens") == 5 and s.count("units") == 9
        run = s.run()
        assert run["status"] == "finished" and run["model_hash"] == "modelhash"
        assert run["index_hash"] == "idxhash" and json.loads(run["seeds_json"]) == [0, 1, 2]
        assert json.loads(run["plan_json"])["params"] == {"amg": {"c3": 50}}
        # the screening threshold is calibrated on the generic prompts (max length here)
        scr = s.query("SELECT p.text, s.score, s.threshold, s.flagged FROM screens s "
                      "JOIN prompts p ON p.id = s.prompt_id")
        assert all(r["threshold"] == len("something") for r in scr)
        assert {r["text"] for r in scr if r["flagged"]} == {
            "a very specific caption", "another <script>x</script>"}
        g = s.query("SELECT * FROM generations ORDER BY id LIMIT 1")[0]
        assert (res.db_path.parent / g["image_path"]).exists()
        assert g["unet_calls"] == 6 and g["steps"] == 3
        m = s.query("SELECT * FROM matches WHERE generation_id = ?", [g["id"]])[0]
        assert m["neighbour_key"] == f"k{m['neighbour_row']}" and m["dup_count"] == 4
        st = s.query("SELECT * FROM steps WHERE generation_id = ? ORDER BY step", [g["id"]])
        assert [r["t"] for r in st] == [999, 998, 997]
        assert json.loads(st[0]["extra_json"]) == {"scale": 2.0}
    # the same plan again: nothing to do, nothing written twice
    again = run_plan(write_plan(tmp_path))
    assert again.units_done == 0 and again.units_skipped == 9 and again.run_id == res.run_id
    with AuditStore(res.db_path, read_only=True) as s:
        assert s.count("generations") == 30 and s.count("runs") == 1


def _rows(db: Path) -> dict:
    with AuditStore(db, read_only=True) as s:
        return {
            "gen": sorted(tuple(r) for r in s.con.execute(
                "SELECT prompt_id, method, seed, image_path FROM generations").fetchall()),
            "matches": sorted(tuple(r) for r in s.con.execute(
                "SELECT g.prompt_id, g.method, g.seed, m.score FROM matches m "
                "JOIN generations g ON g.id = m.generation_id").fetchall()),
            "steps": s.count("steps"), "screens": s.count("screens"),
            "units": s.count("units"), "runs": s.count("runs"),
        }


_CHILD = """
import sys
sys.path.insert(0, {here!r})
from test_audit import run_plan
run_plan({plan!r})
"""


@pytest.mark.parametrize("env", ["MEMAUDIT_TEST_KILL_AFTER_UNITS",
                                 "MEMAUDIT_TEST_KILL_BEFORE_COMMIT"])
def test_killed_run_resumes_without_duplicates(tmp_path, env):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = run_plan(write_plan(ref_dir))
    expected = _rows(ref.db_path)
    work = tmp_path / "work"
    work.mkdir()
    plan = write_plan(work)
    code = _CHILD.format(here=str(HERE), plan=str(plan))
    # kill after 3 units, then (resuming) after 2 more, then run to the end
    for n, rc in ((3, {3, 4}), (2, {3, 4})):
        p = subprocess.run([sys.executable, "-c", code], env={**os.environ, env: str(n)},
                           capture_output=True, text=True)
        assert p.returncode in rc, p.stderr
    partial = _rows(work / "out" / "audit.duckdb")
    assert 0 < partial["units"] < 9 and partial["runs"] == 1
    assert len(partial["gen"]) == len(set(partial["gen"]))
    res = run_plan(plan)
    assert res.units_done == 9 - partial["units"]
    got = _rows(res.db_path)
    assert got == expected  # same rows, none twice, none lost


def test_changed_plan_refused_unless_new_run(tmp_path):
    run_plan(write_plan(tmp_path))
    with pytest.raises(UserError, match=r"differs from run 1.*seeds: \[0, 1, 2\] -> \[0, 1\]"):
        run_plan(write_plan(tmp_path, seeds=(0, 1)))
    res = run_plan(write_plan(tmp_path, seeds=(0, 1)), new_run=True)
    assert res.run_id == 2
    with AuditStore(res.db_path, read_only=True) as s:
        assert s.count("runs") == 2
        assert s.con.execute("SELECT count(*) FROM generations WHERE run_id = 2"
                             ).fetchone()[0] == 20


def test_plan_difference_names_nested_keys():
    d = plan_difference({"a": 1, "p": {"amg": {"c3": 50}}}, {"a": 1, "p": {"amg": {"c3": 60}}})
    assert d == ["p.amg.c3: 50 -> 60"]
