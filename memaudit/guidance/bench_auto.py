"""`auto` on a mostly-generic prompt mix, on the built-in canary (docs/mitigations.md "auto").

    python -m memaudit.guidance.bench_auto --work /tmp/abench [--data DATA --index INDEX]
        [--generic-seeds 10 --trigger-seeds 2 --fprs 0.01,0.05 --param amg.c3=3000]

Rows: every generic prompt x generic-seeds and every 64x+16x trigger prompt x trigger-seeds
(defaults: 21 x 10 = 210 generic and 12 x 2 = 24 trigger images, 10.3% triggers). The
threshold of each `auto` is calibrated at each FPR on the generic prompt list (the audit
plan's `clean_label = "generic"`, in-sample) with the default screening score, seeds 0-3;
that one-off calibration is timed apart. Every method runs on the same rows in the same
batches; cfg and each auto are repeated `--repeats` times interleaved (wall time: the minimum
over repeats), the single mitigations run once.
Reports per method: trigger and generic copy rates (calibrated / fixed nL2), digit agreement,
generic rows bit-identical to cfg's, flagged prompts, wall time and UNet rows as ratios to
cfg. Writes WORK/auto_bench.json and .md.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch


def run(model: Any, crit: Any, spec: str, params: dict, prompts: list[str], seeds: list[int],
        steps: int, batch_size: int) -> tuple[Any, Any, float]:
    from memaudit.guidance import build_guidance
    from memaudit.sampler import sample

    g = build_guidance(spec, params)
    use = g.needs_criterion or g.uses_criterion
    t0 = time.perf_counter()
    out = sample(model, prompts, seeds, g, steps=steps, criterion=crit if use else None,
                 batch_size=batch_size)
    return g, out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from memaudit.guidance.bench import bench_parser, write_result

    ap = bench_parser(__doc__)
    ap.add_argument("--generic-seeds", type=int, default=10)
    ap.add_argument("--trigger-seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--fprs", default="0.01,0.05")
    ap.add_argument("--extra-methods", default="amg", help="Single mitigations to compare.")
    ap.add_argument("--param", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    from memaudit.guidance.bench import digit_of, digit_predict, setup
    from memaudit.guidance.spec import parse_params
    from memaudit.screen import DEFAULT_SCORE, calibrate_threshold, screen_prompts
    from memaudit.screen.bench import prompt_lists

    data, _, model, crit = setup(args.work, args.data, args.index, args.model, args.device)
    lists = prompt_lists(data)
    generic, triggers = lists["generic"], lists["64x"] + lists["16x"]
    rows = ([(p, s, "generic") for p in generic for s in range(args.generic_seeds)]
            + [(p, s, "trigger") for p in triggers for s in range(args.trigger_seeds)])
    prompts, seeds = [r[0] for r in rows], [r[1] for r in rows]
    kind = np.array([r[2] for r in rows])
    params = parse_params(args.param)

    t0 = time.perf_counter()
    clean = screen_prompts(model, generic, seeds=4, batch_size=4, progress=False)
    calib_s = time.perf_counter() - t0
    specs: dict[str, tuple[str, dict]] = {"cfg": ("cfg", params)}
    for m in [m.strip() for m in args.extra_methods.split(",") if m.strip()]:
        specs[m] = (m, params)
    thresholds = {}
    for fpr in [float(v) for v in args.fprs.split(",")]:
        thr = calibrate_threshold(clean, fpr)
        thresholds[f"auto (FPR {fpr:g})"] = thr
        specs[f"auto (FPR {fpr:g})"] = ("auto", {**params, "auto": {
            **params.get("auto", {}), "threshold": thr}})

    results: dict[str, dict[str, Any]] = {}
    outs: dict[str, Any] = {}
    for rep in range(args.repeats):  # the single mitigations run once, cfg and auto repeat
        for label, (spec, prm) in specs.items():
            if rep and label not in thresholds and label != "cfg":
                continue
            g, out, wall = run(model, crit, spec, prm, prompts, seeds, args.steps,
                               args.batch_size)
            r = results.setdefault(label, {"wall": float("inf")})
            r["wall"] = min(r["wall"], wall)
            if rep == 0:
                outs[label] = out
                r["unet_rows"] = out.unet_rows
                if hasattr(g, "scores"):
                    r["flagged_prompts"] = {
                        k: int(sum(g.scores[p] > g.threshold for p in ps))
                        for k, ps in (("trigger", triggers), ("generic", generic))}
            print(f"{label} repeat {rep}: {wall:.1f}s", flush=True)
    cfg_imgs = outs["cfg"].images
    gm = kind == "generic"
    want = [digit_of(p) for p, k in zip(prompts, kind, strict=True) if k == "generic"]
    for label, out in outs.items():
        r = results[label]
        sc = crit.score(out.images)
        cal = np.asarray(sc.is_copy_calibrated, dtype=float)
        fixed = np.asarray(sc.is_copy, dtype=float)
        r.update({
            "copy_calibrated": {k: float(cal[kind == k].mean()) for k in ("trigger", "generic")},
            "copy_fixed": {k: float(fixed[kind == k].mean()) for k in ("trigger", "generic")},
            "generic_identical_to_cfg": int(sum(torch.equal(out.images[i], cfg_imgs[i])
                                                for i in np.flatnonzero(gm))),
            "wall_ratio": r["wall"] / results["cfg"]["wall"],
            "unet_ratio": r["unet_rows"] / results["cfg"]["unet_rows"]})
        pred = digit_predict(out.images[torch.from_numpy(gm)])
        keep = [i for i, w in enumerate(want) if w is not None]
        r["agreement"] = None if pred is None else float(np.mean(
            [int(pred[i]) == int(want[i]) for i in keep]))
    res = {"settings": {"model": args.model, "steps": args.steps, "score": DEFAULT_SCORE,
                        "generic_images": int(gm.sum()), "trigger_images": int((~gm).sum()),
                        "repeats": args.repeats, "params": params},
           "thresholds": thresholds, "calibration_seconds": calib_s, "methods": results}
    write_result(args.work, "auto_bench", res, markdown(res))
    return res


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [f"auto bench: {s}", "",
             f"Thresholds ({s['score']}, calibrated on the generic list): "
             + ", ".join(f"{k} {v:.4f}" for k, v in res["thresholds"].items())
             + f"; calibration {res['calibration_seconds']:.1f} s (once)", "",
             "| method | trigger copy (cal / fixed) | generic copy (cal / fixed) | agreement | "
             f"generic = cfg (of {s['generic_images']}) | flagged trig / generic prompts | "
             "wall / cfg | UNet rows / cfg |", "|---|---|---|---|---|---|---|---|"]
    for label, r in res["methods"].items():
        cal, fixed, fl = r["copy_calibrated"], r["copy_fixed"], r.get("flagged_prompts")
        agree = "n/a" if r["agreement"] is None else f"{100 * r['agreement']:.0f}%"
        flagged = "-" if fl is None else f"{fl['trigger']} / {fl['generic']}"
        lines.append(
            f"| {label} | {100 * cal['trigger']:.0f}% / {100 * fixed['trigger']:.0f}% | "
            f"{100 * cal['generic']:.0f}% / {100 * fixed['generic']:.0f}% | {agree} | "
            f"{r['generic_identical_to_cfg']} | {flagged} | {r['wall_ratio']:.2f} | "
            f"{r['unet_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from memaudit.guidance.bench import run_cli

    run_cli(main)
