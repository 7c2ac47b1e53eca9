"""Screening benchmark on the built-in canary: every score, the fair split and generic prompts
(docs/mitigations.md "Screening scores").

    python -m memaudit.screen.bench --work /tmp/sbench [--data DATA --index INDEX]

Positives are the 64x+16x trigger prompts. Negatives: (a) the 1x planted captions, the fair
split by construction (equally specific captions, their image seen once); (b) those 1x
captions none of whose `cfg` images (seeds 0..gen-seeds-1) is a calibrated nL2 copy, the
fair split checked against what the model does; (c) the generic prompts. Per score and seed
count (seeds 0..n-1): AUC and TPR at 1% FPR for each, batched forwards per seed, UNet rows per
prompt, seconds per prompt and its ratio to wen's in the same run. Anisotropy's g2 for the
model is chosen first on tuning seeds 1000.. (disjoint from the evaluation seeds): the value
maximising AUC(b) + AUC(c), ties to the smaller g2. Writes WORK/screen_bench.json and .md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from memaudit.common import UserError

G2_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
POSITIVE = ("64x", "16x")


def prompt_lists(data: Path) -> dict[str, list[str]]:
    out = {g: [s.strip() for s in (data / f"triggers_{g}.txt").read_text().splitlines()
               if s.strip()] for g in ("64x", "16x", "4x", "1x")}
    out["generic"] = [s.strip() for s in (data / "generic.txt").read_text().splitlines()
                      if s.strip()]
    return out


def behaviour_clean(model: Any, crit: Any, prompts: list[str], seeds: int, steps: int
                    ) -> dict[str, float]:
    """Calibrated nL2 copy rate of each prompt's `cfg` images (seeds 0..seeds-1)."""
    from memaudit.guidance import make_guidance
    from memaudit.sampler import sample

    rows = [(p, s) for p in prompts for s in range(seeds)]
    out = sample(model, [p for p, _ in rows], [s for _, s in rows], make_guidance("cfg"),
                 steps=steps)
    cal = np.asarray(crit.score(out.images).is_copy_calibrated, dtype=float)
    return {p: float(cal[i * seeds:(i + 1) * seeds].mean()) for i, p in enumerate(prompts)}


def separation(scores: dict[str, np.ndarray], clean_1x: np.ndarray) -> dict[str, float]:
    from memaudit.screen import auc, tpr_at_fpr

    pos = np.concatenate([scores[g] for g in POSITIVE])
    out = {}
    for key, neg in (("1x", scores["1x"]), ("1x_clean", scores["1x"][clean_1x]),
                     ("generic", scores["generic"])):
        out[f"auc_{key}"] = auc(pos, neg)
        out[f"tpr1_{key}"] = tpr_at_fpr(pos, neg, 0.01)
    return out


def score_all(model: Any, lists: dict[str, list[str]], seeds: list[int], score: str,
              params: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    from memaudit.screen import screen_prompts

    rows0, calls0 = model.unet_rows, getattr(model, "forward_calls", 0)
    n = sum(len(v) for v in lists.values())
    t0 = time.perf_counter()
    scores = {g: screen_prompts(model, ps, seeds=seeds, score=score, params=params,
                                batch_size=len(seeds), progress=False)
              for g, ps in lists.items()}
    cost = {"seconds_per_prompt": (time.perf_counter() - t0) / n,
            "unet_rows_per_prompt": (model.unet_rows - rows0) / n,
            "forwards_per_seed": (getattr(model, "forward_calls", 0) - calls0) / n}
    return scores, cost


def tune_g2(model: Any, lists: dict[str, list[str]], clean_1x: np.ndarray, seeds: list[int]
            ) -> dict[str, Any]:
    """anisotropy = N + g2 A is linear in g2: compute N and A once, pick g2 on the grid."""
    n, _ = score_all(model, lists, seeds, "anisotropy", {"g1": 1.0, "g2": 0.0})
    a, _ = score_all(model, lists, seeds, "anisotropy", {"g1": 0.0, "g2": 1.0})
    grid = []
    for g2 in G2_GRID:
        sep = separation({g: n[g] + g2 * a[g] for g in n}, clean_1x)
        grid.append({"g2": g2, **sep, "objective": sep["auc_1x_clean"] + sep["auc_generic"]})
    best = max(grid, key=lambda r: (round(r["objective"], 12), -r["g2"]))
    return {"seeds": seeds, "grid": grid, "best_g2": best["g2"],
            "mean_A": {g: float(np.mean(v)) for g, v in a.items()},
            "mean_N": {g: float(np.mean(v)) for g, v in n.items()}}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"Screening bench: {res['settings']}", "",
             f"1x captions whose cfg images copy (calibrated nL2, seeds 0-"
             f"{res['settings']['gen_seeds'] - 1}): "
             + (", ".join(f"{p!r} ({100 * r:.0f}%)" for p, r in res["copying_1x"].items())
                or "none"), "",
             "| score | seeds | fwd / seed | UNet rows / prompt | s / prompt (x wen) | "
             "AUC vs 1x | TPR@1% | AUC vs clean 1x | TPR@1% | AUC vs generic | TPR@1% |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['label']} | {r['seeds']} | {r['forwards_per_seed']:.0f} | "
            f"{r['unet_rows_per_prompt']:.0f} | {1000 * r['seconds_per_prompt']:.1f} ms "
            f"({r['ratio_to_wen']:.2f}) | {r['auc_1x']:.3f} | {r['tpr1_1x']:.2f} | "
            f"{r['auc_1x_clean']:.3f} | {r['tpr1_1x_clean']:.2f} | {r['auc_generic']:.3f} | "
            f"{r['tpr1_generic']:.2f} |")
    t = res["tuning"]
    lines += ["", f"anisotropy g2 tuning (seeds {t['seeds'][0]}-{t['seeds'][-1]}; objective "
              "AUC vs clean 1x + AUC vs generic): "
              + ", ".join(f"{r['g2']:g}: {r['auc_1x_clean']:.3f} / {r['auc_generic']:.3f}"
                          for r in t["grid"]) + f" -> g2 = {t['best_g2']:g}",
              "mean N: " + ", ".join(f"{g} {v:.4f}" for g, v in t["mean_N"].items()),
              "mean A: " + ", ".join(f"{g} {v:+.3f}" for g, v in t["mean_A"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from memaudit.guidance.bench import bench_parser, write_result

    ap = bench_parser(__doc__)
    ap.add_argument("--seeds", default="4,2,1", help="Evaluation seed counts (seeds 0..n-1).")
    ap.add_argument("--tune-seeds", type=int, default=4)
    ap.add_argument("--gen-seeds", type=int, default=8, help="cfg seeds for the 1x check.")
    ap.add_argument("--steps", type=int, default=50, help="Steps of those cfg images.")
    args = ap.parse_args(argv)

    from memaudit.guidance.bench import setup

    data, _, model, crit = setup(args.work, args.data, args.index, args.model, args.device)
    lists = prompt_lists(data)
    t_all = time.perf_counter()
    copy_1x = behaviour_clean(model, crit, lists["1x"], args.gen_seeds, args.steps)
    clean_1x = np.array([copy_1x[p] == 0 for p in lists["1x"]])
    tuning = tune_g2(model, lists, clean_1x, list(range(1000, 1000 + args.tune_seeds)))
    configs = [("wen", "wen", {}),
               (f"anisotropy (g2 {tuning['best_g2']:g}, tuned)", "anisotropy",
                {"g2": tuning["best_g2"]}),
               ("anisotropy (g2 2, SD 1.x official)", "anisotropy", {"g2": 2.0}),
               ("attention-entropy (layer 3, official)", "attention-entropy", {"layer": 3}),
               ("attention-entropy (mean of layers)", "attention-entropy", {"layer": -1})]
    rows = []
    for n in [int(v) for v in args.seeds.split(",")]:
        wen_s = None
        for label, score, params in configs:
            try:
                scores, cost = score_all(model, lists, list(range(n)), score, params)
            except UserError as e:  # e.g. a model without that many attention layers
                print(f"{label}: skipped ({e})")
                continue
            wen_s = cost["seconds_per_prompt"] if score == "wen" else wen_s
            rows.append({"label": label, "score": score, "params": params, "seeds": n, **cost,
                         "ratio_to_wen": cost["seconds_per_prompt"] / (wen_s or np.nan),
                         **separation(scores, clean_1x),
                         "mean": {g: float(np.mean(v)) for g, v in scores.items()}})
            print(f"{label} seeds={n}: " + " ".join(
                f"{k}={v:.3f}" for k, v in rows[-1].items() if k.startswith(("auc", "tpr"))),
                flush=True)
    res = {"settings": {"model": args.model, "gen_seeds": args.gen_seeds, "steps": args.steps,
                        "tune_seeds": args.tune_seeds, "prompts": {g: len(v) for g, v in
                                                                   lists.items()}},
           "copying_1x": {p: r for p, r in copy_1x.items() if r > 0},
           "tuning": tuning, "rows": rows, "total_seconds": time.perf_counter() - t_all}
    write_result(args.work, "screen_bench", res, markdown(res))
    return res


if __name__ == "__main__":
    from memaudit.guidance.bench import run_cli

    run_cli(main)
