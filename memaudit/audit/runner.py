"""The audit runner: resumable units of work committed to the audit database (see
`memaudit.audit`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memaudit.audit.components import Components, default_components
from memaudit.audit.plan import Plan, ScreenSpec, check_plan_outputs, plan_difference
from memaudit.common import UserError, package_versions, progress_bar, resolve_device
from memaudit.generate import save_png
from memaudit.models.resolution import finer_than_model, output_size
from memaudit.store import AuditStore

KILL_ENV = "MEMAUDIT_TEST_KILL_AFTER_UNITS"  # test hook: os._exit after N committed units
KILL_BEFORE_COMMIT_ENV = "MEMAUDIT_TEST_KILL_BEFORE_COMMIT"  # ... or mid-unit (images written)


# --- helpers ----------------------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "m"


def index_hash(index: Any, index_dir: str | None) -> str | None:
    man = getattr(index, "manifest", None) or {}
    for k in ("content_hash", "hash", "sha256"):
        if man.get(k):
            return str(man[k])
    if index_dir and (Path(index_dir) / "manifest.json").exists():
        return hashlib.sha256((Path(index_dir) / "manifest.json").read_bytes()).hexdigest()
    return None


def _neighbour_info(index: Any, row: int, cache: dict[int, dict[str, Any]]) -> dict[str, Any]:
    if row not in cache:
        try:
            item = dict(index.item(int(row)))
        except Exception:  # noqa: BLE001 - an index without the row still records the id
            item = {}
        cache[row] = item
    return cache[row]


def _per_image(value: Any, n: int) -> list[float | None]:
    if value is None:
        return [None] * n
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [None if v is None else float(v) for v in value]
    return [float(value)] * n


@dataclass
class AuditResult:
    run_id: int
    db_path: Path
    units_done: int
    units_skipped: int
    seconds: float


def default_threads() -> int:
    """$OMP_NUM_THREADS when set, else 1.

    One thread is the demo's default because on a small, shared CPU several OpenMP threads
    spin against each other: on this project's 2-core machine, under load, one canary UNet
    forward of 128 rows took 0.17 s with 1 thread and 3.2 s with 2 (docs/benchmarks.md
    "Demo").
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else 1


def set_threads(threads: int) -> int:
    """Set torch's intra-op CPU threads; returns the number in effect."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()


# --- the runner ---------------------------------------------------------------------------
def run_audit(plan: Plan, *, new_run: bool = False, device: str | None = None,
              components: Components | None = None,
              log: Callable[[str], None] | None = None) -> AuditResult:
    """Run (or resume) the audit a plan describes; returns the run id and the DB path.

    Everything that can be checked is checked before the database is written: the plan
    (`plan_from_dict`), the outputs against the inputs, the model, the methods, the index
    and the criteria over it, the prompts. A run an error ends part-way is marked `failed`;
    the same plan resumes it, a changed plan starts a new run beside it (as it does over a
    killed run, still marked `running`). A finished run is only ever extended by the same
    plan, or superseded with `new_run`."""
    t_start = time.perf_counter()
    comp = components or default_components()
    log = log or (lambda s: None)
    device = resolve_device(device or plan.device)
    check_plan_outputs(plan)  # again: files may have moved since the plan was read
    out = plan.out_dir
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    kill_mid = int(os.environ.get(KILL_BEFORE_COMMIT_ENV, "0") or 0)

    # 1. model and methods (the model's output size decides a built pixel index's size)
    model = comp.load_model(plan.model, device)
    methods = {spec: comp.make_method(spec, plan.params) for spec in plan.methods}
    steps = plan.steps if plan.steps is not None else getattr(model, "default_steps", 50)
    scale = plan.guidance_scale
    if scale is None:
        scale = getattr(model, "default_guidance_scale", 7.5)
    n_sched = int(getattr(model, "default_steps", 50))
    if plan.screen is not None and plan.screen.steps > n_sched:
        raise UserError(f"plan: [screen] steps = {plan.screen.steps} exceeds the model's "
                        f"{n_sched}-step schedule")

    # 2. prompts
    records: list[tuple[str, str, str | None]] = []  # (text, source, label)
    for pl in plan.prompts:
        for r in comp.read_prompts(pl.file):
            records.append((r.text, Path(pl.file).name, pl.label or r.label))
    if not records:
        raise UserError("plan: the prompt lists hold no prompts")

    # 3. index (built once; the builder writes its manifest last), criteria over it
    assert plan.index is not None
    size_from_model = None
    if plan.index_build is not None and not (Path(plan.index) / "manifest.json").exists():
        b = dict(plan.index_build)
        source, embedder, factory = b.pop("source"), b.pop("embedder"), b.pop("factory")
        opts = dict(b.pop("embedder_opts", None) or {})
        if embedder == "pixels" and "size" not in opts:
            size_from_model = output_size(model)
            if size_from_model is not None:
                opts["size"] = list(size_from_model)
        log(f"building index {plan.index} from {source} ({embedder}"
            + (f", compared at the model's output size {size_from_model[0]}x"
               f"{size_from_model[1]}" if size_from_model else "") + ")")
        comp.build_index(source, embedder, plan.index, factory=factory, device=device,
                         embedder_opts=opts, **b)
    if not Path(plan.index).exists():
        raise UserError(f"index {plan.index} not found")
    index = comp.open_index(plan.index, **({"weights": plan.weights} if plan.weights else {}))
    warning = finer_than_model(index, model)
    if warning:
        log(f"warning: {warning}")
    ihash = index_hash(index, plan.index)
    criteria = {name: comp.make_criterion(name, index) for name in plan.criteria}
    guide_crit_name = plan.guidance_criterion or plan.criteria[0]
    if guide_crit_name not in criteria:
        criteria[guide_crit_name] = comp.make_criterion(guide_crit_name, index)
    use_alignment = comp.alignment is not None and (
        plan.alignment == "digits"
        or (plan.alignment == "auto" and "canary" in type(model).__name__.lower()))
    quality = (comp.quality(plan.quality, index, model, device, log)
               if plan.quality is not None and comp.quality is not None else None)

    out.mkdir(parents=True, exist_ok=True)
    store = AuditStore(plan.db_path)
    run_id: int | None = None
    try:
        run_id = _start_or_resume(store, plan, model, ihash, new_run, log)
        settings = {"steps": steps, "guidance_scale": scale, "scheduler": plan.scheduler,
                    "criteria": {n: {"threshold": getattr(c, "threshold", None),
                                     "calibrated_threshold":
                                         getattr(c, "calibrated_threshold", None)}
                                 for n, c in criteria.items()},
                    "guidance_criterion": guide_crit_name,
                    "index_size_from_model": size_from_model,
                    "index_manifest": getattr(index, "manifest", None),
                    "quality": quality.settings() if quality else None}
        with store.transaction():
            if run_id is None:
                run_id = store.add_run(
                    model=getattr(model, "name", plan.model),
                    model_hash=getattr(model, "model_hash", None), index_path=plan.index,
                    index_hash=ihash, plan=plan.to_dict(), plan_hash=plan.hash(),
                    settings=json.loads(json.dumps(settings, default=str)),
                    versions=package_versions(), device=device, seeds=plan.seeds)
                log(f"started run {run_id}")
            else:
                store.set_run_status(run_id, "running")
            prompt_ids: dict[str, int] = {}
            for text, source, label in records:
                prompt_ids[text] = store.upsert_prompt(text, source=source, label=label)
        texts = list(dict.fromkeys(t for t, _, _ in records))  # unique, in plan order
        done = store.done_units(run_id)

        # 4. units of work
        pairs = [(t, s) for t in texts for s in plan.seeds]
        batches = [pairs[i:i + plan.batch_size] for i in range(0, len(pairs), plan.batch_size)]
        units: list[tuple[str, str, int]] = [
            (f"gen|{m}|{i}", m, i) for m in plan.methods for i in range(len(batches))]
        if plan.screen is not None:  # first when `auto` decides with it
            autos = [g for g in methods.values() if hasattr(g, "use_screen")]
            units.insert(0 if autos else len(units), ("screen|0", "", -1))
        if quality is not None:  # after every generation unit of the method
            units += [(f"quality|{m}", m, -1) for m in plan.methods]
        todo = [u for u in units if u[0] not in done]
        n_committed = 0
        neighbour_cache: dict[int, dict[str, Any]] = {}
        img_dir = out / "images" / f"run{run_id}"
        with progress_bar("audit", total=len(todo), unit="units") as advance:
            for unit, method, bi in todo:
                if unit.startswith("screen"):
                    _screen_unit(store, comp, model, plan.screen, run_id, texts, records,
                                 prompt_ids, unit, kill_mid and n_committed + 1 >= kill_mid)
                elif unit.startswith("quality"):
                    assert quality is not None
                    quality.unit(store, run_id, method, out, unit)
                else:
                    _bind_screen(store, run_id, plan.screen, methods[method])
                    _generation_unit(
                        store, comp, model, run_id, unit, method, methods[method],
                        batches[bi], prompt_ids, criteria, criteria[guide_crit_name], index,
                        neighbour_cache, img_dir, out, steps, scale, plan.scheduler,
                        use_alignment, kill_mid and n_committed + 1 >= kill_mid, quality)
                n_committed += 1
                advance(1)
                if kill_after and n_committed >= kill_after:
                    os._exit(3)
        with store.transaction():
            store.finish_run(run_id)
    except Exception:  # the run (if it got one) is not silently left "running"
        if run_id is not None:
            _mark_failed(store, run_id, log)
        raise
    finally:
        store.close()
    return AuditResult(run_id=run_id, db_path=plan.db_path, units_done=len(todo),
                       units_skipped=len(units) - len(todo),
                       seconds=time.perf_counter() - t_start)


def _start_or_resume(store: AuditStore, plan: Plan, model: Any, ihash: str | None,
                     new_run: bool, log: Callable[[str], None]) -> int | None:
    """The run to resume, or None to start a new one (see `run_audit`)."""
    latest = store.latest_run()
    if latest is None or new_run:
        return None
    rid, status = int(latest["id"]), str(latest["status"])
    old = json.loads(latest["plan_json"])
    old.pop("device", None)
    diffs = plan_difference(old, plan.comparable())
    why = [f"the plan differs from run {rid} in {plan.db_path} ({'; '.join(diffs)})"
           ] if diffs else []
    mh = getattr(model, "model_hash", None)
    if latest["model_hash"] and mh and latest["model_hash"] != mh:
        why.append(f"model weights changed since run {rid} ({latest['model_hash'][:12]} -> "
                   f"{mh[:12]})")
    if latest["index_hash"] and ihash and latest["index_hash"] != ihash:
        why.append(f"the index changed since run {rid}")
    if not why:
        log(f"resuming run {rid}" + ("" if status == "running" else f" ({status})"))
        return rid
    if status != "finished":
        log(f"{'; '.join(why)}; run {rid} is {status}: starting a new run beside it")
        return None
    raise UserError(f"{'; '.join(why)}; run {rid} is finished: use --new-run to start a new "
                    "run")


def _mark_failed(store: AuditStore, run_id: int, log: Callable[[str], None]) -> None:
    try:
        with store.transaction():
            store.set_run_status(run_id, "failed")
        log(f"run {run_id} marked failed")
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


def _generation_unit(store: AuditStore, comp: Components, model: Any, run_id: int, unit: str,
                     method: str, guidance: Any, batch: list[tuple[str, int]],
                     prompt_ids: dict[str, int], criteria: dict[str, Any], guide_crit: Any,
                     index: Any, neighbour_cache: dict[int, dict[str, Any]], img_dir: Path,
                     out: Path, steps: int, scale: float, scheduler: str, use_alignment: bool,
                     kill_mid: bool, quality: Any = None) -> None:
    """Generate one batch with one method, score it, commit it (METHODS 1, 3)."""
    prompts = [t for t, _ in batch]
    seeds = [s for _, s in batch]
    res = comp.sample(model, prompts, seeds, guidance, steps=steps, guidance_scale=scale,
                      scheduler=scheduler,
                      criterion=guide_crit if getattr(guidance, "needs_criterion", False)
                      or getattr(guidance, "uses_criterion", False) else None)
    images = res.images
    b = len(prompts)
    paths = []
    for i, (t, s) in enumerate(batch):
        rel = Path("images") / img_dir.name / _slug(method) / f"p{prompt_ids[t]}_s{s}.png"
        save_png(images[i], out / rel)
        paths.append(rel.as_posix())
    scores = {name: c.score(images) for name, c in criteria.items()}
    finals = list(getattr(res, "prompts", None) or prompts)
    align = comp.alignment(model, prompts, images) if use_alignment and comp.alignment \
        else [None] * b
    clip = quality.clip_scores(images, prompts) if quality is not None else [None] * b
    unet = _per_image(getattr(res, "unet_rows", None), b)
    wall = float(getattr(res, "wall_seconds", 0.0) or 0.0)  # per image (SampleOutput)
    trace = list(getattr(res, "trace", None) or [])
    if kill_mid:
        os._exit(4)
    with store.transaction():
        gids = []
        for i, (t, s) in enumerate(batch):
            gid = store.add_generation(
                run_id=run_id, prompt_id=prompt_ids[t], method=method, seed=s,
                image_path=paths[i], guidance_scale=scale, steps=steps, wall_seconds=wall,
                unet_calls=unet[i], final_prompt=finals[i], alignment=align[i],
                clip_score=clip[i], extra=_record(guidance, t, s))
            gids.append(gid)
            for name, sc in scores.items():
                crit = criteria[name]
                row = int(sc.neighbour[i]) if sc.neighbour is not None else None
                info = _neighbour_info(index, row, neighbour_cache) if row is not None else {}
                cal = None if sc.is_copy_calibrated is None else bool(sc.is_copy_calibrated[i])
                store.add_match(
                    generation_id=gid, criterion=name, score=float(sc.score[i]),
                    higher_is_more_similar=bool(crit.higher_is_more_similar),
                    is_copy=bool(sc.is_copy[i]), is_copy_calibrated=cal,
                    threshold=getattr(crit, "threshold", None),
                    calibrated_threshold=getattr(crit, "calibrated_threshold", None),
                    neighbour_row=row, neighbour_key=_opt_str(info.get("key")),
                    neighbour_caption=_opt_str(info.get("caption")),
                    dup_count=_opt_int(info.get("group_count", info.get("dup_count"))),
                    extra={k: np.asarray(v)[i] for k, v in (sc.extra or {}).items()})
        store.add_steps(gids, trace)
        store.mark_unit(run_id, unit)


def _screen_unit(store: AuditStore, comp: Components, model: Any, spec: ScreenSpec | None,
                 run_id: int, texts: list[str], records: list[tuple[str, str, str | None]],
                 prompt_ids: dict[str, int], unit: str, kill_mid: bool) -> None:
    """Wen et al. screening of every prompt (METHODS 2); threshold fixed or calibrated."""
    assert spec is not None
    scores = np.asarray(comp.screen_prompts(model, texts, steps=spec.steps, seeds=spec.seeds,
                                            score=spec.score or None,
                                            params=spec.params or None),
                        dtype=float).reshape(-1)
    threshold = spec.threshold
    if threshold is None and spec.clean_label:
        labels = {t: lab for t, _, lab in records}
        clean = np.array([s for t, s in zip(texts, scores, strict=True)
                          if labels.get(t) == spec.clean_label])
        if clean.size == 0:
            raise UserError(f"plan: [screen] clean_label {spec.clean_label!r} matches no prompt")
        threshold = float(comp.calibrate_threshold(clean, spec.fpr))
    if kill_mid:
        os._exit(4)
    with store.transaction():
        for t, s in zip(texts, scores, strict=True):
            store.add_screen(run_id=run_id, prompt_id=prompt_ids[t], score=float(s),
                             steps=spec.steps, seeds=spec.seeds, threshold=threshold,
                             flagged=None if threshold is None else bool(s > threshold))
        store.mark_unit(run_id, unit)


def _bind_screen(store: AuditStore, run_id: int, spec: ScreenSpec | None, guidance: Any) -> None:
    """Hand `auto` the run's screening (scores and threshold from the screening unit)."""
    if spec is None or not hasattr(guidance, "use_screen") or guidance.screen is not None:
        return
    rows = store.query("SELECT p.text AS prompt, s.score, s.threshold FROM screens s "
                       "JOIN prompts p ON p.id = s.prompt_id WHERE s.run_id = ? "
                       "AND s.steps = ? AND s.seeds = ?", [run_id, spec.steps, spec.seeds])
    thr = next((r["threshold"] for r in rows if r["threshold"] is not None), None)
    how = "plan [screen] " + ("threshold" if spec.threshold is not None else
                              f"calibrated on label {spec.clean_label!r} at FPR {spec.fpr:g}")
    guidance.use_screen({r["prompt"]: r["score"] for r in rows}, thr, spec.score or "",
                        spec.seeds, spec.steps, how)


def _record(guidance: Any, prompt: str, seed: int) -> dict[str, Any] | None:
    record = getattr(guidance, "generation_record", None)
    return (record(prompt, seed) or None) if record is not None else None


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _opt_int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None
