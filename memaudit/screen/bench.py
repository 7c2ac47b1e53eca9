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
tuning seeds 1000.. (disjoint from the evaluation seeds; the same prompts, so tuned figures
are optimistic), ranked by AUC(a) + AUC(b), then TPR at 1% FPR vs (c), then the margin
(`rank_key`): anisotropy's t_low (`low_index`) and g2 with g1 = 1 (official weights beside
it), and the weight c of a two-step sum wen + c update-norm. Writes W/screen_bench.json, .md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from memaudit.common import UserError

G2_GRID = (-0.5, -0.2, -0.1, -0.05, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
LOW_GRID = (-2, -3, -5, -10, -15, -20)  # anisotropy's t_low = timesteps[low_index]
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


def rank_key(scores: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """How a tuning candidate ranks: AUC vs clean + AUC vs generic, then TPR at 1% FPR vs
    both, then the margin (10th percentile of the memorized scores minus the largest
    negative, over the spread of all scores), which breaks the ties of saturated AUCs."""
    sep = separation(scores)
    neg = np.concatenate([scores["clean"], scores["generic"]])
    spread = float(np.concatenate([scores["memorized"], neg]).std()) or 1.0
    margin = (float(np.quantile(scores["memorized"], 0.1)) - float(neg.max())) / spread
    return round(objective(sep), 9), round(sep["tpr1_all"], 9), margin


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


def anisotropy_terms(model: Any, lists: dict[str, list[str]], seeds: list[int]
                     ) -> dict[Any, dict[str, np.ndarray]]:
    """N, and A at every low index of LOW_GRID, per list (each a score of its own)."""
    out: dict[Any, dict[str, np.ndarray]] = {
        "N": score_all(model, lists, seeds, "anisotropy", 1, {"g1": 1.0, "g2": 0.0})[0]}
    for li in LOW_GRID:
        out[li] = score_all(model, lists, seeds, "anisotropy", 1,
                            {"g1": 0.0, "g2": 1.0, "low_index": li})[0]
    return out


def pick(terms: dict[Any, dict[str, np.ndarray]], rows: dict[str, np.ndarray] | None = None
         ) -> tuple[tuple[int, float], list[dict[str, Any]]]:
    """The (low_index, g2) of N + g2 A(low_index) ranking first by `rank_key`, on the prompts
    `rows` (index arrays per list; default all), and the grid."""
    sub = {k: {g: v[g] if rows is None else v[g][rows[g]] for g in v} for k, v in terms.items()}
    best, best_key, grid = (LOW_GRID[0], 0.0), None, []
    for li in LOW_GRID:
        for g2 in G2_GRID:
            sc = {g: sub["N"][g] + g2 * sub[li][g] for g in sub["N"]}
            key = rank_key(sc)
            grid.append({"low_index": li, "g2": g2, **separation(sc)})
            if best_key is None or key > best_key:
                best, best_key = (li, g2), key
    return best, grid


def cross_validate(tune_terms: dict, eval_terms: dict, reps: int, seed: int = 0
                   ) -> dict[str, Any]:
    """Prompt-held-out check of the anisotropy tuning: `reps` random halvings of every list;
    (low_index, g2) picked on one half's tuning seeds, scored on the other half's evaluation
    seeds, beside wen's magnitude at x_T (N) on the same half."""
    rng = np.random.default_rng(seed)
    got, base, picks = [], [], []
    for _ in range(reps):
        perm = {g: rng.permutation(len(v)) for g, v in tune_terms["N"].items()}
        for half in (0, 1):
            tr = {g: p[(np.arange(len(p)) % 2) == half] for g, p in perm.items()}
            te = {g: p[(np.arange(len(p)) % 2) != half] for g, p in perm.items()}
            (li, g2), _ = pick(tune_terms, tr)
            picks.append((li, g2))
            n = {g: v[te[g]] for g, v in eval_terms["N"].items()}
            got.append(separation({g: n[g] + g2 * eval_terms[li][g][te[g]] for g in n}))
            base.append(separation(n))
    mean = lambda rs: {k: float(np.nanmean([r[k] for r in rs])) for k in rs[0]}  # noqa: E731
    return {"reps": reps, "tuned": mean(got), "wen_1_step": mean(base),
            "picks": [list(p) for p in picks]}


def tune(model: Any, lists: dict[str, list[str]], seeds: list[int]) -> dict[str, Any]:
    """anisotropy = N + g2 A(low_index) and wen2 + c update2 are linear in their weight: each
    term once (per low index), then the grid; candidates rank by `rank_key`."""
    terms = anisotropy_terms(model, lists, seeds)
    (li, g2), grid = pick(terms)
    out: dict[str, Any] = {"seeds": seeds, "terms": terms,
                           "g2": {"grid": grid, "best": g2, "low_index": li}}
    w, _ = score_all(model, lists, seeds, "wen", 2, {})
    u, _ = score_all(model, lists, seeds, "update-norm", 2, {})
    rows, best_key = [], None
    for v in C_GRID:
        sc = {g: w[g] + v * u[g] for g in w}
        key = rank_key(sc)
        rows.append({"c": v, **separation(sc)})
        if best_key is None or key > best_key:
            best_key, out["c"] = key, {"best": v}
    out["c"]["grid"] = rows
    out["mean_N"] = {g: float(np.mean(v)) if v.size else None for g, v in terms["N"].items()}
    out["mean_A"] = {g: float(np.mean(v)) if v.size else None for g, v in terms[-3].items()}
    return out


def configs(model: Any, tuning: dict[str, Any]) -> list[tuple[str, str, int, dict[str, Any]]]:
    """(label, score, steps, params) of every configuration measured."""
    from memaudit.screen import DEFAULT_SCORE

    own = (getattr(model, "screen_params", None) or {}).get("anisotropy", {})
    mark = " (default)"
    rows = [(f"wen, 1 step{mark if DEFAULT_SCORE == 'wen' else ''}", "wen", 1, {}),
            ("wen, 2 steps", "wen", 2, {}), ("wen, 3 steps", "wen", 3, {}),
            ("update-norm, 1 step", "update-norm", 1, {}),
            ("update-norm, 2 steps", "update-norm", 2, {}),
            (f"wen + {tuning['c']['best']:g} update-norm, 2 steps (c tuned)", "wen+update", 2,
             {"c": tuning["c"]["best"]}),
            ("anisotropy (g 1, 2: SD 1.x official)", "anisotropy", 1, {"g1": 1.0, "g2": 2.0}),
            (f"anisotropy (g 1, {tuning['g2']['best']:g}, low_index "
             f"{tuning['g2']['low_index']}: tuned here)", "anisotropy", 1,
             {"g1": 1.0, "g2": tuning["g2"]["best"], "low_index": tuning["g2"]["low_index"]})]
    if own:
        rows.append((f"anisotropy ({', '.join(f'{k} {v:g}' for k, v in own.items())}: the "
                     f"model's screen_params){mark if DEFAULT_SCORE == 'anisotropy' else ''}",
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
    best = [r for r in t["g2"]["grid"] if r["low_index"] == t["g2"]["low_index"]]
    lines += ["", f"anisotropy (g1 = 1) tuned on seeds {t['seeds'][0]}-{t['seeds'][-1]} over "
              f"low_index {', '.join(map(str, LOW_GRID))} x g2 (rank: AUC vs clean + vs "
              f"generic, then TPR@1% vs both, then the margin) -> low_index "
              f"{t['g2']['low_index']}, g2 {t['g2']['best']:g}; at that low_index (AUC vs clean"
              " / vs generic): " + ", ".join(
                  f"{r['g2']:g}: {r['auc_clean']:.3f} / {r['auc_generic']:.3f}" for r in best),
              "", "wen + c update-norm (2 steps), same seeds (AUC vs clean / vs generic): "
              + ", ".join(f"{r['c']:g}: {r['auc_clean']:.3f} / {r['auc_generic']:.3f}"
                          for r in t["c"]["grid"]) + f" -> c {t['c']['best']:g}",
              "", "mean N: " + ", ".join(f"{g} {v:.4f}" for g, v in t["mean_N"].items()
                                         if v is not None),
              "mean A (low_index -3): " + ", ".join(f"{g} {v:+.3f}" for g, v in
                                                    t["mean_A"].items() if v is not None)]
    cv = res.get("cross_validation")
    if cv:
        f = "AUC / TPR@1% vs clean {auc_clean:.3f} / {tpr1_clean:.2f}, vs generic " \
            "{auc_generic:.3f} / {tpr1_generic:.2f}, vs both {auc_all:.3f} / {tpr1_all:.2f}"
        lines += ["", f"Prompt-held-out check ({cv['reps']} random halvings of every list; "
                  "(low_index, g2) picked on one half's tuning seeds, scored on the other "
                  f"half's evaluation seeds 0-{res['settings']['eval_seeds'] - 1}), means: "
                  "tuned anisotropy " + f.format(**cv["tuned"]) + "; wen, 1 step, same halves "
                  + f.format(**cv["wen_1_step"]) + ". Picked low_index: " + ", ".join(
                      str(p[0]) for p in cv["picks"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from memaudit.guidance.bench import bench_parser, write_result
    from memaudit.screen.label import label_prompts, read_labels, summary, write_labels

    ap = bench_parser(__doc__)
    ap.add_argument("--labels", type=Path, help="labels.csv from memaudit.screen.label.")
    ap.add_argument("--label-seeds", type=int, default=4, help="Seeds of the labelling.")
    ap.add_argument("--seeds", default="4,2,1", help="Evaluation seed counts (seeds 0..n-1).")
    ap.add_argument("--tune-seeds", type=int, default=4)
    ap.add_argument("--cv-reps", type=int, default=10,
                    help="Prompt-held-out halvings checking the anisotropy tuning (0: none).")
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
    n_eval = max(int(v) for v in args.seeds.split(","))
    cv = cross_validate(tuning.pop("terms"), anisotropy_terms(model, lists, list(range(n_eval))),
                        args.cv_reps) if args.cv_reps > 0 else None
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
                        "tune_seeds": args.tune_seeds, "eval_seeds": n_eval},
           "tuning": tuning, "cross_validation": cv, "rows": rows,
           "total_seconds": time.perf_counter() - t_all}
    write_result(args.work, "screen_bench", res, markdown(res))
    return res


if __name__ == "__main__":
    from memaudit.guidance.bench import run_cli

    run_cli(main)
