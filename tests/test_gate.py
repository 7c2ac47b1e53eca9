"""The CI gate: pass/fail from a real audit DB, threshold choice, JUnit XML, exit codes."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from audit_fixtures import copying_audit

from memaudit.common import UserError
from memaudit.gate import format_result, gate_db, write_junit


@pytest.fixture(scope="module")
def audit_db(tmp_path_factory):
    return copying_audit(tmp_path_factory.mktemp("gate"))


def test_copy_rate_gate(audit_db):
    # cfg copies 4 of 8 generations (the two planted prompts, 2 seeds each); static none
    res = gate_db(audit_db, criteria=["nl2"], methods=["cfg"], max_copy_rate=0.0)
    assert not res.passed and res.exit_code == 1
    (c,) = res.checks
    assert c.value == 0.5 and "calibrated threshold 1.2" in c.detail
    assert {r["prompt"] for r in c.offending} == {"<script>alert(1)</script> planted",
                                                  "another planted one"}
    assert all(r["copies"] == 2 and r["n"] == 2 and r["neighbour_key"] == "item0-0"
               for r in c.offending)
    assert gate_db(audit_db, methods=["cfg"], max_copy_rate=0.5).passed
    ok = gate_db(audit_db, methods=["static"], max_copy_rate=0.0, threshold="fixed")
    assert ok.passed and "fixed threshold 1.4" in ok.checks[0].detail
    text = format_result(res)
    assert text.startswith("memaudit gate: FAIL") and "another planted one" in text


def test_screen_gate_from_db(audit_db):
    res = gate_db(audit_db, max_copy_rate=None, max_screen_score=1e9)
    assert res.passed and res.checks[0].name == "screen_score"
    worst = res.checks[0].value
    res = gate_db(audit_db, max_copy_rate=None, max_screen_score=worst / 2)
    assert not res.passed and res.checks[0].offending[0]["score"] == worst


def test_usage_errors(audit_db, tmp_path):
    with pytest.raises(UserError, match="criterion 'sscd' not in this run; it has: nl2"):
        gate_db(audit_db, criteria=["sscd"])
    with pytest.raises(UserError, match="--threshold must be one of"):
        gate_db(audit_db, threshold="loose")
    with pytest.raises(UserError, match="not found"):
        gate_db(tmp_path / "missing.duckdb")


def test_junit_xml(audit_db, tmp_path):
    res = gate_db(audit_db, criteria=["nl2"], max_copy_rate=0.0)
    root = ET.parse(write_junit(res, tmp_path / "gate.xml")).getroot()
    suite = root.find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["copy_rate[cfg,nl2]"].find("failure") is not None
    assert "<script>alert(1)</script> planted" in cases["copy_rate[cfg,nl2]"].find(
        "failure").text  # escaped by the XML writer, read back as text
    assert cases["copy_rate[static,nl2]"].find("failure") is None


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memaudit", *args], capture_output=True,
                          text=True)


def test_cli_exit_codes(audit_db, tmp_path):
    p = _cli("gate", str(audit_db), "--criterion", "nl2", "--method", "cfg",
             "--junit", str(tmp_path / "j.xml"))
    assert p.returncode == 1, p.stderr
    assert "FAIL" in p.stdout and "calibrated threshold" in p.stdout
    assert (tmp_path / "j.xml").exists()
    p = _cli("gate", str(audit_db), "--method", "static", "--threshold", "fixed")
    assert p.returncode == 0 and "PASS" in p.stdout and "fixed threshold" in p.stdout
    p = _cli("gate", str(audit_db), "--criterion", "nope")
    assert p.returncode == 2 and p.stderr.startswith("error: criterion 'nope'")
    assert "Traceback" not in p.stderr
    p = _cli("gate", "--screen", "--model", "canary")
    assert p.returncode == 2 and "--prompts" in p.stderr


def test_screen_only_gate(tmp_path):
    import numpy as np
    from audit_fixtures import make_tiny_canary

    from memaudit.gate import gate_screen
    from memaudit.models import load_model
    from memaudit.screen import calibrate_threshold, screen_prompts

    model = str(make_tiny_canary(tmp_path / "canary"))
    (tmp_path / "p.txt").write_text("one prompt\nanother, longer prompt here\n")
    (tmp_path / "clean.txt").write_text("a\nb c\nd e f\n")
    m = load_model(model, "cpu")
    scores = screen_prompts(m, ["one prompt", "another, longer prompt here"], steps=1, seeds=2)
    res = gate_screen(model, tmp_path / "p.txt", max_screen_score=float(np.min(scores)),
                      seeds=2, device="cpu")
    assert not res.passed and [r["prompt"] for r in res.checks[0].offending] == [
        ["one prompt", "another, longer prompt here"][int(np.argmax(scores))]]
    clean = screen_prompts(m, ["a", "b c", "d e f"], steps=1, seeds=2)
    res = gate_screen(model, tmp_path / "p.txt", calibrate=tmp_path / "clean.txt", seeds=2,
                      device="cpu")
    assert res.checks[0].limit == pytest.approx(calibrate_threshold(clean, 0.01))
    assert "calibrated on 3 clean prompts" in res.checks[0].detail
    with pytest.raises(UserError, match="exactly one of"):
        gate_screen(model, tmp_path / "p.txt")


def test_offending_counts_all_generations_of_the_prompt(tmp_path):
    from test_store import _fill

    from memaudit.store import AuditStore

    with AuditStore(tmp_path / "a.duckdb") as s:
        _fill(s)  # cfg: one prompt, 2 seeds, nL2 1.0 (copy) and 2.0 (no copy)
    res = gate_db(tmp_path / "a.duckdb", methods=["cfg"], threshold="fixed")
    (row,) = res.checks[0].offending
    assert (row["copies"], row["n"], row["best_score"]) == (1, 2, 1.0)
    assert "  1/2           1  k3" in format_result(res)


def _copy_db(audit_db, tmp_path, sql: list[tuple[str, list]]):
    import shutil

    import duckdb

    db = tmp_path / "copy.duckdb"
    shutil.copy(audit_db, db)
    con = duckdb.connect(str(db))
    for q, params in sql:
        con.execute(q, params)
    con.close()
    return db


@pytest.mark.parametrize("status", ["running", "failed"])
def test_unfinished_run_is_never_a_pass(audit_db, tmp_path, status):
    """issue 11: a run killed part-way gated PASS on the units it had."""
    db = _copy_db(audit_db, tmp_path, [("UPDATE runs SET status = ?", [status])])
    res = gate_db(db, methods=["static"], max_copy_rate=1.0)  # its units would pass
    assert all(c.passed for c in res.checks)
    assert res.verdict == "INCOMPLETE" and not res.passed and res.exit_code == 3
    text = format_result(res)
    assert text.startswith("memaudit gate: INCOMPLETE") and f"is {status}" in text
    suite = ET.parse(write_junit(res, tmp_path / "j.xml")).getroot().find("testsuite")
    assert suite.get("errors") == "1"
    assert suite.find("testcase/error").get("type") == "AuditIncomplete"
    p = _cli("gate", str(db), "--method", "static", "--max-copy-rate", "1")
    assert p.returncode == 3 and "INCOMPLETE" in p.stdout and "PASS" not in p.stdout
    # an unfinished run without a single scored unit is still exit 3, not a usage error
    (tmp_path / "e").mkdir()
    empty = _copy_db(db, tmp_path / "e", [("DELETE FROM matches", []),
                                          ("DELETE FROM units", [])])
    assert gate_db(empty).exit_code == 3


def test_control_characters_never_reach_the_terminal_or_break_the_junit(audit_db, tmp_path):
    """issue 9: prompts printed raw (ANSI escapes in terminals and CI logs); \\x00 or \\x1b
    made the JUnit file malformed XML."""
    evil = "\x1b[2J\x1b]0;pwned\x07 planted \x00 \u202egnp.exe\x9b31m"
    db = _copy_db(audit_db, tmp_path, [
        ("UPDATE prompts SET text = ? WHERE text = 'another planted one'", [evil])])
    res = gate_db(db, criteria=["nl2"], methods=["cfg"], max_copy_rate=0.0)
    text = format_result(res)
    for c in ("\x1b", "\x00", "\x07", "\u202e", "\x9b"):
        assert c not in text
    assert "\\x1b[2J" in text and "\\u202egnp.exe" in text
    assert "\noffending prompts for copy_rate[cfg,nl2]:" in text  # real line breaks kept
    root = ET.parse(write_junit(res, tmp_path / "j.xml")).getroot()  # well-formed
    failure = root.find("testsuite/testcase/failure").text
    assert "\\x00" in failure and "\x00" not in failure
    p = _cli("gate", str(db), "--criterion", "nl2", "--method", "cfg")
    assert p.returncode == 1 and "\x1b" not in p.stdout and "\\x1b[2J" in p.stdout


def test_junit_never_overwrites_an_input_or_a_foreign_file(audit_db, tmp_path):
    before = audit_db.read_bytes()
    p = _cli("gate", str(audit_db), "--junit", str(audit_db))
    assert p.returncode == 2 and "is one of this command's inputs" in p.stderr
    assert audit_db.read_bytes() == before
    notes = tmp_path / "notes.xml"
    notes.write_text("<notes>mine</notes>")
    p = _cli("gate", str(audit_db), "--junit", str(notes))
    assert p.returncode == 2 and "not a memaudit JUnit file" in p.stderr
    assert notes.read_text() == "<notes>mine</notes>"
    p = _cli("gate", str(audit_db), "--method", "static", "--junit", str(notes),
             "--overwrite")
    assert p.returncode == 0 and "memaudit" in notes.read_text()
    p = _cli("gate", str(audit_db), "--method", "static", "--junit", str(notes))
    assert p.returncode == 0  # its own earlier JUnit file is replaced without --overwrite
def _quality_db(tmp_path, with_cfg=True):
    """cfg, amg and rna on one prompt: FD 2.0 / 2.1 / 3.0 in one feature space, digit
    agreement 1 / 0.5 / 1, CLIP score 30 / 29 / 30."""
    from memaudit.store import AuditStore

    db = tmp_path / "quality.duckdb"
    rows = [("cfg", 2.0, 1.0, 30.0), ("amg", 2.1, 0.5, 29.0), ("rna", 3.0, 1.0, 30.0)]
    with AuditStore(db) as s, s.transaction():
        run = s.add_run(model="m", model_hash=None, index_path=None, index_hash=None, plan={},
                        plan_hash="h", settings={}, versions={}, device="cpu", seeds=[0, 1])
        pid = s.upsert_prompt("a handwritten digit 3")
        for m, fd, align, clip in rows[0 if with_cfg else 1:]:
            for seed in (0, 1):
                s.add_generation(run_id=run, prompt_id=pid, method=m, seed=seed,
                                 image_path=f"{m}{seed}.png", alignment=align, clip_score=clip)
            s.add_quality(run_id=run, method=m, features="digits-logits-16px", dim=10, n=2,
                          n_reference=5, reference_seed=0, kid=fd / 10, kid_std=0.01,
                          kid_subsets=100, kid_subset_size=2, fd=fd)
        s.finish_run(run)  # a finished run: an unfinished one gates INCOMPLETE (issue 11)
    return db


def test_quality_loss_gate(tmp_path):
    db = _quality_db(tmp_path)
    res = gate_db(db, max_copy_rate=None, max_quality_loss=0.1)
    got = {c.name: (round(c.value, 6), c.passed) for c in res.checks}
    assert got == {"quality[amg,digits-logits-16px]": (0.05, True),
                   "alignment[amg]": (0.5, False),
                   "clip_score[amg]": (round(1 - 29 / 30, 6), True),
                   "quality[rna,digits-logits-16px]": (0.5, False),
                   "alignment[rna]": (0.0, True), "clip_score[rna]": (0.0, True)}
    assert not res.passed
    detail = next(c.detail for c in res.checks if c.name.startswith("quality[rna"))
    assert "FD 3 vs cfg 2 in digits-logits-16px (n 2, reference 5" in detail
    assert gate_db(db, max_copy_rate=None, max_quality_loss=0.5).passed
    only = gate_db(db, max_copy_rate=None, methods=["amg"], max_quality_loss=0.6)
    assert only.passed and {c.name.split("[")[1] for c in only.checks} == {"amg]",
                                                                          "amg,digits-logits-16px]"}
    with pytest.raises(UserError, match="relative to cfg"):
        gate_db(_quality_db(tmp_path / "nocfg", with_cfg=False), max_copy_rate=None,
                max_quality_loss=0.1)
    with pytest.raises(UserError, match="method 'wen' not in this run"):
        gate_db(db, max_copy_rate=None, methods=["wen"], max_quality_loss=0.1)
    # the CLI: only the quality limit given -> no copy-rate check, exit 1 on the failures
    p = subprocess.run([sys.executable, "-m", "memaudit", "gate", str(db),
                        "--max-quality-loss", "0.1"], capture_output=True, text=True)
    assert p.returncode == 1 and "[FAIL] alignment[amg]" in p.stdout
    assert "copy_rate" not in p.stdout
