"""README's install and test commands are the ones CI runs (issue 22, "install in one line"):
.ci/run makes the same virtual environment, runs the one install line and the test command
README gives; the one install brings torch with torchvision, open_clip and Ray."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands(text: str) -> list[list[str]]:
    """The shell commands of a text's bash blocks (or of a script): `&&` chains split, comments,
    `set`/`export` lines and pip's quiet flag dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S) or [text]
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():  # continuation lines
            for cmd in line.split("&&"):
                words = shlex.split(cmd, comments=True)
                if words and words[0] not in ("set", "export", "cd", "if", "fi", "then"):
                    out.append([w for w in words if not (words[0] == "pip" and w == "-q")])
    return out


def _section(readme: str, title: str) -> str:
    return readme.split(f"## {title}\n")[1].split("\n## ")[0]


def test_ci_runs_exactly_what_readme_says():
    readme = (ROOT / "README.md").read_text()
    install = _commands(_section(readme, "Install"))
    tests = [c for c in _commands(_section(readme, "The two commands")) if "pytest" in c]
    assert [c[:2] for c in install] == [["python3", "-m"], [".", ".venv/bin/activate"],
                                        ["pip", "install"]]
    assert install[2] == ["pip", "install", "-e", ".[test]"]  # one install line
    assert tests == [["python", "-m", "pytest", "-q"]]
    ci = [c for c in _commands((ROOT / ".ci" / "run").read_text())
          if c[0] in ("python3", ".", "pip", "python")]
    assert ci == install + tests


def test_one_install_brings_every_dependency_the_tests_use():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"]}
    assert {"torch", "torchvision"} <= deps
    # the pair that works with open_clip, as lower bounds (never pinned with ==)
    pair = [d for d in project["dependencies"] if d.startswith(("torch>", "torchvision>"))]
    assert len(pair) == 2 and not any("==" in d for d in project["dependencies"])
    extra = {re.split(r"[<>=\[ ]", d)[0] for d in project["optional-dependencies"]["test"]}
    assert {"pytest", "open_clip_torch", "ray", "peft", "torch-fidelity"} <= extra


def test_readme_tour_shows_an_image_folder_and_audit_init():
    tour = [c for c in _commands(_section((ROOT / "README.md").read_text(), "A short tour"))
            if c[0] == "memaudit"]
    assert any(c[1:3] == ["audit", "--init"] for c in tour)
    assert any(c[1:4] == ["index", "build", "data/lora"] for c in tour)  # an image folder
    assert any("--dataset-config" in c for c in tour) and any(
        "--instance-prompt" in c for c in tour)
