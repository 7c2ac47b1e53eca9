"""CLI: `memaudit canary data|train|evaluate` (thin layer over memaudit.canary)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import typer

canary_app = typer.Typer(help="The built-in canary model: build its data, train, evaluate.",
                         no_args_is_help=True)


@canary_app.command("data")
def data_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder."),
    resolution: int = typer.Option(16, help="Training resolution (square, grey)."),
    per_count: int = typer.Option(6, help="Planted images per duplicate count (1, 4, 16, 64)."),
    seed: int = typer.Option(0, help="Random seed."),
    min_rmse: float = typer.Option(0.15, help="Minimum pixel RMSE between planted and others."),
) -> None:
    """Training Parquet + trigger/generic prompt lists + ground truth from bundled images."""
    from memaudit.canary.data import build_canary_data

    summary = build_canary_data(out, res=resolution, per_count=per_count, seed=seed,
                                min_rmse=min_rmse)
    print(json.dumps(summary, indent=2))


@canary_app.command("train")
def train_cmd(
    data: Path = typer.Argument(..., help="Training Parquet (file, folder or glob)."),
    out: Path = typer.Option(..., "--out", help="Output canary folder."),
    steps: int = typer.Option(9000, help="Training steps."),
    batch_size: int = typer.Option(64, help="Batch size."),
    lr: float = typer.Option(5e-4, help="Learning rate (AdamW)."),
    seed: int = typer.Option(0, help="Random seed."),
    resolution: int = typer.Option(16, help="Training resolution (square, grey)."),
    layers_per_block: int = typer.Option(2, help="UNet resnet layers per block."),
    checkpoint_every: int = typer.Option(500, help="Checkpoint interval (steps)."),
    max_minutes: float = typer.Option(None, help="Stop and export after this many minutes."),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
) -> None:
    """Train (or resume) a canary model; writes canary.safetensors + canary.json."""
    from memaudit.canary.model import CanaryConfig
    from memaudit.canary.train import train_canary

    cfg = CanaryConfig(resolution=resolution, layers_per_block=layers_per_block)
    command = "memaudit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    info = train_canary(data, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                        device=device, cfg=cfg, checkpoint_every=checkpoint_every,
                        max_minutes=max_minutes, command=command)
    print(json.dumps({k: info[k] for k in ("steps", "final_loss", "train_seconds",
                                           "data_sha256")}, indent=2))


@canary_app.command("evaluate")
def evaluate_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder (summary.json, per_image.csv)."),
    model: str = typer.Option("canary", help="'canary' (shipped) or a canary folder."),
    data: Path = typer.Option(None, help="Canary data folder (default: rebuilt into OUT/data)."),
    index: Path = typer.Option(None, help="Pixel index over the data (default: built in OUT)."),
    seeds: int = typer.Option(8, help="Seeds per prompt."),
    scales: str = typer.Option(None, help="Comma-separated CFG scales (default: 1,s0,2*s0)."),
    steps: int = typer.Option(None, help="DDIM steps (default: the model's, 50)."),
    grid: Path = typer.Option(None, help="Where to write the grid PNG (default: OUT/grid.png)."),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
) -> None:
    """Measure the canary's copy rates per duplicate count and CFG scale (nL2, fixed and
    calibrated), generic copy rate and digit agreement."""
    from memaudit.canary.evaluate import evaluate_canary, format_summary
    from memaudit.common import UserError

    try:
        scale_list = tuple(float(s) for s in scales.split(",")) if scales else None
    except ValueError as e:
        raise UserError(f"--scales must be comma-separated numbers, got {scales!r}") from e
    summary = evaluate_canary(model, out, data_dir=data, index_dir=index, seeds=seeds,
                              scales=scale_list, steps=steps, device=device, grid_path=grid)
    print(format_summary(summary))


def register(app: typer.Typer) -> None:
    app.add_typer(canary_app, name="canary")
