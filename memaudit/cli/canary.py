"""CLI: `memaudit canary data|train|evaluate` (thin layer over memaudit.canary)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import typer

from memaudit.canary import RECIPE
from memaudit.canary.basin import METHODS as BASIN_METHODS
from memaudit.canary.basin import TAUS as BASIN_TAUS
from memaudit.canary.data import SHARED_COPIES, SHARED_DIGITS

canary_app = typer.Typer(help="The built-in canary model: build its data, train, evaluate.",
                         no_args_is_help=True)


@canary_app.command("data")
def data_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder."),
    resolution: int = typer.Option(16, help="Training resolution (square, grey)."),
    per_count: int = typer.Option(6, help="Planted images per group (64x, 16x, 4x, 1x)."),
    seed: int = typer.Option(0, help="Random seed."),
    min_rmse: float = typer.Option(0.15,
                                   help="Minimum pixel RMSE between planted and others."),
    extra_counts: str = typer.Option("", help="More duplicated groups, e.g. 2 or 2,8 (chosen "
                                     "after 64x/16x/4x/1x, which stay the same)."),
    labels: Path = typer.Option(None, help="labels.json of `canary evaluate`: its guided "
                                "images become the `guided` prompt group."),
    shared_copies: int = typer.Option(SHARED_COPIES, help="Copies of each image of the retired "
                                      "shared-caption group (issue 8; 0: none)."),
    shared_digits: int = typer.Option(SHARED_DIGITS, help="Ordinary digits that share each "
                                      "shared-caption image's caption."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files in OUT that are "
                                   "not canary data memaudit wrote."),
) -> None:
    """Training Parquet + trigger/generic prompt lists + ground truth from bundled images."""
    from memaudit.canary.data import build_canary_data, read_labels
    from memaudit.common import UserError

    try:
        extra = tuple(int(c) for c in extra_counts.split(",") if c.strip())
    except ValueError:
        raise UserError(f"--extra-counts must be integers separated by commas, got "
                        f"{extra_counts!r}") from None
    summary = build_canary_data(out, res=resolution, per_count=per_count, seed=seed,
                                min_rmse=min_rmse, shared_copies=shared_copies,
                                shared_digits=shared_digits, extra_counts=extra,
                                labels=read_labels(labels) if labels else None,
                                overwrite=overwrite)
    print(json.dumps(summary, indent=2))


@canary_app.command("train")
def train_cmd(
    data: Path = typer.Argument(..., help="Training set: Parquet (file, folder or glob), "
                              "image folder, tar shards... (as index build)."),
    out: Path = typer.Option(..., "--out", help="Output canary folder."),
    steps: int = typer.Option(RECIPE["steps"], help="Training steps."),
    batch_size: int = typer.Option(RECIPE["batch_size"], help="Batch size."),
    lr: float = typer.Option(RECIPE["lr"], help="Learning rate (AdamW)."),
    cond_dropout: float = typer.Option(RECIPE["cond_dropout"],
                                       help="Classifier-free dropout (share of null captions)."),
    seed: int = typer.Option(0, help="Random seed."),
    resolution: int = typer.Option(16, help="Training resolution (square, grey)."),
    layers_per_block: int = typer.Option(1, help="UNet resnet layers per block."),
    beta_schedule: str = typer.Option("scaled_linear", help="Noise schedule: linear (DDPM, "
                                      "1e-4..0.02) or scaled_linear (SD 1/2, 0.00085..0.012)."),
    cross_attention_levels: int = typer.Option(3, help="Resolution levels, from the lowest, "
                                               "with cross-attention (3: every level)."),
    init: Path = typer.Option(None, help="Fine-tune: start from this canary folder's weights "
                              "(and its architecture)."),
    checkpoint_every: int = typer.Option(500, help="Checkpoint interval (steps)."),
    max_minutes: float = typer.Option(None, min=0.0,
                                      help="Stop and export after this many minutes."),
    restart: bool = typer.Option(False, "--restart", help="Start over in a folder that holds "
                                 "another run (deletes its checkpoints and weights)."),
    default_scale: float = typer.Option(3.0, min=0.0,
                                        help="Default CFG scale written to canary.json."),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
) -> None:
    """Train (or resume) a canary model; writes canary.safetensors + canary.json. A run
    resumes only from a checkpoint of the same data and settings."""
    from memaudit.canary.model import BETA_SCHEDULES, CanaryConfig
    from memaudit.canary.train import train_canary
    from memaudit.common import UserError

    if beta_schedule not in BETA_SCHEDULES:
        raise UserError(f"--beta-schedule must be one of {', '.join(BETA_SCHEDULES)}, "
                        f"got {beta_schedule!r}")
    start, end = BETA_SCHEDULES[beta_schedule]
    cfg = CanaryConfig(resolution=resolution, layers_per_block=layers_per_block,
                       beta_schedule=beta_schedule, beta_start=start, beta_end=end,
                       cross_attention_levels=cross_attention_levels)
    command = "memaudit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    info = train_canary(data, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                        device=device, cfg=None if init else cfg, cond_dropout=cond_dropout,
                        checkpoint_every=checkpoint_every, max_minutes=max_minutes,
                        default_guidance_scale=default_scale, command=command, init=init,
                        restart=restart)
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace summary.json, "
                                   "per_image.csv or the grid when memaudit did not write them."),
) -> None:
    """Measure the canary's copy rates per duplicate count and CFG scale (nL2, fixed and
    calibrated), generic copy rate and digit agreement."""
    from memaudit.canary.evaluate import evaluate_canary, format_summary
    from memaudit.common import user_number

    scale_list = tuple(user_number(s, "--scales", lo=0.0) for s in scales.split(",")
                       ) if scales else None
    summary = evaluate_canary(model, out, data_dir=data, index_dir=index, seeds=seeds,
                              scales=scale_list, steps=steps, device=device, grid_path=grid,
                              overwrite=overwrite)
    print(format_summary(summary))


@canary_app.command("basin")
def basin_cmd(
    out: Path = typer.Option(..., "--out", help="Work folder (data, index, basin.json)."),
    model: str = typer.Option("canary", help="'canary' (shipped) or a canary folder."),
    data: Path = typer.Option(None, help="Canary data folder (default: rebuilt into OUT/data)."),
    index: Path = typer.Option(None, help="Pixel index over the data (default: built in OUT)."),
    seeds: int = typer.Option(8, help="Seeds per prompt (magnitude curves, mitigation table)."),
    sweep_seeds: int = typer.Option(4, help="Seeds per prompt in the static tau sweep."),
    steps: int = typer.Option(None, help="DDIM steps (default: the model's, 50)."),
    methods: str = typer.Option(",".join(BASIN_METHODS), help="Methods of the table."),
    taus: str = typer.Option(",".join(f"{t:g}" for t in BASIN_TAUS),
                             help="static's tau values of the sweep (1: cfg, 0: CFG never on)."),
    timing_repeats: int = typer.Option(3, help="Interleaved wall-time repeats (0: none)."),
    doc: Path = typer.Option(None, help="Markdown file whose generated section to (re)write, "
                             "e.g. docs/attraction-basin.md."),
    img_dir: Path = typer.Option(None, help="Folder of the SVG figures (default: DOC/../img)."),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
) -> None:
    """The attraction-basin evidence (Jain et al. CVPR 2025) on a canary: ||e_c - e_u|| per
    step by prompt group, copy rate against static's tau, and the mitigation table."""
    from memaudit.canary.basin import run_basin
    from memaudit.common import UserError, user_number

    if seeds < 1 or sweep_seeds < 1:
        raise UserError("--seeds and --sweep-seeds must be at least 1")
    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    if "cfg" not in names:
        raise UserError("--methods must include cfg (the baseline of the cost ratios)")
    tau_list = tuple(user_number(t, "--taus", lo=0.0, hi=1.0) for t in taus.split(",")
                     if t.strip())
    if not tau_list:
        raise UserError(f"--taus must be values in [0, 1], got {taus!r}")
    res = run_basin(model, out, data_dir=data, index_dir=index, seeds=seeds,
                    sweep_seeds=sweep_seeds, steps=steps, methods=names, taus=tau_list,
                    timing_repeats=timing_repeats, device=device, doc=doc, img_dir=img_dir,
                    log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"basin evidence in {out / 'basin.json'}" + (f" and {doc}" if doc else "")
          + f" ({res['seconds']:.0f} s)")


def register(app: typer.Typer) -> None:
    app.add_typer(canary_app, name="canary")
