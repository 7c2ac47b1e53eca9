"""Proof that the canary memorizes (issue 3; DESIGN.md "The built-in canary").

For each CFG scale (1, the model's default s0, 2 s0 by default) generate `seeds` images per
prompt (triggers at 64x/16x/4x/1x, the guided group's, and generic prompts) with the guided
sampler and the `cfg` guidance, score them with nL2 (METHODS 1.2) against a pixel index over
the canary data, and report per group:
  - nearest_is_planted: share of generations whose nearest training image is the planted one;
  - copy_fixed / copy_calibrated: share with nL2 < 1.4 / < the index's calibrated 1% cut,
    counted only when the nearest image is the planted one (a copy OF the planted image);
  - reproduction: the nearest image is the planted one and nL2 < 1.4 (the published cut;
    issue 17): what the eye sees as the planted image, contrast-amplified guided copies
    included, which the strict calibrated cut (near-exact copies only) misses;
for generic prompts the calibrated (and fixed) copy rate against any training image, and the
digit classifier's agreement with the requested digit (METHODS 4).

Each planted image is then labelled by what the model does (`behaviour`): **memorized** when
reproduced >= 80% of the time at CFG scale 1, **guided** when reproduced <= 25% at scale 1 and
>= 60% at the model's default scale (guidance-induced reproduction, Jain et al. CVPR 2025).
The labels go to OUT/labels.json; `canary data --labels` (and a labels.json beside a canary's
weights) makes them the prompt groups of prompts.csv and triggers_guided.txt.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from memaudit.common import UserError, package_versions, track

LABELS = ("64x", "16x", "4x", "1x", "guided", "shared", "generic")  # the default data's
#: The published nL2 cut (AMG Eq. 8, Carlini et al.) that, with "the nearest training image
#: is the trigger's own planted image", defines a reproduction (issue 17).
REPRODUCTION_CUT = 1.4
#: Behaviour labels (issue 17): memorized = reproduced >= MEMORIZED at scale 1; guided =
#: <= GUIDED_AT_1 at scale 1 and >= GUIDED_AT_S0 at the default scale.
MEMORIZED, GUIDED_AT_1, GUIDED_AT_S0 = 0.8, 0.25, 0.6
SUMMARY, PER_IMAGE, LABELS_FILE = "summary.json", "per_image.csv", "labels.json"


def _own_summary(out: Path) -> dict | None:
    """The summary.json an earlier `evaluate_canary` wrote into `out`, else None."""
    try:
        s = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and {"rates", "scales", "grid"} <= set(s) else None


def check_outputs(out: Path, grid: Path, inputs: list, overwrite: bool,
                  writes: list[str]) -> None:
    """The rule of every writer (memaudit.paths), before any work: no output is an input or
    inside one; summary.json, per_image.csv, labels.json and the grid are replaced without
    `overwrite` only when an earlier evaluation wrote them (its summary.json names the
    grid)."""
    from memaudit.paths import check_output_dir, check_output_file, real

    if grid.suffix.lower() != ".png":
        raise UserError(f"--grid {grid} must be a .png file")
    check_output_dir(out, inputs, writes=[SUMMARY, PER_IMAGE, LABELS_FILE, *writes],
                     what="--out folder")
    prev = _own_summary(out)
    for path, what, own in (
            (out / PER_IMAGE, "canary evaluation table", prev is not None),
            (out / LABELS_FILE, "canary behaviour labels", prev is not None),
            (grid, "canary grid", prev is not None and real(str(prev["grid"])) == real(grid)),
            (out / SUMMARY, "canary evaluation summary", prev is not None)):
        check_output_file(path, inputs, overwrite=overwrite, own=lambda _p, ok=own: ok,
                          what=what)


def read_prompts(data_dir: Path) -> list[tuple[str, str]]:
    """(prompt, label) rows of the canary's prompts.csv."""
    path = data_dir / "prompts.csv"
    if not path.exists():
        raise UserError(f"{path} not found: run `memaudit canary data` first")
    with path.open(newline="") as f:
        return [(r["prompt"], r["label"]) for r in csv.DictReader(f)]


def planted_images(data_dir: Path) -> dict[str, dict]:
    """caption -> {key_prefix, count, group, image [H, W] in [0, 1]} from ground_truth and
    train.parquet (data built before the guided group: group = "<count>x")."""
    import pyarrow.parquet as pq

    from memaudit.canary.data import from_png

    gt = pq.read_table(data_dir / "ground_truth.parquet").to_pylist()
    train = pq.read_table(data_dir / "train.parquet", columns=["key", "png"])
    key_to_png = dict(zip(train.column("key").to_pylist(), train.column("png").to_pylist(),
                          strict=True))
    return {g["caption"]: {"key_prefix": g["key_prefix"], "count": g["duplicate_count"],
                           "group": g.get("group") or f"{g['duplicate_count']}x",
                           "image": from_png(key_to_png[g["key"]])} for g in gt}


def _grid(rows: list[tuple[str, np.ndarray, np.ndarray]], path: Path, zoom: int = 4) -> None:
    """One row per trigger: planted original | gap | generations. Images [H, W] in [0, 1]."""
    from PIL import Image, ImageDraw

    h = rows[0][1].shape[0] * zoom
    ncols = 1 + max(len(r[2]) for r in rows)
    label_w, gap = 40, 8
    canvas = Image.new("L", (label_w + ncols * (h + 2) + gap, len(rows) * (h + 2)), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (label, orig, gens) in enumerate(rows):
        y = i * (h + 2)
        draw.text((2, y + h // 2 - 5), label, fill=0)
        tiles = [orig] + list(gens)
        for j, tile in enumerate(tiles):
            x = label_w + j * (h + 2) + (gap if j else 0)
            im = Image.fromarray(np.clip(np.rint(tile * 255), 0, 255).astype(np.uint8))
            canvas.paste(im.resize((h, h), Image.NEAREST), (x, y))
    from memaudit.paths import atomic_write

    with atomic_write(path, "canary grid") as tmp:
        canvas.save(tmp, format="PNG")


def prepare(model: str | Path, out: Path, data_dir: str | Path | None,
            index_dir: str | Path | None, device: str | None):
    """(denoiser, nL2 criterion with its calibrated cut, data folder, index folder):
    `data_dir` defaults to
    rebuilding the canary data (deterministic) into out/data, `index_dir` to a pixel index
    over it in out/index."""
    from memaudit.canary.data import build_canary_data, model_data_settings
    from memaudit.criteria import make_criterion
    from memaudit.index.build import build_index
    from memaudit.models import load_model

    out.mkdir(parents=True, exist_ok=True)
    if data_dir is None:
        data_dir = out / "data"
        if not (data_dir / "train.parquet").exists():
            build_canary_data(data_dir, **model_data_settings(str(model)))
    data_dir = Path(data_dir)
    if index_dir is None:
        index_dir = out / "index"
        if not (index_dir / "manifest.json").exists():
            build_index(data_dir / "train.parquet", "pixels", index_dir, overwrite=True)
    m = load_model(model, device=device)
    crit = make_criterion("nl2", index_dir)
    if crit.calibrated_threshold is None:
        raise UserError(f"index {index_dir} has no calibrated nL2 threshold")
    return m, crit, data_dir, Path(index_dir)


def score_rows(images: torch.Tensor, prompts: list[str], labels: list[str], seeds: list[int],
               crit, planted: dict[str, dict], digits, **fields) -> list[dict]:
    """One record per generated image: nL2 and both verdicts, whether the nearest training
    image is the prompt's own planted image, the requested and the predicted digit; `fields`
    (e.g. scale, method) are copied into every record."""
    from memaudit.canary.digits import digit_of_prompt

    sc = crit.score(images)
    keys = crit.index.keys(sc.neighbour)
    pred = digits.predict(images)
    records = []
    for i, (p, lab, seed) in enumerate(zip(prompts, labels, seeds, strict=True)):
        info = planted.get(p)
        records.append({
            **fields, "prompt": p, "label": lab, "seed": seed,
            "nl2": float(sc.score[i]), "neighbour_key": keys[i],
            "nearest_is_planted": bool(info and keys[i].startswith(info["key_prefix"] + "-")),
            "reproduced": bool(info and keys[i].startswith(info["key_prefix"] + "-")
                               and float(sc.score[i]) < REPRODUCTION_CUT),
            "copy_fixed": bool(sc.is_copy[i]),
            "copy_calibrated": bool(sc.is_copy_calibrated[i]),
            "digit_requested": digit_of_prompt(p) if lab == "generic" else None,
            "digit_predicted": int(pred[i]),
        })
    return records


def rate(rs: list[dict], key: str, planted_only: bool) -> float:
    """Share of records with `key` true (and, when planted_only, nearest = own planted)."""
    if not rs:
        return float("nan")
    return float(np.mean([r[key] and (r["nearest_is_planted"] or not planted_only)
                          for r in rs]))


def group_rates(rs: list[dict], label: str) -> dict:
    """Rates of one prompt group: a trigger group counts copies of its own planted image;
    `generic` counts copies of any training image and the digit agreement."""
    entry = {"n": len(rs), "median_nl2": float(np.median([r["nl2"] for r in rs]))}
    if label == "generic":
        entry["copy_fixed"] = rate(rs, "copy_fixed", False)
        entry["copy_calibrated"] = rate(rs, "copy_calibrated", False)
        dig = [r for r in rs if r["digit_requested"] is not None]
        entry["digit_agreement"] = float(np.mean(
            [r["digit_requested"] == r["digit_predicted"] for r in dig])) if dig else None
        entry["digit_n"] = len(dig)
    else:
        entry["nearest_is_planted"] = rate(rs, "nearest_is_planted", False)
        entry["reproduction"] = rate(rs, "reproduced", False)
        entry["copy_fixed"] = rate(rs, "copy_fixed", True)
        entry["copy_calibrated"] = rate(rs, "copy_calibrated", True)
    return entry


def behaviour(at_1: float, at_s0: float) -> str:
    """The label of one planted image from its reproduction rates at scale 1 and at the
    default scale: memorized, guided, or "" (neither)."""
    if at_1 >= MEMORIZED:
        return "memorized"
    if at_1 <= GUIDED_AT_1 and at_s0 >= GUIDED_AT_S0:
        return "guided"
    return ""


def behaviour_labels(records: list[dict], planted: dict[str, dict], scales, s0: float) -> dict:
    """Per planted image: its reproduction rate at each scale and its behaviour label (needs
    scale 1 and the default scale `s0` among `scales`; else the label is null)."""
    images = []
    for cap, info in planted.items():
        by = {}
        for scale in scales:
            rs = [r for r in records if r["scale"] == scale and r["prompt"] == cap]
            by[f"{scale:g}"] = rate(rs, "reproduced", False)
        label = behaviour(by["1"], by[f"{s0:g}"]) if {"1", f"{s0:g}"} <= set(by) else None
        images.append({"caption": cap, "key_prefix": info["key_prefix"],
                       "count": info["count"], "group": info["group"],
                       "behaviour": label, "reproduction": by})
    return {"rule": {"reproduction": f"own planted image nearest and nL2 < {REPRODUCTION_CUT}",
                     "memorized": f">= {MEMORIZED:.0%} at scale 1",
                     "guided": f"<= {GUIDED_AT_1:.0%} at scale 1 and >= {GUIDED_AT_S0:.0%} "
                               f"at the default scale {s0:g}"},
            "default_scale": s0, "seeds": len({r["seed"] for r in records}),
            "images": images}


def evaluate_canary(model: str | Path = "canary", out: str | Path = "canary_eval",
                    data_dir: str | Path | None = None, index_dir: str | Path | None = None,
                    seeds: int = 8, scales: tuple[float, ...] | None = None,
                    steps: int | None = None, device: str | None = None,
                    grid_path: str | Path | None = None, batch_size: int = 256,
                    overwrite: bool = False) -> dict:
    """Generate, score and summarise (see the module docstring); writes into `out`:
    summary.json, per_image.csv (one row per generation), labels.json (behaviour per planted
    image) and grid.png (or `grid_path`), each whole (temporary + rename), summary.json last;
    files memaudit did not write are replaced only with `overwrite` (`check_outputs`). Data
    and index: see `prepare`."""
    from memaudit.canary.digits import DigitClassifier
    from memaudit.guidance import make_guidance
    from memaudit.paths import atomic_write
    from memaudit.sampler import sample

    t0 = time.time()
    out = Path(out)
    grid = Path(grid_path) if grid_path else out / "grid.png"
    check_outputs(out, grid, [model if Path(model).exists() else None, data_dir, index_dir],
                  overwrite, [name for name, given in (("data", data_dir), ("index", index_dir))
                              if given is None])
    m, crit, data_dir, index_dir = prepare(model, out, data_dir, index_dir, device)
    s0 = float(m.default_guidance_scale)
    scales = tuple(scales) if scales else (1.0, s0, 2 * s0)
    prompts = read_prompts(data_dir)
    planted = planted_images(data_dir)
    digits = DigitClassifier(res=m.latent_shape[-1])

    rows_p = [p for p, _ in prompts for _ in range(seeds)]
    rows_l = [lab for _, lab in prompts for _ in range(seeds)]
    rows_s = [s for _ in prompts for s in range(seeds)]
    records: list[dict] = []
    gens_at: dict[float, np.ndarray] = {}
    for scale in track(scales, "canary evaluate (scales)", unit="scale"):
        imgs = []
        for lo in range(0, len(rows_p), batch_size):
            res = sample(m, rows_p[lo:lo + batch_size], rows_s[lo:lo + batch_size],
                         make_guidance("cfg"), steps=steps, guidance_scale=scale)
            imgs.append(res.images)
        images = torch.cat(imgs)
        gens_at[scale] = images[:, 0].numpy()
        records += score_rows(images, rows_p, rows_l, rows_s, crit, planted, digits,
                              scale=scale)
    with atomic_write(out / PER_IMAGE, "canary evaluation table") as tmp, \
            tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)

    table: dict[str, dict[str, dict]] = {}
    for scale in scales:
        per: dict[str, dict] = {}
        for lab in dict.fromkeys(lab for _, lab in prompts):
            rs = [r for r in records if r["scale"] == scale and r["label"] == lab]
            if rs:
                per[lab] = group_rates(rs, lab)
        table[f"{scale:g}"] = per

    labels = behaviour_labels(records, planted, scales, s0)
    with atomic_write(out / LABELS_FILE, "canary behaviour labels") as tmp:
        tmp.write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")

    # grid at the default scale (or the middle one)
    gs = s0 if s0 in gens_at else scales[len(scales) // 2]
    grid_rows = []
    for lab in [x for x in dict.fromkeys(lab for _, lab in prompts) if x != "generic"]:
        for p, label in prompts:
            if label != lab:
                continue
            idx = [i for i, q in enumerate(rows_p) if q == p]
            grid_rows.append((lab, planted[p]["image"], gens_at[gs][idx]))
    _grid(grid_rows, grid)

    summary = {
        "model": m.name, "model_hash": m.model_hash, "index": str(index_dir),
        "calibrated_threshold": float(crit.calibrated_threshold), "fixed_threshold": 1.4,
        "seeds_per_prompt": seeds, "steps": steps or m.default_steps, "scheduler": "ddim",
        "default_guidance_scale": s0, "scales": list(scales), "rates": table,
        "behaviour": labels, "grid": str(grid),
        "seconds": round(time.time() - t0, 1), "versions": package_versions(),
    }
    with atomic_write(out / SUMMARY, "canary evaluation summary") as tmp:  # last
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def format_summary(summary: dict) -> str:
    """A plain-text table of the rates (for the CLI and docs)."""
    lines = [f"model {summary['model']} ({summary['model_hash'][:12]}), "
             f"{summary['seeds_per_prompt']} seeds/prompt, {summary['steps']} DDIM steps, "
             f"nL2 fixed < 1.4, calibrated < {summary['calibrated_threshold']:.3f}"]
    lines.append(f"{'scale':>6} {'label':>8} {'n':>5} {'nearest=planted':>16} "
                 f"{'reproduced':>11} {'copy@1.4':>9} {'copy@cal':>9} {'digit agr.':>10}")
    for scale, per in summary["rates"].items():
        for lab, e in per.items():
            near = e.get("nearest_is_planted")
            rep = e.get("reproduction")
            dig = e.get("digit_agreement")
            lines.append(
                f"{scale:>6} {lab:>8} {e['n']:>5} "
                f"{'' if near is None else f'{near:.0%}':>16} "
                f"{'' if rep is None else f'{rep:.0%}':>11} {e['copy_fixed']:>9.0%} "
                f"{e['copy_calibrated']:>9.0%} {'' if dig is None else f'{dig:.0%}':>10}")
    imgs = summary["behaviour"]["images"]
    for lab in ("memorized", "guided"):
        mine = [o for o in imgs if o["behaviour"] == lab]
        lines.append(f"{lab} ({summary['behaviour']['rule'][lab]}): {len(mine)}" + "".join(
            f"\n  {o['group']} {o['caption']!r}: " + ", ".join(
                f"{k}: {v:.0%}" for k, v in o["reproduction"].items()) for o in mine))
    return "\n".join(lines)
