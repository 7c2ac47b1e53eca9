"""`memaudit canary ...` on bad input (issue 11 items 7 and 8): one line on stderr, exit 2, no
traceback, nothing written or half-written; a training folder resumes only its own run."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memaudit.canary.data import to_png
from memaudit.canary.model import CONFIG_FILE, WEIGHTS_FILE, CanaryConfig, load_canary
from memaudit.canary.train import train_canary
from memaudit.cli import main
from memaudit.common import UserError

TINY = CanaryConfig(block_out_channels=(8, 16, 16), layers_per_block=1, cross_attention_dim=16,
                    attention_head_dim=8, text_len=8)


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in-process: (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return int(e.value.code or 0), capsys.readouterr().err


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _tiny_parquet(path: Path, n: int = 8, caption: str = "a handwritten digit 1",
                  value: float = 0.0) -> Path:
    import numpy as np

    imgs = [to_png(np.full((16, 16), value) + (i % 2) * 0.5) for i in range(n)]
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(n)], "caption": [caption] * n,
                             "png": imgs}), path)
    return path


@pytest.fixture()
def data(tmp_path) -> Path:
    return _tiny_parquet(tmp_path / "a.parquet")


@pytest.mark.parametrize("option,value,needle", [
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--resolution", "0", "--resolution must be a positive multiple of 4"),
    ("--resolution", "6", "--resolution must be a positive multiple of 4"),
    ("--checkpoint-every", "0", "--checkpoint-every must be at least 1"),
    ("--steps", "0", "--steps must be at least 1"),
    ("--lr", "-1", "--lr must be positive"),
    ("--cond-dropout", "1", "--cond-dropout must be in [0, 1)"),
    ("--beta-schedule", "cosine", "--beta-schedule must be one of linear, scaled_linear"),
    ("--cross-attention-levels", "4", "--cross-attention-levels must be in 1..3"),
    ("--cross-attention-levels", "0", "--cross-attention-levels must be in 1..3"),
])
def test_train_bad_settings_one_line_and_nothing_written(capsys, data, tmp_path, option, value,
                                                        needle):
    out = tmp_path / "model"
    code, err = _cli(capsys, "canary", "train", str(data), "--out", str(out), option, value)
    assert code == 2 and needle in _one_line_error(err)
    assert not out.exists()


def test_architecture_levers_of_issue_17(data, tmp_path):
    """--cross-attention-levels puts cross-attention at that many of the lowest levels (and
    the mid block); --beta-schedule scaled_linear trains and samples with SD's betas; a
    canary.json written before the field loads with one level."""
    from memaudit.canary.model import build_unet
    from memaudit.models import load_model

    cfg = CanaryConfig(**{**TINY.to_dict(), "cross_attention_levels": 2})
    unet = build_unet(cfg)
    assert [type(b).__name__ for b in unet.down_blocks] == [
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == [
        "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    old = {k: v for k, v in TINY.to_dict().items() if k != "cross_attention_levels"}
    assert CanaryConfig.from_dict(old).cross_attention_levels == 1
    out = tmp_path / "m"
    main(["--quiet", "canary", "train", str(data), "--out", str(out), "--steps", "1",
          "--batch-size", "2", "--beta-schedule", "scaled_linear",
          "--cross-attention-levels", "3", "--device", "cpu"])
    net, info = load_canary(out)
    assert info["config"]["beta_schedule"] == "scaled_linear"
    assert (info["config"]["beta_start"], info["config"]["beta_end"]) == (0.00085, 0.012)
    assert [type(b).__name__ for b in net.unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3
    sched = load_model(str(out), device="cpu").make_scheduler("ddim")
    assert sched.config.beta_schedule == "scaled_linear"
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(0.0047, abs=2e-4)  # SD's abar_T


def test_train_out_is_a_file(capsys, data, tmp_path):
    out = tmp_path / "file.txt"
    out.write_text("keep me")
    code, err = _cli(capsys, "canary", "train", str(data), "--out", str(out))
    assert code == 2 and "is a file" in _one_line_error(err)
    assert out.read_text() == "keep me"


def test_data_bad_input_one_line_and_nothing_written(capsys, tmp_path):
    out = tmp_path / "d"
    code, err = _cli(capsys, "canary", "data", "--out", str(out), "--per-count", "0")
    assert code == 2 and "--per-count must be at least 1" in _one_line_error(err)
    assert not out.exists()
    f = tmp_path / "f.parquet"
    f.write_bytes(b"PAR1 not mine")
    code, err = _cli(capsys, "canary", "data", "--out", str(f))
    assert code == 2 and "is a file" in _one_line_error(err)
    assert f.read_bytes() == b"PAR1 not mine"


def _train(data: Path, out: Path, steps: int = 2, **kw) -> dict:
    return train_canary(data, out, steps=steps, batch_size=4, cfg=TINY, checkpoint_every=2,
                        log_every=2, device="cpu", **kw)


def test_resume_refuses_other_data_and_settings_and_restart_starts_over(tmp_path, data):
    out = tmp_path / "m"
    first = _train(data, out)
    other = _tiny_parquet(tmp_path / "b.parquet", caption="another caption", value=0.3)
    before = (out / WEIGHTS_FILE).read_bytes()
    with pytest.raises(UserError, match="other data_sha256.*--restart"):
        _train(other, out, steps=4)
    with pytest.raises(UserError, match="other lr"):
        _train(data, out, steps=4, lr=5e-4)
    assert (out / WEIGHTS_FILE).read_bytes() == before  # nothing touched
    assert len(list((out / "checkpoints").glob("step_*.pt"))) == 1
    # the same data and settings resume (and extend) the run
    resumed = _train(data, out, steps=4)
    assert resumed["steps"] == 4 and resumed["data_sha256"] == first["data_sha256"]
    # --restart: a fresh run on the other data, from step 0
    fresh = _train(other, out, steps=2, restart=True)
    assert fresh["steps"] == 2 and fresh["data_sha256"] != first["data_sha256"]
    assert [r.split(",")[0] for r in (out / "loss.csv").read_text().splitlines()[1:]] == ["2"]


def test_training_into_a_finished_canary_without_checkpoints_is_refused(tmp_path, data):
    out = tmp_path / "m"
    _train(data, out)
    for f in (out / "checkpoints").glob("*.pt"):
        f.unlink()
    with pytest.raises(UserError, match="already holds a canary"):
        _train(data, out)


def test_fine_tune_from_a_canary_folder(tmp_path, data):
    base = tmp_path / "base"
    _train(data, base)
    ft = _train(data, tmp_path / "ft", steps=2, init=base, lr=1e-4)
    assert ft["init"]["sha256"] and ft["init"]["data_sha256"] == ft["data_sha256"]
    assert ft["config"] == json.loads((base / CONFIG_FILE).read_text())["config"]
    net, _ = load_canary(tmp_path / "ft")
    assert net.cfg.block_out_channels == (8, 16, 16)


def test_defaults_are_the_shipped_recipe():
    from memaudit.canary import RECIPE
    from memaudit.models.canary import SHIPPED_DIR

    shipped = json.loads((SHIPPED_DIR / CONFIG_FILE).read_text())
    for key in ("steps", "batch_size", "lr", "cond_dropout", "ema_decay"):
        assert RECIPE[key] == shipped[key], key
    assert CanaryConfig().layers_per_block == shipped["config"]["layers_per_block"]
    assert CanaryConfig().block_out_channels == tuple(shipped["config"]["block_out_channels"])
    # `canary train`'s defaults are the shipped canary's schedule, attention levels and scale
    import inspect

    from memaudit.cli.canary import train_cmd

    opts = {n: p.default.default for n, p in inspect.signature(train_cmd).parameters.items()
            if hasattr(p.default, "default")}
    assert opts["beta_schedule"] == shipped["config"]["beta_schedule"]
    assert opts["cross_attention_levels"] == shipped["config"]["cross_attention_levels"]
    assert opts["default_scale"] == shipped["default_guidance_scale"]
    assert opts["steps"] == shipped["steps"]


@pytest.fixture()
def canary_folder(tmp_path, data) -> Path:
    out = tmp_path / "good"
    _train(data, out)
    return out


def test_bad_canary_folders_are_one_line_errors(capsys, tmp_path, canary_folder):
    import shutil

    bad_json = tmp_path / "bad_json"
    shutil.copytree(canary_folder, bad_json)
    (bad_json / CONFIG_FILE).write_text("{not json")
    truncated = tmp_path / "truncated"
    shutil.copytree(canary_folder, truncated)
    w = (truncated / WEIGHTS_FILE).read_bytes()
    (truncated / WEIGHTS_FILE).write_bytes(w[: len(w) // 2])
    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(canary_folder, wrong_shape)
    info = json.loads((wrong_shape / CONFIG_FILE).read_text())
    info["config"]["block_out_channels"] = [16, 16, 16]
    (wrong_shape / CONFIG_FILE).write_text(json.dumps(info))
    listed = tmp_path / "list_json"
    shutil.copytree(canary_folder, listed)
    (listed / CONFIG_FILE).write_text("[1, 2]")
    for folder, needle in ((bad_json, "not a valid canary config"),
                           (listed, "not a valid canary config"),
                           (truncated, "not a readable safetensors file"),
                           (wrong_shape, "does not match the architecture")):
        with pytest.raises(UserError, match=needle):
            load_canary(folder)
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a handwritten digit 1\n")
        code, err = _cli(capsys, "generate", "--model", str(folder), "--prompts", str(prompts),
                         "--out", str(tmp_path / f"gen_{folder.name}"))
        assert code == 2 and needle in _one_line_error(err), folder.name


def test_export_is_atomic_and_loadable(canary_folder):
    net, info = load_canary(canary_folder)
    assert not list(canary_folder.glob("*.tmp"))
    assert info["sampling"] == {"clip_sample": False}
    x = torch.zeros(1, 1, 16, 16)
    assert net(x, torch.tensor([10]), torch.zeros(1, 8, 384)).shape == (1, 1, 16, 16)


@pytest.mark.parametrize("taus,needle", [
    ("0.5,x", "--taus must be a number, got 'x'"),
    ("1.5", "--taus must be <= 1, got 1.5"),
    ("nan", "--taus must be a finite number, got nan"),
    ("", "--taus must be values in [0, 1]"),
])
def test_basin_rejects_bad_taus_before_any_work(capsys, tmp_path, taus, needle):
    code, err = _cli(capsys, "canary", "basin", "--out", str(tmp_path / "w"), "--taus", taus)
    assert code == 2 and needle in _one_line_error(err)
    assert not (tmp_path / "w").exists()


def test_canary_data_replaces_only_files_it_wrote(tmp_path):
    """issue 18: `canary data --out D` replaced a train.parquet and prompts.csv it did not
    write. Same rule as every writer: its own earlier output, or --overwrite."""
    from memaudit.canary.data import check_data_out
    from memaudit.common import sha256_file

    d = tmp_path / "d"
    d.mkdir()
    check_data_out(d)  # an empty folder
    (d / "prompts.csv").write_text("prompt\nmine\n")
    with pytest.raises(UserError, match="prompts.csv exists and is not canary data memaudit "
                                        "wrote; use --overwrite"):
        check_data_out(d)
    check_data_out(d, overwrite=True)
    (d / "train.parquet").write_bytes(b"PAR1 built earlier")
    (d / "data.json").write_text(json.dumps({"train_sha256": sha256_file(d / "train.parquet")}))
    check_data_out(d)  # a folder canary data wrote (data.json names its train.parquet)
    (d / "train.parquet").write_bytes(b"PAR1 edited since")
    with pytest.raises(UserError, match="and 2 more"):
        check_data_out(d)
    (d / "generic.txt").mkdir()
    with pytest.raises(UserError, match="generic.txt is a folder"):
        check_data_out(d, overwrite=True)


def test_canary_evaluate_replaces_only_outputs_it_wrote(tmp_path):
    """issue 18: `canary evaluate --out E --grid G` replaced summary.json, per_image.csv and
    the grid, and `--grid x.parquet` failed after the work with half the output written."""
    from memaudit.canary.evaluate import check_outputs

    out, grid = tmp_path / "e", tmp_path / "e" / "grid.png"
    out.mkdir()
    check_outputs(out, grid, [], False, ["data", "index"])
    (out / "per_image.csv").write_text("mine\n")
    with pytest.raises(UserError, match="not a memaudit canary evaluation table"):
        check_outputs(out, grid, [], False, [])
    check_outputs(out, grid, [], True, [])
    grid.write_bytes(b"\x89PNG an earlier grid")
    (out / "summary.json").write_text(json.dumps({"rates": {}, "scales": [1.0],
                                                  "grid": str(grid)}))
    check_outputs(out, grid, [], False, [])  # an earlier evaluation's outputs
    other = tmp_path / "mine.png"
    other.write_bytes(b"\x89PNG mine")
    with pytest.raises(UserError, match="not a memaudit canary grid"):
        check_outputs(out, other, [], False, [])
    with pytest.raises(UserError, match="--grid .*x.parquet must be a .png file"):
        check_outputs(out, tmp_path / "x.parquet", [], True, [])
    idx = tmp_path / "idx"
    idx.mkdir()
    with pytest.raises(UserError, match="inside the input folder"):
        check_outputs(out, idx / "g.png", [idx], True, [])
