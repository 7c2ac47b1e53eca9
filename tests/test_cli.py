"""The CLI shell: one-line errors with exit 2, and docs/cli.md generated from the command tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from memaudit.cli.reference import render

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memaudit", *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_user_error_is_one_line_and_exit_2(tmp_path):
    r = run("detect", str(tmp_path / "missing"), "--index", str(tmp_path / "noindex"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")


def test_unknown_method_lists_known(tmp_path):
    r = run("generate", "--model", "canary", "--prompts", str(tmp_path / "p.txt"),
            "--method", "nonsense", "--seeds", "1", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == render(), (
        "docs/cli.md is stale: python -m memaudit.cli.reference > docs/cli.md")
