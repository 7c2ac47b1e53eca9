"""Quality on the canary (docs/mitigations.md "Quality"): does KID / FD move the way the eye
says, for every method?

    python -m memaudit.quality.bench --work /tmp/qbench [--model canary --seeds 4 --steps 50]

1. The canary data and its pixel index (built under WORK unless --data / --index are given).
2. An audit (the user's code path: a plan, `run_audit`, the database) of every mitigation on
   all canary prompt lists, with `[quality] features = ["digits", "index"]`: KID +- std and FD
   per method in the digit classifier's space and in pixel space, copy rate, agreement.
3. Sanity: a second training sample against the reference (KID should be ~0) and uniform
   noise (large), in both spaces.
4. The eye: `cfg` at growing guidance scales (the canary's outputs decay into noise above
   about 3, DESIGN.md "The built-in canary") and cfg's own images with added Gaussian noise
   and blur: the figures must grow with the damage.
5. A PNG of `cfg`, the best and the worst method (by KID in the first space) side by side on
   the same (prompt, seed) rows.
Writes WORK/quality.json and WORK/quality.md (the tables pasted into docs/mitigations.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memaudit.guidance.bench import DEFAULT_METHODS, TRIGGER_GROUPS, prepare

GROUP_FILES = [(g, f"triggers_{g}.txt") for g in TRIGGER_GROUPS] + [("generic", "generic.txt")]


def write_plan(work: Path, data: Path, index: Path, model: str, methods: list[str],
               seeds: int, steps: int, reference: int, params: dict[str, dict]) -> Path:
    lines = [f"out = {json.dumps(str(work / 'audit'))}", f"model = {json.dumps(model)}",
             f"index = {json.dumps(str(index))}", 'criteria = ["nl2"]',
             f"methods = {json.dumps(methods)}", f"seeds = {seeds}", f"steps = {steps}",
             "batch_size = 256", "", "[quality]", 'features = ["digits", "index"]',
             f"reference = {reference}", "seed = 0", ""]
    for m, kv in params.items():
        lines += [f"[params.{json.dumps(m)}]"] + [f"{k} = {json.dumps(v)}" for k, v in
                                                 kv.items()] + [""]
    for label, name in GROUP_FILES:
        lines += ["[[prompts]]", f"file = {json.dumps(str(data / name))}",
                  f"label = {json.dumps(label)}", ""]
    plan = work / "plan.toml"
    plan.write_text("\n".join(lines))
    return plan


def method_rows(db: Path) -> list[dict[str, Any]]:
    from memaudit.store import AuditStore

    with AuditStore(db, read_only=True) as s:
        rid = s.run()["id"]
        q = s.query("SELECT * FROM method_quality WHERE run_id = ?", [rid])
        c = {r["method"]: r for r in s.query(
            "SELECT * FROM method_summary WHERE run_id = ? AND criterion = 'nl2'", [rid])}
    for r in q:
        r.update({k: c[r["method"]][k] for k in ("copy_rate_calibrated", "copy_rate_fixed",
                                                 "alignment", "unet_ratio_to_cfg")})
    return q


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (separable, reflect padding)."""
    r = max(1, int(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def images_of(db: Path, method: str) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    from memaudit.quality.reference import load_pngs
    from memaudit.store import AuditStore

    with AuditStore(db, read_only=True) as s:
        rows = s.query("SELECT g.image_path, g.seed, p.text, p.label FROM generations g "
                       "JOIN prompts p ON p.id = g.prompt_id WHERE g.run_id = ? AND "
                       "g.method = ? ORDER BY g.id", [s.run()["id"], method])
    return load_pngs([db.parent / r["image_path"] for r in rows]), rows


def side_by_side(db: Path, methods: list[str], out: Path, seed: int = 0, per_group: int = 6,
                 tile: int = 64) -> Path:
    """One panel per method: a row per prompt group, `per_group` prompts, one seed."""
    from PIL import Image, ImageDraw

    panels = []
    for m in methods:
        imgs, rows = images_of(db, m)
        grid: list[list[np.ndarray]] = []
        for label, _ in GROUP_FILES:
            idx = [i for i, r in enumerate(rows) if r["label"] == label and r["seed"] == seed]
            if label == "generic":  # spread over the digits
                idx = [idx[int(j)] for j in np.linspace(0, len(idx) - 1, per_group).round()]
            grid.append([imgs[i].permute(1, 2, 0).numpy() for i in idx[:per_group]])
        panels.append((m, grid))
    pad, head = 12, 22
    w = len(panels) * (per_group * tile + pad) + pad
    h = len(GROUP_FILES) * tile + head + pad
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (m, grid) in enumerate(panels):
        x0 = pad + p * (per_group * tile + pad)
        draw.text((x0, 4), m, fill="black")
        for r, row in enumerate(grid):
            for c, a in enumerate(row):
                im = Image.fromarray((a * 255 + 0.5).astype(np.uint8))
                canvas.paste(im.resize((tile, tile), Image.NEAREST),
                             (x0 + c * tile, head + r * tile))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def fmt(rows: list[dict[str, Any]], spaces: list[str]) -> list[str]:
    head = "| method | copy (cal.) | agreement | " + " | ".join(
        f"KID +- std [{s}] | FD (x cfg) [{s}]" for s in spaces) + " |"
    out = [head, "|" + "---|" * (3 + 2 * len(spaces))]
    by = {(r["method"], r["features"]): r for r in rows}
    for m in dict.fromkeys(r["method"] for r in rows):
        first = by[(m, spaces[0])]
        cells = [m, f"{100 * (first['copy_rate_calibrated'] or 0):.0f}%",
                 "-" if first["alignment"] is None else f"{100 * first['alignment']:.0f}%"]
        for s in spaces:
            r = by[(m, s)]
            cells += [f"{r['kid']:.4f} +- {r['kid_std']:.4f}",
                      f"{r['fd']:.3g} ({r['fd_ratio_to_cfg']:.2f})"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", default="canary")
    ap.add_argument("--data", type=Path)
    ap.add_argument("--index", type=Path)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reference", type=int, default=500)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--scales", default="1.5,3,5,8")
    ap.add_argument("--png", type=Path, help="Where to write the side-by-side PNG.")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from memaudit.audit import load_plan, run_audit
    from memaudit.audit.quality import QualitySpec, QualityStage
    from memaudit.guidance import build_guidance
    from memaudit.index import TrainingIndex
    from memaudit.models import load_model
    from memaudit.quality import reference_sample
    from memaudit.sampler import sample

    t0 = time.perf_counter()
    work = args.work.resolve()
    data, index = prepare(work, args.data, args.index)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    plan = write_plan(work, data.resolve(), index.resolve(), args.model, methods, args.seeds,
                      args.steps, args.reference, {"amg": {"c3": 3000.0}})
    res = run_audit(load_plan(plan), device=args.device, log=print)
    rows = method_rows(res.db_path)
    spaces = list(dict.fromkeys(r["features"] for r in rows))

    # the same feature spaces and reference sample as the audit, for the controls
    idx = TrainingIndex.open(index)
    model = load_model(args.model, device=args.device)
    stage = QualityStage(QualitySpec(features=["digits", "index"], reference=args.reference),
                         idx, model, args.device, print)
    cfg_imgs, cfg_rows = images_of(res.db_path, "cfg")
    size = tuple(cfg_imgs.shape[-2:])

    def measure(x: torch.Tensor) -> dict[str, dict[str, float]]:
        return {r["features"]: {"kid": r["kid"], "kid_std": r["kid_std"], "fd": r["fd"],
                                "n": r["n"]} for r in stage.measure(x)}

    other = reference_sample(idx, args.reference, seed=1).tensor(size)
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(len(other), 1, *size, generator=g).expand(-1, 3, -1, -1)
    sanity = {"train_vs_train": measure(other), "noise_vs_train": measure(noise),
              "cfg_vs_train": measure(cfg_imgs)}
    damage: dict[str, Any] = {}
    for s in (0.05, 0.1, 0.2, 0.4):
        noisy = (cfg_imgs + s * torch.randn(cfg_imgs.shape, generator=g)).clamp(0, 1)
        damage[f"noise {s}"] = measure(noisy)
    for s in (0.5, 1.0, 2.0):
        damage[f"blur {s}"] = measure(blur(cfg_imgs, s).clamp(0, 1))
    scales: dict[str, Any] = {}
    texts, seeds_ = [r["text"] for r in cfg_rows], [r["seed"] for r in cfg_rows]
    for s in [float(v) for v in args.scales.split(",")]:
        out = sample(model, texts, seeds_, build_guidance("cfg", {}), steps=args.steps,
                     guidance_scale=s, batch_size=256)
        x = torch.from_numpy(np.round(out.images.clamp(0, 1).numpy() * 255) / 255).float()
        scales[f"cfg scale {s:g}"] = measure(x)

    first = spaces[0]
    ranked = sorted((r for r in rows if r["features"] == first), key=lambda r: r["kid"])
    best, worst = ranked[0]["method"], ranked[-1]["method"]
    png = side_by_side(res.db_path, list(dict.fromkeys(["cfg", best, worst])),
                       args.png or work / "quality_best_worst.png")
    result = {"settings": vars(args) | {"work": str(work), "png": str(png)}, "methods": rows,
              "sanity": sanity, "damage": damage, "scales": scales, "best": best,
              "worst": worst, "seconds": time.perf_counter() - t0}
    md = fmt(rows, spaces) + ["", "| control | " + " | ".join(
        f"KID +- std [{s}] | FD [{s}]" for s in spaces) + " |", "|" + "---|" * (1 + 2 * len(
            spaces))]
    for name, d in {**sanity, **damage, **scales}.items():
        md.append(f"| {name} | " + " | ".join(
            f"{d[s]['kid']:.4f} +- {d[s]['kid_std']:.4f} | {d[s]['fd']:.3g}" for s in spaces)
            + " |")
    md += ["", f"best {best}, worst {worst} (KID in {first}); image: {png}",
           f"{result['seconds']:.0f} s in all"]
    (work / "quality.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (work / "quality.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
