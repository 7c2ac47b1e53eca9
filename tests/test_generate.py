"""`generate` and `memaudit generate` end to end on the tiny SD pipeline, through real files."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memaudit.cli import main
from memaudit.common import UserError
from memaudit.data.prompts import read_prompts
from memaudit.generate import GEN_COLUMNS, generate
from memaudit.guidance import make_guidance
from memaudit.sampler import sample


@pytest.fixture
def prompt_file(tmp_path):
    p = tmp_path / "prompts.csv"
    p.write_text(";Caption;type\n0;a photo of a cat;VM\n1;a red car;TM\n", encoding="utf-8")
    return p


def test_generate_writes_images_and_tables(model, prompt_file, tmp_path):
    records = read_prompts(prompt_file)
    out = tmp_path / "run"
    table = generate(model, records, [("cfg", {}), ("static", {"tau": 0.7})], 2, out, steps=2,
                     guidance_scale=4.0, batch_size=3)
    assert table.column_names == GEN_COLUMNS
    rows = table.to_pylist()
    assert len(rows) == 2 * 2 * 2
    assert pq.read_table(out / "generations.parquet").to_pylist() == rows
    keys = {(r["method"], r["prompt_id"], r["seed"]) for r in rows}
    assert keys == {(m, p, s) for m in ("cfg", "static") for p in (0, 1) for s in (0, 1)}
    r = next(r for r in rows if (r["method"], r["prompt_id"], r["seed"]) == ("static", 1, 1))
    assert r["file"] == "images/static/00001_1.png"
    assert (r["prompt"], r["final_prompt"], r["label"]) == ("a red car", "a red car", "TM")
    assert (r["unet_calls"], r["forwards"], r["steps"], r["guidance_scale"]) == (4.0, 2, 2, 4.0)
    assert r["model_hash"] == model.model_hash and r["wall_seconds"] > 0
    pj = json.loads(r["params_json"])
    assert pj["method"] == "static" and pj["params"]["tau"] == 0.7 and pj["steps"] == 2

    # the PNG is the sampler's image for that (prompt, seed), rounded to 8 bits
    ref = sample(model, ["a red car"], [1], make_guidance("static", tau=0.7), steps=2,
                 guidance_scale=4.0)
    png = np.asarray(Image.open(out / r["file"]).convert("RGB")).astype(int)
    want = np.rint(ref.images[0].permute(1, 2, 0).numpy() * 255).astype(int)
    assert png.shape == (16, 16, 3) and np.abs(png - want).max() <= 1

    trace = pq.read_table(out / "trace.parquet").to_pylist()
    assert len(trace) == 8 * 2
    mine = [t for t in trace if t["file"] == r["file"]]
    assert [t["step"] for t in mine] == [0, 1]
    assert [t["t"] for t in mine] == [rec["t"] for rec in ref.trace]
    assert mine[0]["guidance_norm"] == pytest.approx(ref.trace[0]["guidance_norm"][0], rel=1e-4)
    assert "scale" in mine[0]  # the static guidance's own trace field
    cfg_rows = [t for t in trace if t["method"] == "cfg"]
    assert all(t["scale"] is None for t in cfg_rows)


def test_generate_resumes_and_refuses_other_settings(model, tmp_path):
    out = tmp_path / "run"
    generate(model, ["a cat", "a dog"], [("cfg", {})], 1, out, steps=2)
    before = model.unet_rows
    table = generate(model, ["a cat", "a dog"], [("cfg", {})], 2, out, steps=2)
    assert model.unet_rows - before == 2 * 2 * 2  # only the two new seed-1 images
    assert table.num_rows == 4
    assert len(pq.read_table(out / "trace.parquet")) == 4 * 2
    before = model.unet_rows
    generate(model, ["a cat", "a dog"], [("cfg", {})], 2, out, steps=2)
    assert model.unet_rows == before
    with pytest.raises(UserError, match="other settings"):
        generate(model, ["a cat", "a dog"], [("cfg", {})], 2, out, steps=3)


def test_method_specs_params_and_labels(model, tmp_path):
    t = generate(model, ["a cat"], ["cfg", "cfg", "static"], [5], tmp_path / "o", steps=1,
                 params={"static": {"tau": 0.3}})
    rows = t.to_pylist()
    assert [r["method"] for r in rows] == ["cfg", "cfg-2", "static"]
    assert json.loads(rows[2]["params_json"])["params"]["tau"] == 0.3
    assert (tmp_path / "o" / "images" / "cfg-2" / "00000_5.png").exists()


def test_user_errors(model, tmp_path):
    with pytest.raises(UserError, match="unknown method 'nope'; known: .*cfg"):
        generate(model, ["a"], [("nope", {})], 1, tmp_path / "x", steps=1)
    with pytest.raises(UserError, match="unknown parameter"):
        generate(model, ["a"], [("cfg", {"zzz": 1})], 1, tmp_path / "x", steps=1)
    with pytest.raises(UserError, match="needs a copy criterion"):
        generate(model, ["a"], [("amg", {})], 1, tmp_path / "x", steps=1)
    with pytest.raises(UserError, match="no seeds"):
        generate(model, ["a"], [("cfg", {})], 0, tmp_path / "x", steps=1)


def test_cli_generate(pipe_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "cli"
    main(["generate", "--model", str(pipe_dir), "--prompts", str(prompt_file), "--method",
          "cfg", "--method", "static", "--seeds", "2", "--out", str(out), "--steps", "2",
          "--guidance-scale", "3", "--device", "cpu", "--batch-size", "4", "--param",
          "static.tau=0.4", "--scheduler", "dpm"])
    printed = capsys.readouterr().out
    assert "8 images" in printed and "static: 4 images" in printed
    rows = pq.read_table(out / "generations.parquet").to_pylist()
    assert len(rows) == 8 and {r["scheduler"] for r in rows} == {"dpm"}
    assert {json.loads(r["params_json"])["params"].get("tau") for r in rows
            if r["method"] == "static"} == {0.4}
    assert all((out / r["file"]).exists() for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--param", "static.nope=1"], "unknown parameter 'nope'"),
    (["--scheduler", "euler"], "unknown scheduler"),
])
def test_cli_errors_are_one_line(pipe_dir, prompt_file, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(pipe_dir), "--prompts", str(prompt_file), "--out",
              str(tmp_path / "o"), "--steps", "1", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_cli_missing_model_and_prompts(prompt_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "none"), "--prompts", str(prompt_file),
              "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "canary", "--prompts", str(tmp_path / "none.txt"),
              "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "prompt file" in capsys.readouterr().err


def _tiny_canary(folder):
    import torch

    from memaudit.canary.model import CanaryConfig, CanaryNet, save_canary

    torch.manual_seed(0)
    cfg = CanaryConfig(resolution=8, block_out_channels=(8, 16), layers_per_block=1,
                       cross_attention_dim=16, attention_head_dim=4)
    save_canary(CanaryNet(cfg), folder, {"default_guidance_scale": 2.0})
    return folder


def test_generate_from_a_canary_folder(tmp_path):
    """A pixel-space canary folder (random weights, the canary engineer's format) through the
    same path as `--model FOLDER`: grey images, perturbed final prompts for rta."""
    _tiny_canary(tmp_path / "canary")
    prompts = tmp_path / "p.txt"
    prompts.write_text("the digit 3\na photo of a cat\n", encoding="utf-8")
    out = tmp_path / "out"
    main(["generate", "--model", str(tmp_path / "canary"), "--prompts", str(prompts),
          "--method", "cfg", "--method", "rta", "--seeds", "1", "--out", str(out),
          "--steps", "3"])
    rows = pq.read_table(out / "generations.parquet").to_pylist()
    assert len(rows) == 4 and {r["guidance_scale"] for r in rows} == {2.0}
    for r in rows:
        img = np.asarray(Image.open(out / r["file"]).convert("RGB"))
        assert img.shape == (8, 8, 3)
        assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
    rta = [r for r in rows if r["method"] == "rta"]
    assert all(r["final_prompt"] != r["prompt"] for r in rta)
    assert all(r["final_prompt"] == r["prompt"] for r in rows if r["method"] == "cfg")


def test_generations_record_the_criterion_and_index_that_guided_amg(tmp_path, capsys):
    """issue 11: the audit database recorded which criterion and index guided AMG,
    generations.parquet did not."""
    from index_helpers import digits_parquet

    from memaudit.index import TrainingIndex, build_index

    canary = _tiny_canary(tmp_path / "canary")
    data = digits_parquet(tmp_path / "d.parquet", n=20)  # 8x8, what the canary draws
    idx = build_index(data, "pixels", tmp_path / "idx", calibrate=False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("the digit 3\n", encoding="utf-8")
    out = tmp_path / "out"
    main(["generate", "--model", str(canary), "--prompts", str(prompts), "--method", "cfg",
          "--method", "amg", "--index", str(idx), "--out", str(out), "--steps", "2"])
    assert "warning" not in capsys.readouterr().err
    rows = {r["method"]: r for r in pq.read_table(out / "generations.parquet").to_pylist()}
    assert (rows["amg"]["guidance_criterion"], rows["amg"]["guidance_index"],
            rows["amg"]["guidance_index_hash"]) == (
        "nl2", str(idx.resolve()), TrainingIndex.open(idx).manifest["content_hash"])
    assert rows["cfg"]["guidance_criterion"] is None and rows["cfg"]["guidance_index"] is None
    # l2-tiled cannot guide amg: refused before the model loads, in one line
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(canary), "--prompts", str(prompts), "--method",
              "amg", "--index", str(idx), "--criterion", "l2-tiled", "--out",
              str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "cannot guide amg" in err
    assert not (tmp_path / "o2").exists()
    # an index comparing finer than the 8x8 the model draws is warned about
    fine = build_index(data, "pixels", tmp_path / "fine", calibrate=False,
                       embedder_opts={"size": 16})
    main(["generate", "--model", str(canary), "--prompts", str(prompts), "--method", "amg",
          "--index", str(fine), "--out", str(tmp_path / "o3"), "--steps", "1"])
    assert "compares pixels at 16x16, finer than the 8x8 images" in capsys.readouterr().err


def test_resume_after_a_kill_between_the_two_table_writes(model, tmp_path):
    out = tmp_path / "run"
    generate(model, ["a cat", "a dog"], [("cfg", {})], 1, out, steps=2, batch_size=1)
    gen = pq.read_table(out / "generations.parquet")
    pq.write_table(gen.slice(0, 1), out / "generations.parquet")  # the last batch "lost"
    table = generate(model, ["a cat", "a dog"], [("cfg", {})], 1, out, steps=2, batch_size=1)
    assert table.num_rows == 2
    trace = pq.read_table(out / "trace.parquet").to_pylist()
    assert sorted((t["file"], t["step"]) for t in trace) == [
        ("images/cfg/00000_0.png", 0), ("images/cfg/00000_0.png", 1),
        ("images/cfg/00001_0.png", 0), ("images/cfg/00001_0.png", 1)]


def test_trace_fields_of_mixed_types_become_text():
    from memaudit.generate import _concat_traces, _trace_table

    a = _trace_table([dict(file="a.png", method="m", prompt_id=0, seed=0, step=0, t=9, u=0.9,
                           x=1.5, flag=True)])
    b = _trace_table([dict(file="b.png", method="n", prompt_id=0, seed=0, step=0, t=9, u=0.9,
                           x=["cfg", "spe"])])
    rows = _concat_traces([a, b]).to_pylist()
    assert rows[0]["flag"] == 1.0 and rows[1]["flag"] is None
    assert [r["x"] for r in rows] == ["1.5", '["cfg", "spe"]']
