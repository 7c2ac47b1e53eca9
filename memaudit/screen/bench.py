"""Screening benchmark on a canary, on prompts labelled by what the model does (issue 19;
docs/mitigations.md "Screening scores").

    python -m memaudit.screen.bench --work W [--model canary|FOLDER] [--data D --index I]
                                    [--labels CSV] [--seeds 4,2,1] [--tune-seeds 4]

Labels: `memaudit.screen.label` (its command; computed into W/labels.csv unless --labels names a
file it wrote). Positives: the `memorized` captions. Negatives: (a) `clean` captions, the
relabelled split (equally specific planted captions whose image the model never reproduces);
(b) the generic prompts; (c) both. For every score configuration and seed count (seeds
0..n-1): AUC and TPR at 1% FPR against each, batched forward passes per seed, UNet rows per
prompt, seconds per prompt and the ratio to wen's in the same run. Weights are chosen first on
tuning seeds 1000.. (disjoint from the evaluation seeds), maximising AUC(a) + AUC(b) (ties to
the first on the grid): anisotropy's g2 with g1 = 1 (official weights beside it), and the
weight c of a two-step sum wen + c update-norm. Writes W/screen_bench.json and .md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from memaudit.common import UserError

G2_GRID = (-2.0, -1.0, -0.5, -0.2, -0.1, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
C_GRID = (-1.0, -0.5, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
SETS = ("clean", "generic", "all")


def prompt_lists(data: Path) -> dict[str, list[str]]:
    """The canary data's trigger lists by duplication group and its generic prompts (the
    auto bench's rows)."""
    out = {g: [s.strip() for s in (data / f"triggers_{g}.txt").read_text().splitlines()
               if s.strip()] for g in ("64x", "16x", "4x", "1x")}
    out["generic"] = [s.strip() for s in (data / "generic.txt").read_text().splitlines()
                      if s.strip()]
    return out


def split(records: list[dict[str, str]]) -> dict[str, list[str]]:
    """memorized / clean / generic prompt lists from labels.csv records."""
    out: dict[str, list[str]] = {"memorized": [], "clean": [], "generic": []}
    for r in records:
        if r["label"] in out:
            out[r["label"]].append(r["prompt"])
    if not out["memorized"]:
        raise UserError("no memorized prompts in the labels: nothing to detect")
    if not out["clean"] and not out["generic"]:
        raise UserError("no clean or generic prompts in the labels")
    return out


def separation(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC and TPR at 1% FPR of memorized against clean, generic and both."""
    from memaudit.screen import auc, tpr_at_fpr

    pos = scores["memorized"]
    negs = {"clean": scores["clean"], "generic": scores["generic"],
            "all": np.concatenate([scores["clean"], scores["generic"]])}
    out: dict[str, float] = {}
    for key, neg in negs.items():
        ok = neg.size > 0
        out[f"auc_{key}"] = auc(pos, neg) if ok else float("nan")
        out[f"tpr1_{key}"] = tpr_at_fpr(pos, neg, 0.01) if ok else float("nan")
    return out


def objective(sep: dict[str, float]) -> float:
    return float(np.nansum([sep["auc_clean"], sep["auc_generic"]]))


def score_all(model: Any, lists: dict[str, list[str]], seeds: list[int], score: str,
              steps: int, params: dict[str, Any]
              ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Scores of every list (one prompt per forward, its seeds batched) and the cost."""
    from memaudit.screen import screen_prompts

    rows0, calls0 = model.unet_rows, getattr(model, "forward_calls", 0)
    n = sum(len(v) for v in lists.values())
    t0 = time.perf_counter()
    scores = {g: screen_prompts(model, ps, steps=steps, seeds=seeds, score=score,
                                params=params, batch_size=len(seeds), progress=False)
              if ps else np.zeros(0) for g, ps in lists.items()}
    cost = {"seconds_per_prompt": (time.perf_counter() - t0) / n,
            "unet_rows_per_prompt": (model.unet_rows - rows0) / n,
            "forwards_per_seed": (getattr(model, "forward_calls", 0) - calls0) / n}
    return scores, cost


def tune(model: Any, lists: dict[str, list[str]], seeds: list[int]) -> dict[str, Any]:
    """anisotropy = N + g2 A and wen2 + c update2 are linear in their weight: each term once,
    then the grid."""
    n, _ = score_all(model, lists, seeds, "anisotropy", 1, {"g1": 1.0, "g2": 0.0})
    a, _ = score_all(model, lists, seeds, "anisotropy", 1, {"g1": 0.0, "g2": 1.0})
    w, _ = score_all(model, lists, seeds, "wen", 2, {})
    u, _ = score_all(model, lists, seeds, "update-norm", 2, {})
    out: dict[str, Any] = {"seeds": seeds}
    for key, grid, base, term in (("g2", G2_GRID, n, a), ("c", C_GRID, w, u)):
        rows = []
        for v in grid:
            sep = separation({g: base[g] + v * term[g] for g in base})
            rows.append({key: v, **sep, "objective": objective(sep)})
        best = max(rows, key=lambda r: round(r["objective"], 12))
        out[key] = {"grid": rows, "best": best[key]}
    out["mean_N"] = {g: float(np.mean(v)) if v.size else None for g, v in n.items()}
    out["mean_A"] = {g: float(np.mean(v)) if v.size else None for g, v in a.items()}
    return out


def configs(model: Any, tuning: dict[str, Any]) -> list[tuple[str, str, int, dict[str, Any]]]:
    """(label, score, steps, params) of every configuration measured."""
    from memaudit.screen import DEFAULT_SCORE

    own = (getattr(model, "screen_params", None) or {}).get("anisotropy", {})
    rows = [(f"wen, 1 step{' (default)' if DEFAULT_SCORE == 'wen' else ''}", "wen", 1, {}),
            ("wen, 2 steps", "wen", 2, {}), ("wen, 3 steps", "wen", 3, {}),
            ("update-norm, 1 step", "update-norm", 1, {}),
            ("update-norm, 2 steps", "update-norm", 2, {}),
            (f"wen + {tuning['c']['best']:g} update-norm, 2 steps (c tuned)", "wen+update", 2,
             {"c": tuning["c"]["best"]}),
            ("anisotropy (g 1, 2: SD 1.x official)", "anisotropy", 1, {"g1": 1.0, "g2": 2.0}),
            (f"anisotropy (g 1, {tuning['g2']['best']:g}: tuned here)", "anisotropy", 1,
             {"g1": 1.0, "g2": tuning["g2"]["best"]})]
    if own:
        rows.append((f"anisotropy (g2 {own.get('g2')}: the model's screen_params)",
                     "anisotropy", 1, {}))
    rows += [("attention-entropy (layer 3, official E)", "attention-entropy", 1,
              {"aggregate": "layer", "layer": 3}),
             ("attention-entropy (all layers, official aggregate)", "attention-entropy", 1,
              {"aggregate": "all"}),
             ("attention-entropy (mean of layers, memaudit's)", "attention-entropy", 1,
              {"aggregate": "mean"})]
    return rows


def measure(model: Any, lists: dict[str, list[str]], seeds: list[int], score: str, steps: int,
            params: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    if score != "wen+update":
        return score_all(model, lists, seeds, score, steps, params)
    w, cw = score_all(model, lists, seeds, "wen", steps, {})
    u, cu = score_all(model, lists, seeds, "update-norm", steps, {})
    # one trajectory gives both (no pass beyond wen's): the cost is wen's
    return {g: w[g] + params["c"] * u[g] for g in w}, cw


def markdown(res: dict[str, Any]) -> str:
    st = res["settings"]
    lines = [f"Screening bench: model {st['model']}; labels {st['labels']} ({st['label_summary']})"
             f"; {st['counts']}", "",
             "| score | seeds | passes / seed | UNet rows / prompt | s / prompt (x wen) | "
             "AUC vs clean | TPR@1% | AUC vs generic | TPR@1% | AUC vs both | TPR@1% |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['label']} | {r['seeds']} | {r['forwards_per_seed']:.0f} | "
            f"{r['unet_rows_per_prompt']:.0f} | {1000 * r['seconds_per_prompt']:.1f} ms "
            f"({r['ratio_to_wen']:.2f}) | {r['auc_clean']:.3f} | {r['tpr1_clean']:.2f} | "
            f"{r['auc_generic']:.3f} | {r['tpr1_generic']:.2f} | {r['auc_all']:.3f} | "
            f"{r['tpr1_all']:.2f} |")
    t = res["tuning"]
    for key, name in (("g2", "anisotropy g2 (g1 = 1)"), ("c", "wen + c update-norm (2 steps)")):
        lines.append("")
        lines.append(f"{name}, tuned on seeds {t['seeds'][0]}-{t['seeds'][-1]} (AUC vs clean / "
                     "vs generic): " + ", ".join(
                         f"{r[key]:g}: {r['auc_clean']:.3f} / {r['auc_generic']:.3f}"
                         for r in t[key]["grid"]) + f" -> {t[key]['best']:g}")
    lines += ["", "mean N: " + ", ".join(f"{g} {v:.4f}" for g, v in t["mean_N"].items()
                                         if v is not None),
              "mean A: " + ", ".join(f"{g} {v:+.3f}" for g, v in t["mean_A"].items()
                                     if v is not None)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from memaudit.guidance.bench import bench_parser, write_result
    from memaudit.screen.label import label_prompts, read_labels, summary, write_labels

    ap = bench_parser(__doc__)
    ap.add_argument("--labels", type=Path, help="labels.csv from memaudit.screen.label.")
    ap.add_argument("--label-seeds", type=int, default=4, help="Seeds of the labelling.")
    ap.add_argument("--seeds", default="4,2,1", help="Evaluation seed counts (seeds 0..n-1).")
    ap.add_argument("--tune-seeds", type=int, default=4)
    args = ap.parse_args(argv)

    from memaudit.canary.evaluate import prepare

    t_all = time.perf_counter()
    model, crit, data, _ = prepare(args.model, args.work, args.data, args.index, args.device)
    if args.labels is None:
        records = label_prompts(model, crit, data, args.label_seeds)
        args.labels = args.work / "labels.csv"
        write_labels(args.labels, records)
    else:
        records = read_labels(args.labels)
    lists = split(records)
    tuning = tune(model, lists, list(range(1000, 1000 + args.tune_seeds)))
    rows = []
    for n in [int(v) for v in args.seeds.split(",")]:
        wen_s = None
        for label, score, steps, params in configs(model, tuning):
            try:
                scores, cost = measure(model, lists, list(range(n)), score, steps, params)
            except UserError as e:  # e.g. a model without that many attention layers
                print(f"{label}: skipped ({e})")
                continue
            if score == "wen" and steps == 1:
                wen_s = cost["seconds_per_prompt"]
            rows.append({"label": label, "score": score, "steps": steps, "params": params,
                         "seeds": n, **cost,
                         "ratio_to_wen": cost["seconds_per_prompt"] / (wen_s or np.nan),
                         **separation(scores),
                         "mean": {g: float(np.mean(v)) if v.size else None
                                  for g, v in scores.items()}})
            print(f"{label} seeds={n}: " + " ".join(
                f"{k}={v:.3f}" for k, v in rows[-1].items() if k.startswith(("auc", "tpr"))),
                flush=True)
    res = {"settings": {"model": args.model, "labels": str(args.labels),
                        "label_summary": summary(records),
                        "counts": ", ".join(f"{len(v)} {k}" for k, v in lists.items()),
                        "tune_seeds": args.tune_seeds},
           "tuning": tuning, "rows": rows, "total_seconds": time.perf_counter() - t_all}
    write_result(args.work, "screen_bench", res, markdown(res))
    return res


if __name__ == "__main__":
    from memaudit.guidance.bench import run_cli

    run_cli(main)
