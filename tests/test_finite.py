"""NaN and infinities never pass as numbers (issue 18, defect 3), and what the report shows
of untrusted text: one check for every number a user gives, a non-finite generation or score
is an error of its unit (exit 3, never a pass), no criterion scores a non-finite image.

The command-line cases (exit 2, one line, nothing written) are rows of test_bad_input.py.
"""

from __future__ import annotations

import math
import shutil

import duckdb
import numpy as np
import pytest
import torch
from audit_fixtures import (
    copying_audit,
    copying_sample,
    make_tiny_canary,
    make_training_parquet,
    write_plan,
)

from memaudit.common import (
    EXIT_INCOMPLETE,
    NonFiniteError,
    UserError,
    check_finite_tree,
    user_number,
)


# --- the one check every number a user gives goes through -----------------------------
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "+Infinity", " nan "])
def test_user_number_refuses_non_finite_text(text):
    with pytest.raises(UserError, match="--x must be a finite number"):
        user_number(text, "--x")


def test_user_number_values_ranges_and_types():
    assert user_number("2.5", "--x", lo=0) == 2.5
    assert user_number(3, "--x", integer=True) == 3 and isinstance(user_number(3, "x"), float)
    for value, kw, msg in ((float("nan"), {}, "finite"), (-1.0, {"lo": 0}, "must be >= 0"),
                           (0.0, {"lo": 0, "lo_open": True}, "must be > 0"),
                           (1.5, {"hi": 1}, "must be <= 1"), ("x", {}, "must be a number"),
                           (True, {}, "must be a number"), ([1], {}, "must be a number"),
                           (2.5, {"integer": True}, "must be an integer"),
                           ("1e400", {}, "finite")):
        with pytest.raises(UserError, match=msg):
            user_number(value, "--x", **kw)


def test_every_float_of_a_toml_or_json_document_is_checked_by_its_path():
    doc = {"a": 1.0, "screen": {"params": {"g2": math.nan}}, "l": [1, 2.0]}
    with pytest.raises(UserError, match=r"plan: screen.params.g2 must be a finite number"):
        check_finite_tree(doc, "plan:")
    with pytest.raises(UserError, match=r"l\[1\] must be a finite"):
        check_finite_tree({"l": [1.0, -math.inf]}, "")
    assert check_finite_tree({"ok": [1.0, {"b": 2}]}, "x") == {"ok": [1.0, {"b": 2}]}


def test_method_and_score_parameters_are_checked_where_they_are_built():
    """`make_params` builds every method's and screening score's Params: one place."""
    from memaudit.guidance import make_guidance
    from memaudit.screen import make_score

    with pytest.raises(UserError, match="method 'amg' parameter c3 must be a finite"):
        make_guidance("amg", c3=math.inf)
    with pytest.raises(UserError, match="'anisotropy' parameter g2 must be a finite"):
        make_score("anisotropy", g2=math.nan)
    assert make_score("anisotropy", g2=0.5).params.g2 == 0.5


def test_lora_scale_is_finite():
    from memaudit.models.lora import parse_lora_spec

    assert parse_lora_spec("x.safetensors:-0.5")[1] == -0.5
    assert str(parse_lora_spec("c:/x/y.safetensors")[0]) == "c:/x/y.safetensors"
    for bad in ("x.safetensors:nan", "x.safetensors:inf", "x.safetensors:-Infinity"):
        with pytest.raises(UserError, match="finite"):
            parse_lora_spec(bad)


# --- no criterion scores a non-finite image -------------------------------------------
@pytest.fixture(scope="module")
def nl2(tmp_path_factory):
    from memaudit.criteria import make_criterion
    from memaudit.index import build_index

    tmp = tmp_path_factory.mktemp("nl2")
    src = make_training_parquet(tmp / "train.parquet")
    build_index(src, "pixels", tmp / "idx", calibrate=False)
    return make_criterion("nl2", tmp / "idx")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_image_is_never_scored(nl2, bad):
    """Before: a NaN output scored nL2 = 0.0, an exact copy of an arbitrary item."""
    x = torch.rand(2, 3, 16, 16)
    x[1, 0, 3, 4] = bad
    with pytest.raises(NonFiniteError, match="criterion nl2: an image to score") as e:
        nl2.score(x)
    assert e.value.exit_code == EXIT_INCOMPLETE
    v = np.zeros((1, nl2.dim), np.float32)
    v[0, 5] = bad
    with pytest.raises(NonFiniteError, match="embedding"):
        nl2.score_from_vectors(v)
    assert np.isfinite(nl2.score(x[:1]).score).all()  # a finite image is scored as before


# --- a non-finite generation is an error of its unit ----------------------------------
def _nan_sample(*args, **kw):
    out = copying_sample(*args, **kw)
    out.images[-1, :, 0, 0] = math.nan  # the last image of every batch
    return out


def test_a_nan_generation_fails_the_audit_and_the_gate_never_passes(tmp_path):
    from memaudit.audit import default_components, load_plan, run_audit
    from memaudit.gate import gate_db
    from memaudit.store import AuditStore

    src = make_training_parquet(tmp_path / "train.parquet")
    canary = make_tiny_canary(tmp_path / "canary")
    comp = default_components()
    comp.sample = _nan_sample
    plan = load_plan(write_plan(tmp_path, src, str(canary), methods=("cfg",), screen=False,
                                criteria=("nl2",)))
    with pytest.raises(NonFiniteError, match=r"unit gen\|cfg\|0: the cfg generation of "
                                             r"prompt .* holds NaN") as e:
        run_audit(plan, components=comp, device="cpu")
    assert e.value.exit_code == EXIT_INCOMPLETE
    with AuditStore(plan.db_path, read_only=True) as s:
        assert [r["status"] for r in s.query("SELECT status FROM runs")] == ["failed"]
        assert s.count("matches") == 0  # nothing of the unit was recorded
    assert not list((plan.out_dir / "images").rglob("*.png"))  # nor written
    res = gate_db(plan.db_path, max_copy_rate=1.0)
    assert res.verdict == "INCOMPLETE" and res.exit_code == EXIT_INCOMPLETE


def test_a_nan_generation_writes_nothing_in_generate(tmp_path, monkeypatch):
    import memaudit.sampler
    from memaudit.generate import generate
    from memaudit.models import load_model

    canary = load_model(make_tiny_canary(tmp_path / "canary"), device="cpu")
    monkeypatch.setattr(memaudit.sampler, "sample", _nan_sample)
    with pytest.raises(NonFiniteError, match="the cfg generation of prompt 'b' seed 0"):
        generate(canary, ["a planted one", "b"], ["cfg"], 1, tmp_path / "out", steps=1)
    assert not (tmp_path / "out" / "generations.parquet").exists()
    assert not list((tmp_path / "out").rglob("*.png"))


def test_a_nan_screening_score_is_an_error(tmp_path):
    from memaudit.models import load_model
    from memaudit.screen import screen_prompts
    from memaudit.screen.base import ScreenScore

    class Broken(ScreenScore):  # a score that overflows on some prompt
        name = "broken"

        def score_rows(self, inp):
            return torch.tensor([math.nan if i % 2 else 1.0 for i in range(len(inp.x))],
                                dtype=torch.float64)

    m = load_model(make_tiny_canary(tmp_path / "canary"), device="cpu")
    with pytest.raises(NonFiniteError, match=r"broken screening score of 1 prompt\(s\) "
                                             r"\(first: 'b'\)"):
        screen_prompts(m, ["a", "b"], seeds=1, score=Broken(), progress=False)


# --- a database written before: a stored NaN is never a pass --------------------------
@pytest.fixture(scope="module")
def audit_db(tmp_path_factory):
    return copying_audit(tmp_path_factory.mktemp("audit"))


def _copy_db(audit_db, tmp_path, sql: str, params: list | None = None):
    db = tmp_path / "copy.duckdb"
    shutil.copy(audit_db, db)
    con = duckdb.connect(str(db))
    con.execute(sql, params or [])
    con.close()
    return db


@pytest.mark.parametrize("sql", [
    "UPDATE matches SET score = 'NaN'::DOUBLE WHERE generation_id = "
    "(SELECT min(generation_id) FROM matches)",
    "UPDATE screens SET score = 'Infinity'::DOUBLE WHERE prompt_id = "
    "(SELECT min(prompt_id) FROM screens)"])
def test_a_stored_non_finite_score_gates_incomplete(audit_db, tmp_path, sql):
    from memaudit.gate import gate_db

    db = _copy_db(audit_db, tmp_path, sql)
    assert gate_db(audit_db, max_copy_rate=1.0).exit_code == 0
    res = gate_db(db, max_copy_rate=1.0, max_screen_score=1e9)
    assert res.verdict == "INCOMPLETE" and res.exit_code == EXIT_INCOMPLETE
    assert "NaN or infinite score" in res.incomplete


# --- the report shows control characters of prompts visibly ---------------------------
def test_bidi_overrides_esc_and_nul_are_visible_in_the_html(audit_db, tmp_path):
    from memaudit.report import write_report

    evil = "planted \u202egnp.exe \x1b[2J \x00 end"
    db = _copy_db(audit_db, tmp_path, "UPDATE prompts SET text = ? WHERE text = "
                  "'another planted one'", [evil])
    html = write_report(db, tmp_path / "r.html").read_text(encoding="utf-8")
    for c in ("\u202e", "\x1b", "\x00"):
        assert c not in html
    assert "planted \\u202egnp.exe \\x1b[2J \\x00 end" in html
