"""The CLI shell: one-line errors with exit 2, and docs/cli.md generated from the command tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("cmd", [["demo"], ["audit", "plan.toml"]])
def test_threads_below_one_is_refused_before_any_work(tmp_path, cmd):
    out = tmp_path / "out"
    r = run(*cmd, "--threads", "0", *(["--out", str(out)] if cmd == ["demo"] else []))
    assert r.returncode == 2 and "Traceback" not in r.stderr and not out.exists()
    assert r.stderr.startswith("error: Invalid value for '--threads'")
    assert len(r.stderr.strip().splitlines()) == 1


def test_demo_refuses_a_model_that_is_not_a_canary_before_writing(tmp_path):
    out = tmp_path / "out"
    r = run("demo", "--model", str(tmp_path / "missing"), "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr and not out.exists()
    assert r.stderr.startswith(f"error: --model {tmp_path / 'missing'}: not a canary folder")
    assert len(r.stderr.strip().splitlines()) == 1


def test_unknown_method_lists_known(tmp_path):
    (tmp_path / "p.txt").write_text("a prompt\n")  # a real prompt list: the method is wrong
    r = run("generate", "--model", "canary", "--prompts", str(tmp_path / "p.txt"),
            "--method", "nonsense", "--seeds", "1", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: unknown method 'nonsense'; known: amg, auto, cfg")
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_crash_is_exit_3_in_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    """Exit codes: 1 means the gate found a copy; memaudit failing itself is 3, never 1."""
    import memaudit.gate
    from memaudit.cli import main

    def crash(*a, **kw):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(memaudit.gate, "gate_db", crash)
    for debug in ("", "1"):
        monkeypatch.setenv("MEMAUDIT_DEBUG", debug)
        with pytest.raises(SystemExit) as e:
            main(["gate", "whatever.duckdb"])
        err = capsys.readouterr().err
        assert e.value.code == 3
        if debug:
            assert "Traceback" in err and "ZeroDivisionError" in err
        else:
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
            assert "memaudit failed: ZeroDivisionError: division by zero (at " in err
            assert "(at memaudit/cli/audit.py:" in err and "MEMAUDIT_DEBUG=1" in err


def test_crash_location_found_by_the_package_folder_not_its_name(tmp_path, monkeypatch,
                                                                 capsys):
    """A clone into a folder named `memaudit` (what `git clone` gives) puts the tests under
    .../memaudit/tests: a crash raised there is still located at memaudit's own innermost
    frame, never at a file outside the package whose path contains "memaudit" (issue 18)."""
    import importlib.util

    import memaudit.gate
    from memaudit.cli import main

    f = tmp_path / "memaudit" / "tests" / "boom.py"
    f.parent.mkdir(parents=True)
    f.write_text("def crash(*a, **kw):\n    raise ZeroDivisionError('division by zero')\n")
    spec = importlib.util.spec_from_file_location("memaudit_clone_boom", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(memaudit.gate, "gate_db", mod.crash)
    monkeypatch.setenv("MEMAUDIT_DEBUG", "")
    with pytest.raises(SystemExit) as e:
        main(["gate", "whatever.duckdb"])
    err = capsys.readouterr().err
    assert e.value.code == 3 and "(at memaudit/cli/audit.py:" in err, err


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == render(), (
        "docs/cli.md is stale: python -m memaudit.cli.reference > docs/cli.md")


def _help_texts(cmd, path):
    yield path, cmd.help or ""
    for p in cmd.params:
        yield f"{path} {p.name}", getattr(p, "help", None) or ""
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _help_texts(sub, f"{path} {name}")


def test_help_texts_survive_rich_markup():
    """Typer renders help as Rich markup: an unescaped `[auto]` or `memaudit[ray]` vanished
    from `--help` (it showed "local, or ray (memaudit)"). Every bracket is escaped, so what
    --help shows is the text with the escapes removed, nothing lost."""
    import typer

    from memaudit.cli import app
    from memaudit.cli.reference import plain

    root = typer.main.get_command(app)
    lost = [(where, text) for where, text in _help_texts(root, "memaudit")
            if plain(text) != text.replace("\\[", "[")]
    assert not lost, lost
    out = subprocess.run([sys.executable, "-m", "memaudit", "index", "build", "--help"],
                         capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"}).stdout
    assert "ray (memaudit[ray])" in out and "[half the RAM]" in out
