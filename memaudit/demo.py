"""`memaudit demo`: the whole chain on the shipped canary, in a few minutes on a laptop CPU.

canary data (bundled images, planted duplicates at 1, 4, 16, 64 copies) -> pixel index
(with its nL2 calibration) -> audit of the canary's prompts.csv (trigger groups and generic
prompts, each trigger naming its planted image) with `cfg` and the mitigations ->
OUT/audit.duckdb -> OUT/report.html. The plan it runs is written to OUT/plan.toml, so
`memaudit audit OUT/plan.toml` reproduces (or resumes) it. A second `memaudit demo` on the
same folder reuses the data, the index and the finished run.

The data are rebuilt as the canary was trained (its canary.json `data` record), with the
behaviour labels measured for it (a labels.json beside its weights, `canary evaluate`): the
images it reproduces only with guidance form the `guided` column, where the transition rules
(static, dynamic) act; the heavily duplicated images (64x, 16x) are reproduced without
guidance, which only AMG removes. The summary shows each method's reproduction and
calibrated copy rate per group, what each costs, and the digit agreement of generic prompts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memaudit.common import UserError

#: The prompt groups of the canary's prompts.csv, in the summary's column order.
DEMO_GROUPS = ("64x", "16x", "guided", "4x", "1x", "shared", "generic")

#: Methods the demo compares (cfg first: the baseline of the cost ratios). `auto` (screen,
#: then mitigate flagged prompts only) runs only with screening on.
DEMO_METHODS = ("cfg", "static", "dynamic", "amg", "rna", "auto")

#: Sampling settings chosen so that the demo finishes in under 5 minutes on 2 idle CPU cores
#: (measured: docs/benchmarks.md "Demo"; 50 DDIM steps took 13 minutes on one thread).
DEMO_SEEDS = (0, 1, 2)
DEMO_STEPS = 20


def demo_plan(out: Path, data: Path, model: str = "canary", methods=DEMO_METHODS,
              seeds=DEMO_SEEDS, steps: int = DEMO_STEPS, screen: bool = True) -> str:
    """The demo's plan as TOML text (paths absolute)."""
    methods = [m for m in methods if screen or m.split(":")[0] != "auto"]
    lines = [
        "# memaudit demo plan: `memaudit audit plan.toml` reruns (or resumes) it",
        f"out = {json.dumps(str(out))}",
        f"model = {json.dumps(model)}",
        'criteria = ["nl2"]',
        f"methods = {json.dumps(list(methods))}",
        f"seeds = {json.dumps(list(seeds))}",
        f"steps = {int(steps)}",
        "batch_size = 64",
        'alignment = "auto"',
        "",
        "[params.amg]  # Gsim strength tuned on the canary (docs/mitigations.md); default 100",
        "c3 = 3000.0",
        "",
        "[index]",
        f"source = {json.dumps(str(data / 'train.parquet'))}",
        'embedder = "pixels"',
        f"path = {json.dumps(str(out / 'index'))}",
        "",
    ]
    lines += ["[[prompts]]  # labels and target_key (each trigger's planted image) from the file",
              f"file = {json.dumps(str(data / 'prompts.csv'))}", ""]
    if screen:
        lines += ["[screen]", "steps = 1", "seeds = 4", 'clean_label = "generic"',
                  "fpr = 0.01", ""]
        if "auto" in [m.split(":")[0] for m in methods]:
            # auto's own threshold at FPR 5% of the generic prompts: at the table's 1% it
            # misses a third of the triggers (docs/mitigations.md "auto")
            lines += ["[params.auto]", f"calibrate = {json.dumps(str(data / 'generic.txt'))}",
                      "fpr = 0.05", ""]
    return "\n".join(lines)


def summary_rows(db: Path) -> list[dict[str, Any]]:
    """Copy rate (fixed and calibrated nL2) per method and prompt label, plus cost."""
    from memaudit.store import AuditStore

    with AuditStore(db, read_only=True) as s:
        run = s.run()
        return s.query(
            "SELECT g.method, p.label, count(*) AS n, "
            "avg(CASE WHEN m.is_copy THEN 1.0 ELSE 0.0 END) AS fixed, "
            "avg(CASE WHEN m.is_copy_calibrated THEN 1.0 ELSE 0.0 END) AS calibrated, "
            "avg(CASE WHEN m.reproduced THEN 1.0 ELSE 0.0 END) "
            "FILTER (WHERE m.reproduced IS NOT NULL) AS reproduced, "
            "avg(g.alignment) AS alignment, avg(g.unet_calls) AS unet, "
            "avg(g.wall_seconds) AS wall "
            "FROM generations g JOIN prompts p ON p.id = g.prompt_id "
            "JOIN matches m ON m.generation_id = g.id "
            "WHERE g.run_id = ? AND m.criterion = 'nl2' GROUP BY ALL", [run["id"]])


def format_summary(rows: list[dict[str, Any]], methods: list[str]) -> str:
    """A plain-text table per method x prompt label: reproduction (the trigger's own planted
    image nearest and nL2 < 1.4; docs/criteria.md "Reproduction") and copy rate (calibrated
    and fixed nL2); the digit agreement of the generic prompts (alignment), UNet rows and
    seconds per image."""
    labels = [lab for lab in DEMO_GROUPS if any(r["label"] == lab for r in rows)]
    labels += sorted({r["label"] for r in rows if r["label"] not in labels}, key=str)
    cell = {(r["method"], r["label"]): r for r in rows}
    head = (f"{'method':<10}" + "".join(f"{str(lab):>19}" for lab in labels)
            + f"{'digits ok':>10}{'UNet/img':>10}{'s/img':>8}")
    out = ["per prompt group: reproduced / copy rate by nL2, calibrated (fixed)", head,
           "-" * len(head)]
    for m in methods:
        line = f"{m:<10}"
        mine = [r for r in rows if r["method"] == m]
        for lab in labels:
            r = cell.get((m, lab))
            rep = r and r.get("reproduced")
            line += (f"{'-':>19}" if r is None else
                     (f"{100 * rep:>6.0f}% /" if rep is not None else f"{'- /':>8}")
                     + f"{100 * r['calibrated']:>4.0f}% ({100 * r['fixed']:>3.0f}%)")
        al = [(r["alignment"], r["n"]) for r in mine if r["alignment"] is not None]
        n = sum(k for _, k in al)
        line += f"{100 * sum(a * k for a, k in al) / n:>9.0f}%" if n else f"{'-':>10}"
        tot = sum(r["n"] for r in mine)
        unet = sum((r["unet"] or 0) * r["n"] for r in mine) / tot if tot else 0.0
        wall = sum((r["wall"] or 0) * r["n"] for r in mine) / tot if tot else 0.0
        out.append(line + f"{unet:>10.0f}{wall:>8.3f}")
    return "\n".join(out)


def data_mismatch(model: str, data: Path) -> str | None:
    """A warning when the canary model was trained on other data than the demo just built
    (then the trigger captions no longer point at the images the model memorized)."""
    from memaudit.models.canary import SHIPPED_DIR

    folder = SHIPPED_DIR if model == "canary" else Path(model)
    try:
        trained = json.loads((folder / "canary.json").read_text()).get("data_sha256")
        built = json.loads((data / "data.json").read_text()).get("train_sha256")
    except (OSError, json.JSONDecodeError):
        return None
    if trained and built and trained != built:
        return (f"the model was trained on data {trained[:12]}, the demo built {built[:12]}: "
                "copy rates will not match the shipped measurements")
    return None


def run_demo(out: str | Path = "memaudit-demo", *, device: str | None = None,
             model: str = "canary", methods=DEMO_METHODS, seeds=DEMO_SEEDS,
             steps: int = DEMO_STEPS, screen: bool = True, threads: int | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the demo into `out`; returns timings, the summary text and the output paths."""
    from memaudit.audit import default_threads, load_plan, run_audit, set_threads
    from memaudit.canary.data import build_canary_data, model_data_settings
    from memaudit.report import write_report

    log = log or (lambda s: None)
    if model != "canary" and not (Path(model) / "canary.json").is_file():  # before any output
        raise UserError(f"--model {model}: not a canary folder (no canary.json); the demo runs "
                        "'canary' or a folder written by `memaudit canary train`")
    n_threads = set_threads(threads if threads is not None else default_threads())
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    data = out / "data"
    if not (data / "data.json").exists() or not (data / "train.parquet").exists():
        log(f"[1/4] canary data -> {data}")
        build_canary_data(data, **model_data_settings(model))
    times["data"] = time.perf_counter() - t0

    warning = data_mismatch(model, data)
    if warning:
        log(f"warning: {warning}")

    plan_path = out / "plan.toml"
    text = demo_plan(out, data, model=model, methods=methods, seeds=seeds, steps=steps,
                     screen=screen)
    plan_path.write_text(text)
    plan = load_plan(plan_path)
    log("[2/4] index + [3/4] audit (generate, detect, screen) -> "
        f"{plan.db_path}")
    t1 = time.perf_counter()
    try:
        res = run_audit(plan, device=device, log=log)
    except UserError as e:
        if "differs from run" in str(e):
            raise UserError(f"{out} holds a demo run with other settings; use a new --out "
                            "folder") from e
        raise
    times["index_and_audit"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    log(f"[4/4] report -> {out / 'report.html'}")
    report = write_report(res.db_path, out / "report.html", sources=[data / "train.parquet"])
    times["report"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t0
    rows = summary_rows(res.db_path)
    summary = format_summary(rows, list(methods))
    from memaudit.store import AuditStore

    with AuditStore(res.db_path, read_only=True) as st:
        settings = json.loads(st.run()["settings_json"] or "{}")
    summary = (f"{len(seeds)} seeds x {settings.get('steps')} {settings.get('scheduler')} steps, "
               f"guidance scale {settings.get('guidance_scale')}\n" + summary)
    return {"db": res.db_path, "report": report, "plan": plan_path, "times": times,
            "threads": n_threads,
            "rows": rows, "units_done": res.units_done,
            "warning": warning,
            "text": summary + (f"\nwarning: {warning}" if warning else "")
            + f"\n\ntotal {times['total']:.1f} s (index+audit {times['index_and_audit']:.1f} s), "
            f"{n_threads} torch thread{'s' if n_threads > 1 else ''}"}
