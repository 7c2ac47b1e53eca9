"""`memaudit audit --init MODEL DATA`: the written plan runs as is (a tiny canary on a tiny
image folder), DreamBooth prompts and prompt lists beside the data become its prompts, and
nothing existing is replaced."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
from audit_fixtures import make_tiny_canary
from index_helpers import encode

from memaudit.cli import main
from memaudit.data.prompts import read_prompts
from memaudit.store import AuditStore


def _folder(root, n=4, captions=True):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"{i}.png").write_bytes(encode((rng.random((16, 16, 3)) * 255).astype(np.uint8)))
        if captions:
            (root / f"{i}.txt").write_text(f"a grey square number {i % 3}\n")
    return root


def test_written_plan_runs_on_an_image_folder(tmp_path, capsys):
    model = make_tiny_canary(tmp_path / "canary")
    data = _folder(tmp_path / "lora")
    plan = tmp_path / "work" / "plan.toml"
    main(["audit", "--init", str(model), str(data), str(plan)])
    out = capsys.readouterr().out
    assert "training set: folder, 4 rows" in out and f"plan: {plan}" in out
    text = plan.read_text()
    d = tomllib.loads(text)
    assert d["model"] == "../canary" and d["index"]["source"] == "../lora"
    assert d["methods"] == ["cfg", "static", "dynamic", "amg"] and d["criteria"] == ["nl2"]
    assert text.startswith("# memaudit audit plan") and "# embedder = \"sscd\"" in text
    # no prompt list beside the data: the training captions, most repeated first
    records = read_prompts(tmp_path / "work" / "plan-prompts.jsonl")
    assert [(r.text, r.label) for r in records] == [
        ("a grey square number 0", "training-caption"),
        ("a grey square number 1", "training-caption"),
        ("a grey square number 2", "training-caption")]
    main(["audit", str(plan)])
    capsys.readouterr()
    with AuditStore(tmp_path / "work" / "audit-out" / "audit.duckdb", read_only=True) as s:
        run = s.run()
        assert run["status"] == "finished"
        assert s.count("generations") == 3 * 4 * 4  # prompts x seeds x methods
        assert s.count("matches") == 3 * 4 * 4
    manifest = json.loads((tmp_path / "work" / "audit-out" / "index" / "manifest.json")
                          .read_text())
    assert manifest["source"]["layout"] == "folder" and manifest["rows"] == 4
    # the plan is never replaced without --overwrite, and nothing is written on refusal
    with pytest.raises(SystemExit) as e:
        main(["audit", "--init", "canary", str(data), str(plan)])
    assert e.value.code == 2 and "plan" in capsys.readouterr().err
    main(["audit", "--init", "canary", str(data), str(plan), "--overwrite"])
    assert tomllib.loads(plan.read_text())["model"] == "canary"


def test_dreambooth_prompts_and_lists_beside_the_data(tmp_path, capsys):
    data = _folder(tmp_path / "dog", captions=False)
    plan = tmp_path / "p.toml"
    main(["audit", "--init", "canary", str(data), str(plan), "--instance-prompt",
          "a photo of sks dog", "--class-prompt", "a photo of dog"])
    d = tomllib.loads(plan.read_text())
    assert d["index"]["instance_prompt"] == "a photo of sks dog"
    assert [p["file"] for p in d["prompts"]] == ["p-prompts.jsonl"]
    assert [(r.text, r.label) for r in read_prompts(tmp_path / "p-prompts.jsonl")] == [
        ("a photo of sks dog", "instance"), ("a photo of dog", "class")]
    # prompt lists in the data's folder (not its caption files) are used as they are
    lists = _folder(tmp_path / "set")
    (lists / "triggers.txt").write_text("a grey square number 0\n")
    (lists / "generic.csv").write_text("prompt,type\na cat,generic\n")
    (lists / "notes.txt").write_text("# only a comment\n")
    main(["audit", "--init", "canary", str(lists), str(tmp_path / "q.toml")])
    d = tomllib.loads((tmp_path / "q.toml").read_text())
    assert [(p["file"], p["label"]) for p in d["prompts"]] == [
        ("set/generic.csv", "generic"), ("set/triggers.txt", "triggers")]
    assert not (tmp_path / "q-prompts.jsonl").exists()
    # a folder without captions and no instance prompt: one line, nothing written
    with pytest.raises(SystemExit) as e:
        main(["audit", "--init", "canary", str(data), str(tmp_path / "r.toml")])
    assert e.value.code == 2 and "--instance-prompt" in capsys.readouterr().err
    assert not (tmp_path / "r.toml").exists() and not (tmp_path / "r-prompts.jsonl").exists()


def test_kohya_config_class_tokens_become_the_prompts(tmp_path, capsys):
    """A kohya-ss dataset config as DATA: its training subsets' class tokens are the instance
    prompts, its regularization subset's the class prompt; the index source is the config."""
    _folder(tmp_path / "k" / "img" / "sks", n=3, captions=False)
    _folder(tmp_path / "k" / "reg" / "dog", n=2, captions=False)
    cfg = tmp_path / "k" / "lora.toml"
    cfg.write_text('[general]\ncaption_extension = ".txt"\n[[datasets]]\n'
                   '  [[datasets.subsets]]\n  image_dir = "img/sks"\n'
                   '  class_tokens = "sks dog"\n  num_repeats = 10\n'
                   '  [[datasets.subsets]]\n  image_dir = "reg/dog"\n'
                   '  class_tokens = "dog"\n  is_reg = true\n')
    plan = tmp_path / "plan.toml"
    main(["audit", "--init", "canary", str(cfg), str(plan)])
    assert "training set: kohya, 32 rows" in capsys.readouterr().out  # 3 x 10 + 2
    d = tomllib.loads(plan.read_text())
    assert d["index"]["source"] == "k/lora.toml"
    assert [p["file"] for p in d["prompts"]] == ["plan-prompts.jsonl"]
    assert [(r.text, r.label) for r in read_prompts(tmp_path / "plan-prompts.jsonl")] == [
        ("sks dog", "instance"), ("dog", "class")]
