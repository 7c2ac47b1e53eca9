"""The attraction basin on the canary: the evidence of Jain et al. (CVPR 2025) reproduced by one
command (`memaudit canary basin`, issues 8 and 17), written to docs/attraction-basin.md.

1. Magnitude curves (the paper's Figures 2-3): per step, d = ||e_c - e_u||_2 (the noise-
   prediction magnitude on every family, METHODS 0) while sampling with zero guidance (s = 0,
   unconditional trajectory) and unit guidance (s = 1, conditional, no CFG), per prompt group
   (mean and 10-90% spread over prompts x seeds), with the switch step the `dynamic` rule
   picks on the s = 1 curve (`transition.dynamic_update`).
2. Reproduction against the switch point (Figure 4), on the guided group (images reproduced
   only with guidance, measured by `canary evaluate`): the calibration of
   `memaudit.guidance.calibrate` with the generic digit prompts as the clean list: `static`'s
   tau swept from 1 (CFG from the first step) to 0 (never) with s_before 0 and 1, `opposite`'s
   tau, `dynamic`'s min_step; reproduction and digit agreement at each, and the calibrated
   parameters (the latest switch keeping digit agreement >= 0.95 of cfg's).
3. The mitigation table: every method (the transition rules with the paper's defaults and
   with their calibrated parameters) on the same (prompt, seed) rows: reproduction (own
   planted image nearest and nL2 < 1.4) and calibrated copy rate per group, digit agreement,
   wall time and UNet rows per image relative to cfg (wall times interleaved and repeated).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

GROUPS = ("guided", "64x", "16x", "4x", "1x", "generic")
METHODS = ("cfg", "static", "dynamic", "opposite", "opposite-dynamic", "amg", "rna", "gni",
           "wen")
TRANSITION = ("static", "opposite", "dynamic")  # the goal applies to these
TAUS = tuple(round(1.0 - 0.05 * i, 2) for i in range(21))  # 0.05 steps (issue 17)
#: AMG's Gsim strength for the pixel nL2 criterion, tuned on the canary (docs/mitigations.md).
PARAMS = {"amg": {"c3": 3000.0}}


def basin_groups(data_dir: Path) -> dict[str, list[str]]:
    """Prompts per group from prompts.csv; generic = the digit prompts only (the digit
    classifier checks them), one phrasing per digit."""
    from memaudit.canary.digits import digit_of_prompt
    from memaudit.canary.evaluate import read_prompts

    rows = read_prompts(data_dir)
    order = [g for g in GROUPS if g != "generic"] + [lab for _, lab in rows]
    groups = {g: [p for p, lab in rows if lab == g] for g in dict.fromkeys(order)
              if g != "generic"}
    seen: set[int] = set()
    groups["generic"] = []
    for p, lab in rows:
        d = digit_of_prompt(p) if lab == "generic" else None
        if d is not None and d not in seen:
            seen.add(d)
            groups["generic"].append(p)
    return {g: ps for g, ps in groups.items() if ps}


def _rows(groups: dict[str, list[str]], seeds: int) -> tuple[list[str], list[str], list[int]]:
    rows = [(g, p, s) for g, ps in groups.items() for p in ps for s in range(seeds)]
    return [p for _, p, _ in rows], [g for g, _, _ in rows], [s for _, _, s in rows]


def switch_steps(d: np.ndarray, u: list[float], min_step: int, force_u: float,
                 force_level: float | None = None) -> np.ndarray:
    """The `dynamic` rule's switch step of each row of d [B, steps] (its own code path:
    memaudit.guidance.transition.dynamic_update fed with these magnitudes), forced at
    u <= force_level (default force_u: eps families; a flow model's is its sigma with SD's SNR
    at force_u, METHODS 0)."""
    import torch

    from memaudit.guidance.transition import dynamic_update

    level = force_u if force_level is None else force_level
    memory: dict[str, Any] = {}
    dt = torch.as_tensor(d, dtype=torch.float32)
    sw = torch.full((dt.shape[0],), -1, dtype=torch.long)
    for j in range(dt.shape[1]):
        sw = dynamic_update(memory, j, dt[:, j], min_step, float(u[j]) <= level)
    return sw.numpy()


def magnitude_curves(model, groups: dict[str, list[str]], seeds: int, steps: int | None,
                     batch_size: int = 256) -> dict[str, Any]:
    """d per step while sampling with s = 0 and s = 1; the dynamic rule's switch steps on
    the s = 1 curves."""
    import torch

    from memaudit.guidance import make_guidance
    from memaudit.guidance.dynamic import Dynamic
    from memaudit.sampler import sample

    prompts, labels, rseeds = _rows(groups, seeds)
    out: dict[str, Any] = {"labels": labels}
    for scale in (0.0, 1.0):
        curves = []
        for lo in range(0, len(prompts), batch_size):
            d_steps: list[torch.Tensor] = []

            def record(j, state, eps_hat, d_steps=d_steps):
                d_steps.append(state.magnitude())  # noise-prediction magnitude (METHODS 0)

            res = sample(model, prompts[lo:lo + batch_size], rseeds[lo:lo + batch_size],
                         make_guidance("cfg"), steps=steps, guidance_scale=scale,
                         callback=record)
            curves.append(torch.stack(d_steps, 1).numpy())
            out["u"] = [rec["u"] for rec in res.trace]
        out[f"d_s{scale:g}"] = np.concatenate(curves)
    p = Dynamic.Params()
    out["switch"] = switch_steps(out["d_s1"], out["u"], p.min_step, p.force_u,
                                 model.prediction.switch_level(p.force_u))
    return out


def _score(model, crit, planted, digits, groups, seeds, spec: str, params: dict,
           steps: int | None, batch_size: int, **fields) -> tuple[list[dict], Any]:
    import torch

    from memaudit.canary.evaluate import score_rows
    from memaudit.guidance import build_guidance
    from memaudit.sampler import sample

    prompts, labels, rseeds = _rows(groups, seeds)
    g = build_guidance(spec, params)
    imgs, traces, rows0, t0 = [], [], model.unet_rows, time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        res = sample(model, prompts[lo:lo + batch_size], rseeds[lo:lo + batch_size], g,
                     steps=steps, criterion=crit if g.needs_criterion else None)
        imgs.append(res.images)
        traces.append(res.trace)
    cost = {"wall_per_image": (time.perf_counter() - t0) / len(prompts),
            "unet_rows": (model.unet_rows - rows0) / len(prompts)}
    recs = score_rows(torch.cat(imgs), prompts, labels, rseeds, crit, planted, digits,
                      **fields)
    return recs, (cost, traces)


def _rates(recs: list[dict]) -> dict[str, dict]:
    from memaudit.canary.evaluate import group_rates

    return {g: group_rates([r for r in recs if r["label"] == g], g)
            for g in dict.fromkeys(r["label"] for r in recs)}


def calibration(model, crit, planted, digits, groups, seeds: int, steps: int | None,
                taus=TAUS, batch_size: int = 256, log=print):
    """The transition rules calibrated on the guided group (reproduction) against the generic
    digit prompts (digit agreement); None without a guided group."""
    from memaudit.canary.digits import digit_of_prompt
    from memaudit.canary.evaluate import score_rows
    from memaudit.guidance.calibrate import calibrate_transition

    if not groups.get("guided"):
        return None

    def agreement(images, prompts):
        pred = digits.predict(images)
        return [None if digit_of_prompt(p) is None else float(digit_of_prompt(p) == int(d))
                for p, d in zip(prompts, pred, strict=True)]

    def reproduced(images, prompts):
        n = len(prompts)
        return [r["reproduced"] for r in score_rows(images, prompts, ["guided"] * n, [0] * n,
                                                     crit, planted, digits)]

    return calibrate_transition(model, groups["generic"], groups["guided"], agreement,
                                reproduced, methods=TRANSITION, seeds=range(seeds),
                                steps=steps, taus=taus, batch_size=batch_size, progress=log)


def method_rows(methods=METHODS, cal=None, params=PARAMS) -> list[tuple[str, str, dict]]:
    """(label, spec, params) of the table's rows: each method with memaudit's defaults, then
    each calibrated transition rule as "RULE (calibrated)"."""
    rows = [(m, m, params) for m in methods]
    for rule, c in (cal.chosen.items() if cal is not None else ()):
        rows.append((f"{rule} (calibrated)", rule, {**params, rule: dict(c.params)}))
    return rows


def timing(model, groups, rows, steps, repeats: int = 3, crit=None) -> dict:
    """Wall time per image of each row (label, spec, params), interleaved and repeated
    (minimum over repeats, the least disturbed on a shared machine), on one prompt per group
    x 2 seeds."""
    from memaudit.guidance import build_guidance
    from memaudit.sampler import sample

    prompts = [ps[0] for ps in groups.values()] * 2
    seeds = [0] * (len(prompts) // 2) + [1] * (len(prompts) // 2)
    best: dict[str, float] = {}
    for _ in range(repeats):
        for label, spec, params in rows:
            g = build_guidance(spec, params)
            t0 = time.perf_counter()
            sample(model, prompts, seeds, g, steps=steps,
                   criterion=crit if g.needs_criterion else None)
            best[label] = min(best.get(label, float("inf")),
                              (time.perf_counter() - t0) / len(prompts))
    return best


def mitigation_table(model, crit, planted, digits, groups, seeds, steps, rows,
                     batch_size: int = 256, log=print) -> list[dict]:
    """Every row (label, spec, params) on the same (prompt, seed) pairs: rates per group,
    cost; switch steps where traced."""
    out = []
    for label, spec, params in rows:
        recs, (cost, traces) = _score(model, crit, planted, digits, groups, seeds, spec,
                                      params, steps, batch_size, method=label)
        row = {"method": label, "spec": spec, "params": params.get(spec, {}),
               "rates": _rates(recs), **cost}
        last = [tr[-1] for tr in traces]
        if all("switch_step" in rec for rec in last):
            sw = np.concatenate([np.asarray(rec["switch_step"], float) for rec in last])
            labels = np.array([r["label"] for r in recs])
            row["switch_step"] = {g: float(np.mean(sw[labels == g])) for g in groups}
        out.append(row)
        log(f"{label}: " + ", ".join(
            f"{g} {r.get('reproduction', r['copy_calibrated']):.0%}"
            for g, r in row["rates"].items()))
    return out


def run_basin(model: str | Path = "canary", out: str | Path = "canary-basin",
              data_dir: str | Path | None = None, index_dir: str | Path | None = None,
              seeds: int = 8, sweep_seeds: int = 4, steps: int | None = None,
              methods=METHODS, taus=TAUS, timing_repeats: int = 3, device: str | None = None,
              doc: str | Path | None = None, img_dir: str | Path | None = None,
              log=print) -> dict[str, Any]:
    """All three parts; writes OUT/basin.json and, when `doc` is given, the generated
    section of that Markdown file and its SVG figures in `img_dir` (basin_doc.write_doc)."""
    from memaudit.canary.digits import DigitClassifier
    from memaudit.canary.evaluate import planted_images, prepare
    from memaudit.common import package_versions

    t0 = time.time()
    out = Path(out)
    if doc is not None:
        from memaudit.canary.basin_doc import check_doc

        check_doc(Path(doc))  # before any work: nothing is left half-done
    m, crit, data_dir, index_dir = prepare(model, out, data_dir, index_dir, device)
    groups = basin_groups(data_dir)
    planted = planted_images(data_dir)
    digits = DigitClassifier(res=m.latent_shape[-1])
    log("magnitude curves (s = 0 and s = 1)")
    mag = magnitude_curves(m, groups, seeds, steps)
    log("calibration of the transition rules on the guided group")
    cal = calibration(m, crit, planted, digits, groups, sweep_seeds, steps, taus, log=log)
    rows = method_rows(methods, cal)
    log("mitigation table")
    table = mitigation_table(m, crit, planted, digits, groups, seeds, steps, rows, log=log)
    walls = timing(m, groups, rows, steps, timing_repeats, crit) if timing_repeats else {}
    result = {
        "model": m.name, "model_hash": m.model_hash, "data_sha256": _data_hash(data_dir),
        "scale": float(m.default_guidance_scale), "steps": steps or m.default_steps,
        "seeds": seeds, "sweep_seeds": sweep_seeds, "groups": groups,
        "calibrated_threshold": float(crit.calibrated_threshold), "params": PARAMS,
        "magnitude": {"u": mag["u"], "labels": mag["labels"],
                      "d_s0": mag["d_s0"].tolist(), "d_s1": mag["d_s1"].tolist(),
                      "switch": mag["switch"].tolist()},
        "calibration": None if cal is None else cal.to_dict(), "methods": table,
        "timing": walls, "seconds": round(time.time() - t0, 1),
        "versions": package_versions(),
    }
    (out / "basin.json").write_text(json.dumps(result, indent=1) + "\n")
    if doc is not None:
        from memaudit.canary.basin_doc import write_doc

        write_doc(result, Path(doc), Path(img_dir) if img_dir else Path(doc).parent / "img")
    return result


def _data_hash(data_dir: Path) -> str | None:
    try:
        return json.loads((data_dir / "data.json").read_text()).get("train_sha256")
    except (OSError, ValueError):
        return None
