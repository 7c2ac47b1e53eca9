"""CLI: `memaudit calibrate` -- the transition rules' switch points measured on a model
(Jain et al. CVPR 2025, METHODS 3.1; issue 17). Thin layer over memaudit.audit.calibration."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer


def calibrate_cmd(
    model: str = typer.Option(..., help="'canary', a canary folder or a diffusers pipeline."),
    clean: Path = typer.Option(..., help="Clean prompt list (alignment must stay >= KEEP)."),
    triggers: Path = typer.Option(..., help="Trigger prompt list (a target_key/key column "
                                  "names each trigger's training image)."),
    index: Path = typer.Option(..., help="Training index the reproductions are scored on."),
    trigger_label: str = typer.Option(None, help="Only the triggers with this label "
                                      "(e.g. guided in a canary prompts.csv)."),
    criterion: str = typer.Option("nl2", help="Criterion whose fixed cut defines reproduction."),
    methods: str = typer.Option("static,opposite,dynamic", help="Rules to calibrate."),
    seeds: int = typer.Option(4, help="Seeds per prompt."),
    steps: int = typer.Option(None, help="Sampling steps (default: the model's)."),
    guidance_scale: float = typer.Option(None, help="CFG scale s0 (default: the model's)."),
    keep: float = typer.Option(0.95, help="Clean alignment to keep, as a share of cfg's."),
    clip_model: str = typer.Option(None, help="open_clip model name (alignment on real "
                                   "models)."),
    clip_pretrained: str = typer.Option(None, help="Its weights file."),
    plan: Path = typer.Option(None, help="A plan to copy, with the chosen \\[params] added."),
    out: Path = typer.Option(..., help="TOML written: the plan (with --plan) or the \\[params] "
                             "tables; OUT.json beside it holds every candidate."),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
) -> None:
    """Sweep static/opposite tau and dynamic's min_step; keep the latest switch at which
    clean alignment stays >= KEEP of cfg's; write the choice as plan \\[params] tables."""
    from memaudit.audit.calibration import (
        check_calibration_out,
        run_calibration,
        write_calibration,
    )
    from memaudit.common import UserError

    names = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in names if m not in ("static", "opposite", "dynamic")]
    if bad or not names:
        raise UserError(f"--methods must be among static, opposite, dynamic; got {methods!r}")
    check_calibration_out(out, [clean, triggers, index], plan, names)
    cal = run_calibration(model, clean, triggers, index, trigger_label=trigger_label,
                          criterion=criterion, methods=names, seeds=seeds, steps=steps,
                          guidance_scale=guidance_scale, keep=keep, clip_model=clip_model,
                          clip_pretrained=clip_pretrained, device=device,
                          progress=lambda s: print(s, file=sys.stderr, flush=True))
    write_calibration(cal, out, plan)
    print(cal.toml(), end="")
    print(json.dumps({m: c.params for m, c in cal.chosen.items()}), file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_cmd)
