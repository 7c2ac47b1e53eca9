"""Audit databases someone else made (issue 18, defect 1): a view or a macro stored in the
file must never run, and nothing it could read may reach any output.

Each crafted database is a real audit database (`copying_audit`) altered with DuckDB itself,
the way an attacker would: the `prompts` table replaced by a view that appends a local file
(`read_text`), a stored macro shadowing the built-in `arg_max` the gate calls, memaudit's
own view redefined over `glob()` (file names), an extra table or column, a view that
raises, a run whose plan_json is not JSON. `report` and `gate` refuse each in one `error:`
line (exit 2), and no byte of the secret file (nor its name) appears on stdout, stderr, in
the HTML or in the JUnit file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pytest
from audit_fixtures import copying_audit, crafted_db

from memaudit.cli import main
from memaudit.common import UserError
from memaudit.store import AuditStore

SECRET = "CI_TOKEN=ghp_s3cr3t-7f3a9c1e"


@pytest.fixture(scope="module")
def audit_db(tmp_path_factory) -> Path:
    return copying_audit(tmp_path_factory.mktemp("untrusted"))


KINDS = {  # kind -> what the one error line names
    "view-over-read-text": "view prompts",
    "stored-macro": "macro arg_max",
    "view-over-glob": "view method_summary",
    "extra-table": "table notes",
    "extra-column": "runs.note",
    "view-raises": "view method_summary",
    "plan-json-not-json": "plan_json of run 1 is not a JSON object",
}


@pytest.fixture
def secret(tmp_path) -> Path:
    p = tmp_path / "secret.env"
    p.write_text(SECRET + "\n")
    return p


def _outputs(capsys, *files: Path) -> str:
    cap = capsys.readouterr()
    text = cap.out + cap.err
    for f in files:
        if f.exists():
            text += f.read_text(errors="replace")
    return text


@pytest.mark.parametrize("kind", list(KINDS))
def test_report_and_gate_refuse_a_crafted_database(audit_db, tmp_path, capsys, secret, kind):
    db = crafted_db(audit_db, tmp_path / "db", kind, secret)
    before = db.read_bytes()
    html, junit = tmp_path / "r.html", tmp_path / "gate.xml"
    for argv in (["report", str(db), "--out", str(html)],
                 ["gate", str(db), "--junit", str(junit)],
                 ["gate", str(db), "--max-quality-loss", "0.5", "--junit", str(junit)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert e.value.code == 2, cap
        assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
        assert KINDS[kind] in lines[0], lines[0]
        assert SECRET not in cap.out + cap.err and "s3cr3t" not in cap.out + cap.err
        assert not html.exists() and not junit.exists()  # nothing written
    assert db.read_bytes() == before


@pytest.mark.parametrize("kind", ["view-over-read-text", "stored-macro", "view-over-glob"])
def test_no_byte_of_the_target_file_reaches_any_output(audit_db, tmp_path, capsys, secret,
                                                       kind):
    """The same database through the library and the CLI, every output collected."""
    db = crafted_db(audit_db, tmp_path / "db", kind, secret)
    html, junit = tmp_path / "r.html", tmp_path / "gate.xml"
    for argv in (["report", str(db), "--out", str(html)],
                 ["gate", str(db), "--junit", str(junit)],
                 ["gate", str(db), "--method", "cfg", "--criterion", "nl2", "--junit",
                  str(junit)]):
        try:
            main(argv)
        except SystemExit:
            pass
        text = _outputs(capsys, html, junit)
        assert SECRET not in text and "s3cr3t" not in text and "secret.env" not in text
    from memaudit.gate import gate_db
    from memaudit.report import build_context

    for call in (lambda: gate_db(db), lambda: build_context(db)):
        with pytest.raises(UserError) as e:
            call()
        assert SECRET not in str(e.value) and "secret.env" not in str(e.value)


def test_external_access_is_off_and_the_configuration_locked(audit_db, tmp_path, secret):
    """DuckDB's own settings, not string checks: even SQL memaudit runs cannot read files."""
    db = tmp_path / "a.duckdb"
    shutil.copy(audit_db, db)
    for read_only in (True, False):
        with AuditStore(db, read_only=read_only) as s:
            assert s.con.execute(
                "SELECT current_setting('enable_external_access')").fetchone()[0] is False
            with pytest.raises(duckdb.Error, match="disabled by configuration"):
                s.con.execute(f"SELECT * FROM read_text('{secret}')").fetchall()
            with pytest.raises(duckdb.Error, match="locked"):
                s.con.execute("SET enable_external_access = true")
            # the views memaudit reads are its own (temporary), not the file's
            assert s.query("SELECT count(*) AS n FROM method_summary")[0]["n"] > 0


def test_a_crafted_database_is_refused_by_the_writer_too(audit_db, tmp_path, secret):
    """`memaudit audit` resuming into OUT/audit.duckdb opens it with the same checks."""
    for kind in ("stored-macro", "extra-column"):
        db = crafted_db(audit_db, tmp_path / kind, kind, secret)
        with pytest.raises(UserError, match=KINDS[kind]):
            AuditStore(db)


def test_an_untouched_audit_database_still_opens_and_its_views_still_work(audit_db):
    """Users query the stored views directly (docs/database.md): they are still written,
    and equal memaudit's own temporary ones."""
    con = duckdb.connect(str(audit_db), read_only=True)
    stored = con.execute("SELECT method, criterion, n FROM method_summary ORDER BY 1, 2"
                         ).fetchall()
    con.close()
    with AuditStore(audit_db, read_only=True) as s:
        mine = [tuple(r.values()) for r in s.query(
            "SELECT method, criterion, n FROM method_summary ORDER BY 1, 2")]
    assert mine == stored and len(stored) == 2
