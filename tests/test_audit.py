"""The audit runner: plan parsing, resumability under a kill, plan-change refusal.

The runner is tested with small stand-ins of the other stages' contracts (sampler, index,
criterion, screening) so each test takes a second; the real chain runs in test_audit_real.py.
"""

from __future__ import annotations

import hashlib
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
from memaudit.screen import DEFAULT_SCORE
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
    # default_steps differs from the plan's steps = 3, so the plan's value is seen to win
    model = SimpleNamespace(name="fake", model_hash="modelhash", default_steps=7,
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
criteria = ["nl2"]
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


def test_screening_records_its_score_parameters_and_their_source(tmp_path):
    """METHODS 2.1: a family that falls back to SD 1.x's anisotropy weights says so, in the
    database (screens.score_name, screens.params_json) and the report."""
    from memaudit.report import build_context, render_html

    plan = write_plan(tmp_path)
    plan.write_text(plan.read_text().replace("[screen]\n", '[screen]\nscore = "anisotropy"\n'))
    comp = fake_components()
    model = comp.load_model("fake", "cpu")
    model.family = "sdxl"
    res = run_audit(load_plan(plan), components=comp, device="cpu")
    note = ("anisotropy weights (g1, g2) = (1, 2): fallback: SD 1.x's official weights, not "
            "tuned for sdxl models; cosine on eps")
    with AuditStore(res.db_path, read_only=True) as s:
        rows = s.query("SELECT score_name, params_json FROM screens")
    assert len(rows) == 5 and {r["score_name"] for r in rows} == {"anisotropy"}
    rec = json.loads(rows[0]["params_json"])
    assert rec == {"paper": "Asthana & Belagiannis, ICLR 2026",
                   "params": {"g1": 1.0, "g2": 2.0, "low_index": -3}, "notes": [note]}
    html = render_html(build_context(res.db_path))
    assert "Score <code>anisotropy</code>" in html and note.replace("'", "&#39;") in html


def test_full_run_rows(tmp_path):
    res = run_plan(write_plan(tmp_path))
    # 5 prompts x 3 seeds = 15 pairs -> 4 batches of 4, x 2 methods, + 1 screen unit
    assert res.units_done == 9 and res.units_skipped == 0
    with AuditStore(res.db_path, read_only=True) as s:
        assert s.count("prompts") == 5 and s.count("generations") == 30
        assert s.count("matches") == 30 and s.count("steps") == 90
        assert s.count("screens") == 5 and s.count("units") == 9
        recs = {(r["score_name"], r["params_json"]) for r in s.query(
            "SELECT score_name, params_json FROM screens")}
        assert len(recs) == 1 and next(iter(recs))[0] == DEFAULT_SCORE  # one score, recorded
        assert set(json.loads(next(iter(recs))[1])) == {"paper", "params", "notes"}
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
    with pytest.raises(UserError, match=r"differs from run 1.*seeds: \[0, 1, 2\] -> \[0, 1\].*"
                                        r"finished: use --new-run"):
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


def _plan_text(tmp: Path, body: str) -> Path:
    (tmp / "idx").mkdir(exist_ok=True)
    (tmp / "trig.txt").write_text("a very specific caption\n")
    (tmp / "gen.txt").write_text("a digit\n")
    plan = tmp / "plan.toml"
    plan.write_text('out = "out"\nmodel = "fake"\n' + body)
    return plan


_OK_INDEX = 'index = "idx"\n'
_OK_PROMPTS = '[[prompts]]\nfile = "trig.txt"\n[[prompts]]\nfile = "gen.txt"\nlabel = "generic"\n'


@pytest.mark.parametrize("body, message", [
    ("steps = 0\n", "'steps' must be an integer >= 1"),
    ("steps = -3\n", "'steps' must be an integer >= 1"),
    ("steps = 2.5\n", "'steps' must be an integer >= 1"),
    ('scheduler = "heun"\n', "unknown scheduler 'heun'; known: ddim, dpm, euler"),
    ('batch_size = "big"\n', "'batch_size' must be an integer >= 1"),
    ('seeds = "0,1"\n', "'seeds' must be a list of integers"),
    ("seeds = [-1]\n", "'seeds' must be a list of integers >= 0"),
    ('guidance_scale = "high"\n', "'guidance_scale' must be a number"),
    ('methods = ["cfg", "nonsense"]\n', "unknown method 'nonsense'"),
    ('methods = ["amg:spe,fast"]\n', "unknown AMG part"),
    ('methods = ["amg"]\n[params.amg]\nc3 = "strong"\n', "parameter amg.c3"),
    ('[params.dynamic]\nmin_stepz = 3\n', "unknown parameter 'min_stepz'"),
    ('criteria = ["l2-tiled"]\nmethods = ["amg"]\n',
     "'l2-tiled' has no differentiable similarity, so it cannot guide amg"),
    ('criteria = ["lpips"]\n', "unknown criterion 'lpips'"),
    ("model = 3\n", "'model' must be a non-empty string"),
])
def test_bad_plan_refused_before_anything_is_written(tmp_path, body, message):
    """issue 11: `steps = 0` silently ran 50 steps; negative steps, an unknown scheduler and
    wrong types were caught after the run row existed (or ended in a traceback)."""
    if body.startswith("model"):
        plan = tmp_path / "plan.toml"
        _plan_text(tmp_path, "")
        plan.write_text('out = "out"\n' + body + _OK_INDEX + _OK_PROMPTS)
    else:
        plan = _plan_text(tmp_path, body.split("[params")[0] + _OK_INDEX + _OK_PROMPTS
                          + ("[params" + body.split("[params")[1] if "[params" in body else ""))
    with pytest.raises(UserError, match=message):
        run_plan(plan)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("screen, message", [
    ("steps = 0\n", r"\[screen\] steps must be an integer >= 1"),
    ("seeds = -2\n", r"\[screen\] seeds must be an integer >= 1"),
    ("fpr = 2.0\n", r"\[screen\] fpr must be in \(0, 1\)"),
    ('threshold = "high"\n', r"\[screen\] threshold must be a number"),
    ('clean_label = "clean"\n', r"clean_label 'clean' matches no prompt label"),
    ("stepz = 1\n", r"unknown \[screen\] key\(s\) stepz"),
])
def test_bad_screen_table_refused_before_anything_is_written(tmp_path, screen, message):
    plan = _plan_text(tmp_path, _OK_INDEX + _OK_PROMPTS + "[screen]\n" + screen)
    with pytest.raises(UserError, match=message):
        run_plan(plan)
    assert not (tmp_path / "out").exists()


def test_screen_steps_beyond_the_schedule_refused_before_the_run_row(tmp_path):
    plan = _plan_text(tmp_path, _OK_INDEX + _OK_PROMPTS + "[screen]\nsteps = 8\n")
    with pytest.raises(UserError, match="exceeds the model's 7-step schedule"):
        run_plan(plan)  # the fake model's default_steps is 7
    assert not (tmp_path / "out" / "audit.duckdb").exists()


def test_plan_index_table_uses_the_recipe_reader(tmp_path):
    """issue 11: `size = 16` worked in a recipe and was a TypeError traceback in a plan."""
    from memaudit.index.recipe import load_recipe

    (tmp_path / "train.parquet").write_bytes(b"")
    plan = load_plan(_plan_text(tmp_path, '[index]\nsource = "train.parquet"\nsize = 16\n'
                                "batch_size = 8\n" + _OK_PROMPTS))
    assert plan.index_build == {"source": str(tmp_path / "train.parquet"), "embedder": "pixels",
                                "factory": "Flat", "batch_size": 8,
                                "embedder_opts": {"size": 16}}
    assert plan.index == str(tmp_path / "out" / "index")
    recipe = tmp_path / "r.toml"
    recipe.write_text('data = "train.parquet"\nembedder = "pixels"\nsize = 16\nbatch_size = 8\n')
    assert load_recipe(recipe)["embedder_opts"] == {"size": 16}
    for bad, msg in (('size = "big"', "bad pixel size|size must be"),
                     ("batch_size = 0", "batch_size must be a positive integer"),
                     ('device = "cpu"', "unknown keys device"),
                     ('embedder = "sscd"', "criterion 'nl2' needs another index")):
        p = _plan_text(tmp_path, f'[index]\nsource = "train.parquet"\n{bad}\n' + _OK_PROMPTS)
        with pytest.raises(UserError, match=msg):
            load_plan(p)


def test_output_folder_may_not_hold_or_be_an_input(tmp_path):
    for out, msg in (("trig.txt", "exists and is a file"),
                     ("idx/out", "inside the input folder .*idx")):
        plan = _plan_text(tmp_path, _OK_INDEX + _OK_PROMPTS)
        plan.write_text(plan.read_text().replace('out = "out"', f'out = "{out}"'))
        with pytest.raises(UserError, match=msg):
            load_plan(plan)
    # OUT may hold inputs, but not where the audit writes (images/, audit.duckdb)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "gen.txt").write_text("a digit\n")
    plan = _plan_text(tmp_path, _OK_INDEX + '[[prompts]]\nfile = "images/gen.txt"\n')
    plan.write_text(plan.read_text().replace('out = "out"', 'out = "."'))
    with pytest.raises(UserError, match="memaudit writes .*images, which holds the input"):
        load_plan(plan)
    plan.write_text(plan.read_text().replace("images/gen.txt", "gen.txt"))
    assert load_plan(plan).out == str(tmp_path)
    assert (tmp_path / "trig.txt").read_text() == "a very specific caption\n"


class Boom(RuntimeError):
    pass


def _failing_sample(after: int, exc: type[BaseException] = Boom):
    calls = {"n": 0}

    def sample(*a, **kw):
        calls["n"] += 1
        if calls["n"] > after:
            raise exc("the GPU fell off")
        return fake_sample(*a, **kw)

    return sample


def test_failed_run_is_marked_failed_and_the_gate_does_not_pass_it(tmp_path):
    from memaudit.gate import gate_db

    plan = write_plan(tmp_path)
    comp = fake_components()
    comp.sample = _failing_sample(after=2)
    with pytest.raises(Boom):
        run_audit(load_plan(plan), components=comp, device="cpu")
    db = tmp_path / "out" / "audit.duckdb"
    with AuditStore(db, read_only=True) as s:
        assert s.run()["status"] == "failed" and s.count("units") == 2
    res = gate_db(db, max_copy_rate=1.0)  # every committed unit would pass
    assert res.verdict == "INCOMPLETE" and res.exit_code == 3 and not res.passed
    # the same plan resumes the failed run and finishes it
    res = run_plan(plan)
    assert res.run_id == 1 and res.units_skipped == 2 and res.units_done == 7
    with AuditStore(db, read_only=True) as s:
        assert s.run()["status"] == "finished"
    assert gate_db(db, max_copy_rate=1.0).exit_code == 0


def test_corrected_plan_starts_over_a_failed_or_killed_run(tmp_path):
    for exc, status in ((Boom, "failed"), (KeyboardInterrupt, "running")):
        work = tmp_path / status
        work.mkdir()
        comp = fake_components()
        comp.sample = _failing_sample(after=1, exc=exc)
        with pytest.raises(exc):
            run_audit(load_plan(write_plan(work)), components=comp, device="cpu")
        with AuditStore(work / "out" / "audit.duckdb", read_only=True) as s:
            assert s.run()["status"] == status
        logs: list[str] = []
        res = run_audit(load_plan(write_plan(work, seeds=(0, 1))),
                        components=fake_components(), device="cpu", log=logs.append)
        assert res.run_id == 2 and any(f"run 1 is {status}" in m for m in logs)
        with AuditStore(res.db_path, read_only=True) as s:
            assert [r["status"] for r in s.query("SELECT status FROM runs ORDER BY id")] == [
                status, "finished"]


def test_built_pixel_index_compares_at_the_model_output_size(tmp_path):
    """issue 11: a plan that builds a pixel index compares at what the model draws unless
    it sets size; an index finer than the model is warned about."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"png": [b"x"]}), tmp_path / "train.parquet")
    built: list[dict] = []
    logs: list[str] = []

    class PixelIndex(FakeIndex):
        manifest = {"content_hash": "h", "embedder": {"name": "pixels",
                                                      "config": {"size": [32, 32]}}}

    for extra in ("", "size = 32\n"):
        work = tmp_path / f"w{len(extra)}"
        work.mkdir()
        (work / "train.parquet").write_bytes((tmp_path / "train.parquet").read_bytes())
        plan = _plan_text(work, '[index]\nsource = "train.parquet"\n' + extra + _OK_PROMPTS)
        comp = fake_components()
        model = comp.load_model("fake", "cpu")
        model.latent_shape, model.is_latent = (1, 16, 16), False  # draws 16x16
        comp.build_index = lambda src, emb, out, **kw: (built.append(kw),
                                                        Path(out).mkdir(parents=True))
        comp.open_index = lambda path: PixelIndex()
        run_audit(load_plan(plan), components=comp, device="cpu", log=logs.append)
    assert built[0]["embedder_opts"] == {"size": [16, 16]}  # the model's output size
    assert built[1]["embedder_opts"] == {"size": 32}  # the plan's own choice wins
    warn = [m for m in logs if m.startswith("warning:")]
    assert warn and "compares pixels at 32x32, finer than the 16x16 images" in warn[0]


def _run_prompts(db: Path, run_id: int) -> dict[str, set[str]]:
    with AuditStore(db, read_only=True) as s:
        return {t: {r[0] for r in s.con.execute(
            f"SELECT DISTINCT p.text FROM {t} x JOIN prompts p ON p.id = x.prompt_id "
            "WHERE x.run_id = ?", [run_id]).fetchall()} for t in ("generations", "screens")}


_GEN = "a digit\nzero\nsomething\n"  # write_plan's gen.txt
_CHANGED = {"replace": "a cat\nzero\nsomething\n", "append": _GEN + "one more\n",
            "remove": "a digit\nzero\n"}


@pytest.mark.parametrize("change", list(_CHANGED))
def test_a_changed_prompt_list_is_never_a_silent_reuse(tmp_path, change):
    """issue 18: the plan recorded only the prompt file's path, so replacing the prompts and
    rerunning printed "9 already done" and kept the old rows, appending left the quality
    figures of the old prompts, and a removed line kept its rows. A run is keyed by the
    content it audits: over a finished run a changed list is refused, naming it."""
    plan = write_plan(tmp_path)
    first = run_plan(plan)
    (tmp_path / "gen.txt").write_text(_CHANGED[change])
    with pytest.raises(UserError, match=r"prompt list gen.txt changed since run 1 \(sha256 "
                       r"[0-9a-f]{12} -> [0-9a-f]{12}, \d prompts -> \d prompts\).*run 1 is "
                       "finished: use --new-run"):
        run_plan(plan)
    with AuditStore(first.db_path, read_only=True) as s:
        assert s.count("runs") == 1 and s.count("units") == 9  # nothing written
    res = run_plan(plan, new_run=True)
    assert res.run_id == 2 and res.units_skipped == 0
    want = {"a very specific caption", "another <script>x</script>",
            *_CHANGED[change].split("\n")} - {""}
    assert _run_prompts(res.db_path, 2) == {"generations": want, "screens": want}
    with AuditStore(res.db_path, read_only=True) as s:
        plan_json = json.loads(s.run(2)["plan_json"])
    gen = next(p for p in plan_json["prompts"] if p["file"].endswith("gen.txt"))
    assert gen["rows"] == len(want) - 2
    assert gen["sha256"] == hashlib.sha256(_CHANGED[change].encode()).hexdigest()


@pytest.mark.parametrize("change", ["replace", "remove"])
def test_a_changed_prompt_list_over_a_failed_run_starts_a_new_run(tmp_path, change):
    """Over a failed (or killed) run, changed prompts start a new run beside it, as any
    changed plan does; the removed line's rows are not in it (before: the failed run was
    resumed, its batches shifted under the committed unit names)."""
    plan = write_plan(tmp_path)
    comp = fake_components()
    comp.sample = _failing_sample(after=3)
    with pytest.raises(Boom):
        run_audit(load_plan(plan), components=comp, device="cpu")
    (tmp_path / "gen.txt").write_text(_CHANGED[change])
    logs: list[str] = []
    res = run_audit(load_plan(plan), components=fake_components(), device="cpu",
                    log=logs.append)
    assert res.run_id == 2 and res.units_skipped == 0
    assert any("prompt list gen.txt changed since run 1" in m and "run 1 is failed" in m
               for m in logs)
    want = {"a very specific caption", "another <script>x</script>",
            *_CHANGED[change].split("\n")} - {""}
    assert _run_prompts(res.db_path, 2)["generations"] == want


def test_a_prompt_list_changed_after_the_plan_was_read_is_refused(tmp_path):
    """The content checked is the content audited: a list edited between reading the plan and
    reading the prompts is refused before the run row exists."""
    p = load_plan(write_plan(tmp_path))
    (tmp_path / "gen.txt").write_text("a cat\n")
    with pytest.raises(UserError, match="prompt list .*gen.txt changed since the plan was read"):
        run_audit(p, components=fake_components(), device="cpu")
    assert not (tmp_path / "out" / "audit.duckdb").exists()


def test_a_changed_model_or_index_hash_is_never_a_silent_reuse(tmp_path):
    """A model or an index without a recorded hash is not "unchanged" (before: a missing hash
    on either side skipped the comparison)."""
    plan = write_plan(tmp_path)
    run_plan(plan)
    comp = fake_components()
    model = comp.load_model("fake", "cpu")
    model.model_hash = None
    with pytest.raises(UserError, match=r"model weights changed since run 1 \(modelhash -> "
                       r"none\).*use --new-run"):
        run_audit(load_plan(plan), components=comp, device="cpu")
    for manifest, want in (({"content_hash": "otherhash"}, "otherhash"), ({}, "none")):
        comp = fake_components()  # the same model, another index (or one without a hash)
        comp.open_index = lambda path, m=manifest: SimpleNamespace(manifest=m,
                                                                   item=FakeIndex().item)
        with pytest.raises(UserError, match=r"the index changed since run 1 \(idxhash -> "
                           f"{want}" r"\).*run 1 is finished: use --new-run"):
            run_audit(load_plan(plan), components=comp, device="cpu")
    with AuditStore(tmp_path / "out" / "audit.duckdb", read_only=True) as s:
        assert s.count("runs") == 1  # nothing started
