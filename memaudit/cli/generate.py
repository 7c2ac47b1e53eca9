"""CLI: `memaudit generate` (thin layer over memaudit.generate.generate)."""

from __future__ import annotations

from pathlib import Path

import typer


def generate_cmd(
    model: str = typer.Option(..., "--model", "-m",
                              help="canary, a canary folder, or a diffusers pipeline folder/hub "
                                   "id (SD 1/2, SDXL, SD3, FLUX, DDPM)"),
    prompts: Path = typer.Option(None, "--prompts", "-p",
                                 help="prompt list: .txt, .jsonl or .csv (',' or ';'); class ids "
                                      "or names for class-conditional models; omit for an "
                                      "unconditional model (--seeds N samples)"),
    method: list[str] = typer.Option(["cfg"], "--method",
                                     help="method or spec (e.g. cfg, dynamic, amg:spe,dup); "
                                          "repeat for several"),
    seeds: int = typer.Option(1, "--seeds", "-n", help="N: seeds 0..N-1 per prompt"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory"),
    steps: int = typer.Option(None, "--steps",
                              help="sampling steps (default: the model's, 50 for SD)"),
    guidance_scale: float = typer.Option(None, "--guidance-scale", "-s", min=0.0,
                                         help="CFG scale s0 (default: the model's, 7.5 for SD)"),
    scheduler: str = typer.Option(None, "--scheduler",
                                  help="ddim or dpm; euler for SD3/FLUX (default: the model's)"),
    device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)"),
    dtype: str = typer.Option(None, "--dtype",
                              help="fp32, fp16 or bf16 (default: fp16 on cuda, bf16 for "
                                   "SD3/FLUX; fp32 on cpu)"),
    lora: list[str] = typer.Option(None, "--lora",
                                   help="PATH[:SCALE] LoRA safetensors to load (repeatable)"),
    resolution: int = typer.Option(None, "--resolution",
                                   help="image side in pixels (default: the pipeline's)"),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="images per batched run"),
    param: list[str] = typer.Option(None, "--param",
                                    help="METHOD.NAME=VALUE, e.g. amg.c3=50 (repeatable)"),
    index: Path = typer.Option(None, "--index",
                               help="training index, for methods that need a criterion "
                               "(amg; auto uses it when given)"),
    criterion: str = typer.Option("nl2", "--criterion",
                                  help="criterion over --index that guides amg (nl2, sscd, clip)"),
    weights: str = typer.Option(None, "--weights", help="sscd index: the TorchScript file it was "
                                "built with (checked against its recorded SHA-256)"),
    amg_decoder: str = typer.Option(None, "--amg-decoder",
                                    help="AutoencoderTiny (TAESD) folder or cached hub id that "
                                    "decodes AMG's per-step check (same as --param "
                                    "amg.decoder=PATH)"),
) -> None:
    """Generate images for every prompt x method x seed into OUT (images/, generations.parquet,
    trace.parquet)."""
    import sys

    from memaudit.data.prompts import read_prompts
    from memaudit.generate import generate
    from memaudit.guidance.spec import build_guidance, parse_params
    from memaudit.models import load_model
    from memaudit.models.lora import parse_lora_spec
    from memaudit.paths import check_output_dir

    loras = [parse_lora_spec(x)[0] for x in lora or []]
    check_output_dir(out, [prompts, index, weights, model if Path(model).exists() else None,
                           amg_decoder if amg_decoder and Path(amg_decoder).exists() else None,
                           *loras],
                     writes=("generations.parquet", "trace.parquet", "images"),
                     what="--out folder")
    records = read_prompts(prompts) if prompts is not None else None
    params = parse_params(param)
    if amg_decoder:
        params.setdefault("amg", {})["decoder"] = amg_decoder
    guided = [m for m in method if build_guidance(m, params).needs_criterion]
    if guided and index is not None:
        from memaudit.criteria import check_guiding

        check_guiding(criterion, guided[0])  # before the (slow) model load
    denoiser = load_model(model, device=device, dtype=dtype, loras=lora or [],
                          resolution=resolution)
    if records is None:
        records = unconditional_prompts(denoiser)
    crit = None
    if index is not None:
        from memaudit.criteria import make_criterion, open_index
        from memaudit.models.resolution import finer_than_model

        idx = open_index(str(index), device=str(denoiser.device), weights=weights)
        crit = make_criterion(criterion, idx)
        warning = finer_than_model(idx, denoiser)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    table = generate(denoiser, records, list(method), seeds, out, steps=steps,
                     guidance_scale=guidance_scale, scheduler=scheduler, criterion=crit,
                     batch_size=batch_size, params=params)
    rows = table.to_pylist()
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    print(f"{len(rows)} images in {out} ({len(records)} prompts, model {denoiser.name})")
    for note in getattr(denoiser, "notes", []):
        print(f"  note: {note}")
    for r in getattr(denoiser, "loras", []):
        print(f"  lora: {r['path']} scale {r['scale']:g} sha256 {r['sha256']}")
    for m, rs in by_method.items():
        wall = sum(r["wall_seconds"] for r in rs) / len(rs)
        print(f"  {m}: {len(rs)} images, {wall:.3f} s/image, "
              f"{rs[0]['unet_calls']:g} UNet rows/image, {rs[0]['forwards']} forwards/image")


def unconditional_prompts(denoiser) -> list:
    """No --prompts: one empty prompt for an unconditional model (--seeds N is the count)."""
    from memaudit.common import UserError
    from memaudit.data.prompts import PromptRecord
    from memaudit.models.base import COND

    if COND in getattr(denoiser, "capabilities", {COND}):
        raise UserError("--prompts is required (only an unconditional model samples without)")
    return [PromptRecord("", "<unconditional>", None, 0)]


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
