"""Mitigation and screening benchmark on the built-in canary (docs/mitigations.md).

    python -m memaudit.guidance.bench --work /tmp/mbench [--seeds 8 --per-group 6 --steps 50]

Builds (or reuses) the canary data (`build_canary_data`) and its pixel index (`build_index`),
then, for every method in one run on the same (prompt, seed) rows:
- copy rate by nL2 (fixed 1.4 and the index-calibrated 1% FPR threshold) per duplicate count
  of the trigger prompts and on generic digit prompts;
- digit-classifier agreement on the generic digit prompts (METHODS 4 on the canary);
- wall time and UNet rows per image, as a ratio to `cfg` measured in the same run;
- dynamic: per-sample switch steps for triggers vs generic; AMG: share of steps each part
  fired for triggers vs generic, and the measured cost per step of its similarity + gradient;
- screening (Wen et al., METHODS 2): AUC of 64x+16x triggers vs the 1x planted prompts and vs
  generic prompts, TPR at 1% FPR, UNet rows vs a 50-step generation.
`--tune` first picks `dynamic.min_step` and `amg.c3` on separate seeds (see `tune`).
Writes WORK/bench.json and WORK/bench.md (tables pasted into docs/mitigations.md).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memaudit.common import UserError

DEFAULT_METHODS = ("cfg", "static", "dynamic", "opposite", "opposite-dynamic", "amg", "rna",
                   "rta", "cwr", "gni", "wen", "init-noise", "init-noise:batch-wise",
                   "reanchor")  # part ablations: add amg:spe, amg:dup, amg:sim; auto: bench_auto
TRIGGER_GROUPS = ("64x", "16x", "4x", "1x")


def digit_of(prompt: str) -> int | None:
    try:
        from memaudit.canary.digits import digit_of_prompt

        d = digit_of_prompt(prompt)
        return None if d is None else int(d)
    except ImportError:
        m = re.search(r"\b(\d)\b", prompt)
        return int(m.group(1)) if m else None


def digit_predict(images: torch.Tensor) -> np.ndarray | None:
    """Digit classifier predictions, or None when the classifier is not available."""
    try:
        from memaudit.canary.digits import DigitClassifier
    except ImportError:
        return None
    return np.asarray(DigitClassifier().predict(images)).reshape(-1)


def prepare(work: Path, data: Path | None, index: Path | None) -> tuple[Path, Path]:
    """Canary data and pixel index under `work` unless given."""
    from memaudit.canary.data import build_canary_data
    from memaudit.index.build import build_index

    work.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = work / "data"
        if not (data / "train.parquet").exists():
            build_canary_data(data)
    if index is None:
        index = work / "index"
        if not (index / "manifest.json").exists():
            build_index(data / "train.parquet", "pixels", index)
    return data, index


def setup(work: Path, data: Path | None, index: Path | None, model_spec: str, device: str
          ) -> tuple[Path, Path, Any, Any]:
    """A bench run's canary data, pixel index, model and calibrated nL2 criterion."""
    from memaudit.criteria import make_criterion
    from memaudit.models.base import load_model

    torch.manual_seed(0)
    data, index = prepare(work, data, index)
    model = load_model(model_spec, device=device)
    crit = make_criterion("nl2", index)
    if crit.calibrated_threshold is None:
        raise UserError(f"{index} has no calibrated nL2 threshold (build it with calibration)")
    return data, index, model, crit


def prompt_groups(data: Path, per_group: int) -> dict[str, list[str]]:
    """First `per_group` prompts of each trigger list; generic digit prompts spread over 0-9."""
    groups = {}
    for g in TRIGGER_GROUPS:
        lines = [s.strip() for s in (data / f"triggers_{g}.txt").read_text().splitlines()]
        groups[g] = [s for s in lines if s][:per_group]
    generic = [s.strip() for s in (data / "generic.txt").read_text().splitlines() if s.strip()]
    digits = [p for p in generic if digit_of(p) is not None]
    idx = np.linspace(0, len(digits) - 1, min(per_group, len(digits))).round().astype(int)
    groups["generic"] = [digits[i] for i in idx]
    return groups


def run_method(model: Any, spec: str, params: dict, groups: dict[str, list[str]],
               seeds: list[int], steps: int, crit: Any, batch_size: int) -> dict[str, Any]:
    """Generate every (group prompt, seed) row with one method and measure it."""
    from memaudit.guidance import build_guidance
    from memaudit.sampler import sample

    g = build_guidance(spec, params)
    rows = [(name, p, s) for name, ps in groups.items() for p in ps for s in seeds]
    t0 = time.perf_counter()
    out = sample(model, [p for _, p, _ in rows], [s for _, _, s in rows], g, steps=steps,
                 criterion=crit if g.needs_criterion else None, batch_size=batch_size)
    wall = time.perf_counter() - t0
    sc = crit.score(out.images)
    names = np.array([n for n, _, _ in rows])
    res: dict[str, Any] = {"method": spec, "params": params.get(spec.split(":")[0], {}),
                           "wall_per_image": wall / len(rows), "unet_rows": out.unet_rows,
                           "images": len(rows), "copy_fixed": {}, "copy_calibrated": {},
                           "nl2_median": {}}
    for name in groups:
        m = names == name
        res["copy_fixed"][name] = float(np.mean(sc.is_copy[m]))
        cal = sc.is_copy_calibrated if sc.is_copy_calibrated is not None else sc.is_copy
        res["copy_calibrated"][name] = float(np.mean(cal[m]))
        res["nl2_median"][name] = float(np.median(sc.score[m]))
    gm = names == "generic"
    want = [digit_of(p) for n, p, _ in rows if n == "generic"]
    pred = digit_predict(out.images[torch.from_numpy(gm)])
    res["agreement"] = None if pred is None else float(np.mean(
        [int(a) == int(b) for a, b in zip(pred, want, strict=True)]))
    trig = np.isin(names, ["64x", "16x"])
    if "switch_step" in out.trace[-1]:
        sw = np.array(out.trace[-1]["switch_step"], dtype=float)
        res["switch_step"] = {"trigger_64_16_mean": float(sw[trig].mean()),
                              "trigger_64_16_median": float(np.median(sw[trig])),
                              "generic_mean": float(sw[gm].mean()),
                              "generic_median": float(np.median(sw[gm]))}
    if "amg_spe" in out.trace[0]:
        share = {}
        for part in ("amg_spe", "amg_dup", "amg_sim", "fired"):
            v = np.array([rec[part] for rec in out.trace], dtype=float)  # [steps, B]
            share[part] = {k: float(v[:, m].mean()) if m.any() else None for k, m in
                           (("trigger_64_16", trig), ("generic", gm), ("1x", names == "1x"))}
        res["amg_share"] = share
        res["amg_similarity_s_per_step"] = g.cost["similarity_s"] / max(1, g.cost[
            "similarity_calls"])
    return res


def screening(model: Any, groups_all: dict[str, list[str]], seeds: int = 4, steps: int = 1
              ) -> dict[str, Any]:
    """Wen et al. screening scores; AUC / TPR@1%FPR of 64x+16x vs 1x and vs generic."""
    from memaudit.screen import auc, screen_prompts, tpr_at_fpr

    rows0 = model.unet_rows
    t0 = time.perf_counter()
    scores = {g: screen_prompts(model, ps, steps=steps, seeds=seeds, score="wen")
              for g, ps in groups_all.items()}
    n = sum(len(ps) for ps in groups_all.values())
    rows = (model.unet_rows - rows0) / n
    pos = np.concatenate([scores["64x"], scores["16x"]])
    gen_steps = getattr(model, "default_steps", 50)
    return {
        "steps": steps, "seeds": seeds, "unet_rows_per_prompt": rows, "generation_steps": gen_steps,
        "seconds_per_prompt": (time.perf_counter() - t0) / n,
        "ratio_vs_one_image": 2 * gen_steps / rows,
        "ratio_vs_images_same_seeds": 2 * gen_steps * seeds / rows,
        "auc_trig_vs_1x": auc(pos, scores["1x"]),
        "tpr1_trig_vs_1x": tpr_at_fpr(pos, scores["1x"], 0.01),
        "auc_trig_vs_generic": auc(pos, scores["generic"]),
        "tpr1_trig_vs_generic": tpr_at_fpr(pos, scores["generic"], 0.01),
        "auc_1x_vs_generic": auc(scores["1x"], scores["generic"]),
        "auc_4x_vs_1x": auc(scores["4x"], scores["1x"]),
        "mean_score": {g: float(np.mean(s)) for g, s in scores.items()},
    }


def tune(model: Any, crit: Any, groups: dict[str, list[str]], seeds: list[int], steps: int,
         batch_size: int, min_steps=(2, 5, 10, 20), c3s=(1.0, 3.0, 10.0, 30.0, 100.0),
         log=print) -> dict[str, Any]:
    """Pick dynamic.min_step and amg.c3 on tuning seeds (disjoint from the evaluation seeds).

    Rule for both: the lowest copy rate (calibrated nL2) on 64x+16x triggers among settings
    whose generic digit agreement is >= 0.9x cfg's; ties go to the smaller value (less
    intervention). Every candidate is returned for the report."""
    sub = {k: groups[k] for k in ("64x", "16x", "generic")}
    base = run_method(model, "cfg", {}, sub, seeds, steps, crit, batch_size)
    floor = 0.9 * (base["agreement"] if base["agreement"] is not None else 0.0)

    def trig(r):
        return (r["copy_calibrated"]["64x"] + r["copy_calibrated"]["16x"]) / 2

    out: dict[str, Any] = {"cfg": base, "seeds": seeds, "dynamic": [], "amg": []}
    for key, method, values in (("min_step", "dynamic", min_steps), ("c3", "amg", c3s)):
        best = None
        for v in values:
            r = run_method(model, method, {method: {key: v}}, sub, seeds, steps, crit,
                           batch_size)
            out[method].append({key: v, "trigger_copy": trig(r), "agreement": r["agreement"],
                                "switch_step": r.get("switch_step")})
            log(f"tune {method}.{key}={v}: trigger copy {trig(r):.3f} agreement "
                f"{r['agreement']}")
            ok = r["agreement"] is None or r["agreement"] >= floor
            if ok and (best is None or trig(r) < best[1]):
                best = (v, trig(r))
        out[f"best_{key}"] = best[0] if best else values[-1 if method == "dynamic" else 0]
    return out


def timing(model: Any, crit: Any, specs: list[str], params: dict, prompts: list[str],
           seeds: list[int], steps: int, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Wall time per image, interleaved over methods and repeated; the minimum over repeats
    (the least disturbed run on a shared machine) and its ratio to cfg's minimum."""
    from memaudit.guidance import build_guidance
    from memaudit.sampler import sample

    rows = [(p, s) for p in prompts for s in seeds]
    best: dict[str, float] = {}
    for _ in range(repeats):
        for spec in ["cfg", *[m for m in specs if m != "cfg"]]:
            g = build_guidance(spec, params)
            t0 = time.perf_counter()
            sample(model, [p for p, _ in rows], [s for _, s in rows], g, steps=steps,
                   criterion=crit if g.needs_criterion else None)
            dt = (time.perf_counter() - t0) / len(rows)
            best[spec] = min(best.get(spec, float("inf")), dt)
    return {k: {"min_wall_per_image": v, "ratio_to_cfg": v / best["cfg"]}
            for k, v in best.items()}


def fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.0f}%" if pct else f"{v:.2f}"


def markdown(result: dict[str, Any]) -> str:
    rs = result["methods"]
    cfg = next(r for r in rs if r["method"] == "cfg")
    lines = [f"Canary bench: {result['settings']}", "",
             "| method | 64x | 16x | 4x | 1x | generic | agreement | wall / cfg | UNet / cfg |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        cells = [f"{fmt(r['copy_fixed'][g])} / {fmt(r['copy_calibrated'][g])}"
                 for g in (*TRIGGER_GROUPS, "generic")]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {fmt(r['agreement'])} | "
                     f"{r['wall_per_image'] / cfg['wall_per_image']:.2f} | "
                     f"{r['unet_rows'] / cfg['unet_rows']:.2f} |")
    lines += ["", "Copy cells: nL2 < 1.4 / nL2 < calibrated threshold "
              f"({result['calibrated_threshold']:.3f}).", ""]
    for r in rs:
        if "switch_step" in r:
            s = r["switch_step"]
            lines.append(f"- {r['method']} switch step (mean / median): triggers 64x+16x "
                         f"{s['trigger_64_16_mean']:.1f} / {s['trigger_64_16_median']:.0f}, "
                         f"generic {s['generic_mean']:.1f} / {s['generic_median']:.0f}")
        if "amg_share" in r:
            sh = r["amg_share"]
            parts = ", ".join(f"{k} {fmt(v['trigger_64_16'])} vs {fmt(v['generic'])}"
                              for k, v in sh.items())
            lines.append(f"- {r['method']} share of steps fired (triggers vs generic): {parts}; "
                         f"similarity+grad {1000 * r['amg_similarity_s_per_step']:.1f} ms/step")
    for sc in result["screening"]:
        lines.append(
            f"- screening steps={sc['steps']} seeds={sc['seeds']}: AUC 64x+16x vs 1x "
            f"{sc['auc_trig_vs_1x']:.3f} (TPR@1%FPR {sc['tpr1_trig_vs_1x']:.2f}), vs generic "
            f"{sc['auc_trig_vs_generic']:.3f} (TPR@1%FPR {sc['tpr1_trig_vs_generic']:.2f}); "
            f"1x vs generic {sc['auc_1x_vs_generic']:.3f}; 4x vs 1x {sc['auc_4x_vs_1x']:.3f}; "
            f"{sc['unet_rows_per_prompt']:.0f} UNet rows/prompt = "
            f"{sc['ratio_vs_one_image']:.1f}x fewer than one {sc['generation_steps']}-step "
            f"image, {sc['ratio_vs_images_same_seeds']:.0f}x fewer than generating its "
            f"{sc['seeds']} seeds")
    return "\n".join(lines) + "\n"


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The options every canary bench takes: --work, --model, --data, --index, --device."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", default="canary")
    ap.add_argument("--data", type=Path)
    ap.add_argument("--index", type=Path)
    ap.add_argument("--device", default="cpu")
    return ap


def write_result(work: Path, stem: str, result: dict[str, Any], md: str) -> None:
    """WORK/STEM.json and WORK/STEM.md, and the markdown on stdout."""
    work.mkdir(parents=True, exist_ok=True)
    (work / f"{stem}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (work / f"{stem}.md").write_text(md)
    print(md)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = bench_parser(__doc__)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--per-group", type=int, default=6)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--param", action="append", default=[])
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-seeds", type=int, default=2)
    ap.add_argument("--tune-min-steps", default="2,5,10,20")
    ap.add_argument("--tune-c3", default="1,3,10,30,100")
    ap.add_argument("--screen-seeds", default="4,2,1")
    ap.add_argument("--screen-steps", default="1")
    ap.add_argument("--timing-only", type=int, default=0, metavar="REPEATS",
                    help="Only measure wall time per image (interleaved, min of REPEATS).")
    args = ap.parse_args(argv)

    from memaudit.guidance.spec import parse_params

    data, index, model, crit = setup(args.work, args.data, args.index, args.model, args.device)
    groups = prompt_groups(data, args.per_group)
    params = parse_params(args.param)
    seeds = list(range(args.seeds))
    result: dict[str, Any] = {
        "settings": {"model": args.model, "seeds": args.seeds, "per_group": args.per_group,
                     "steps": args.steps, "scale": model.default_guidance_scale},
        "calibrated_threshold": float(crit.calibrated_threshold), "groups": groups}
    t_all = time.perf_counter()
    if args.timing_only:
        specs = [m.strip() for m in args.methods.split(",") if m.strip()]
        prompts = [p for g in ("64x", "generic") for p in groups[g]]
        tm = timing(model, crit, specs, params, prompts, seeds, args.steps, args.timing_only)
        (args.work / "timing.json").write_text(json.dumps(tm, indent=2) + "\n")
        for k, v in tm.items():
            print(f"{k}: {1000 * v['min_wall_per_image']:.1f} ms/image, "
                  f"{v['ratio_to_cfg']:.2f}x cfg")
        return {"timing": tm}
    if args.tune:
        tuned = tune(model, crit, groups, list(range(1000, 1000 + args.tune_seeds)), args.steps,
                     args.batch_size, [int(v) for v in args.tune_min_steps.split(",")],
                     [float(v) for v in args.tune_c3.split(",")])
        result["tuning"] = tuned
        params.setdefault("dynamic", {}).setdefault("min_step", tuned["best_min_step"])
        params.setdefault("opposite-dynamic", {}).setdefault("min_step",
                                                             tuned["best_min_step"])
        params.setdefault("amg", {}).setdefault("c3", tuned["best_c3"])
    result["params"] = params
    methods = []
    for spec in [m.strip() for m in args.methods.split(",") if m.strip()]:
        r = run_method(model, spec, params, groups, seeds, args.steps, crit, args.batch_size)
        print(f"{spec}: {json.dumps({k: r[k] for k in ('copy_fixed', 'copy_calibrated')})} "
              f"agreement {r['agreement']} wall {r['wall_per_image']:.4f}s rows "
              f"{r['unet_rows']:.0f}", flush=True)
        methods.append(r)
    result["methods"] = methods
    all_prompts = {g: [s.strip() for s in (data / f"triggers_{g}.txt").read_text().splitlines()
                       if s.strip()] for g in TRIGGER_GROUPS}
    all_prompts["generic"] = [s.strip() for s in (data / "generic.txt").read_text().splitlines()
                              if s.strip()]
    result["screening"] = [screening(model, all_prompts, seeds=int(s), steps=int(n))
                           for n in args.screen_steps.split(",")
                           for s in args.screen_seeds.split(",")]
    result["total_seconds"] = time.perf_counter() - t_all
    write_result(args.work, "bench", result, markdown(result))
    return result


def run_cli(main: Any) -> None:
    """A bench's `python -m` entry: a UserError is one `error:` line, exit 1."""
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    run_cli(main)
