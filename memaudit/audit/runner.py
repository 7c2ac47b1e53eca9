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
from memaudit.audit.plan import Plan, ScreenSpec, plan_difference
from memaudit.common import UserError, package_versions, progress_bar
from memaudit.generate import save_png
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


# --- what computing a unit needs ------------------------------------------------------------
@dataclass
class UnitContext:
    """The model, criteria and methods of a plan, built once per worker (and on the driver)."""

    comp: Components
    model: Any
    index: Any
    criteria: dict[str, Any]
    methods: dict[str, Any]
    guide_crit_name: str
    steps: int
    scale: float
    scheduler: str
    use_alignment: bool
    out: Path
    neighbour_cache: dict[int, dict[str, Any]]


def build_context(plan: Plan, comp: Components, device: str, index: Any = None) -> UnitContext:
    """Load the model, criteria and methods of a plan (fails early on a bad name)."""
    index = comp.open_index(plan.index) if index is None else index
    model = comp.load_model(plan.model, device)
    criteria = {name: comp.make_criterion(name, index) for name in plan.criteria}
    methods = {spec: comp.make_method(spec, plan.params) for spec in plan.methods}
    steps = plan.steps or getattr(model, "default_steps", 50)
    scale = plan.guidance_scale
    if scale is None:
        scale = getattr(model, "default_guidance_scale", 7.5)
    guide_crit_name = plan.guidance_criterion or plan.criteria[0]
    if guide_crit_name not in criteria:
        criteria[guide_crit_name] = comp.make_criterion(guide_crit_name, index)
    use_alignment = comp.alignment is not None and (
        plan.alignment == "digits"
        or (plan.alignment == "auto" and "canary" in type(model).__name__.lower()))
    return UnitContext(comp, model, index, criteria, methods, guide_crit_name, steps, scale,
                       plan.scheduler, use_alignment, plan.out_dir, {})


@dataclass
class GenerationItem:
    """One unit of work: one method over one batch of (prompt, seed) pairs."""

    unit: str
    method: str
    batch: list[tuple[str, int]]
    prompt_ids: dict[str, int]
    img_dir: str


@dataclass
class ScreenItem:
    unit: str
    spec: ScreenSpec
    texts: list[str]
    labels: dict[str, str | None]


class UnitFactory:
    """The engines' worker factory for audits: `factory(device)` builds a `UnitContext` (one
    model replica) and returns `worker(item) -> result`; the driver commits the results. In
    this process it reuses the driver's context, which is not pickled."""

    def __init__(self, plan: Plan, comp: Components, ctx: UnitContext | None = None):
        self.plan, self.comp, self.ctx = plan, comp, ctx

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "ctx": None}

    def __call__(self, device: str) -> Callable[[Any], dict[str, Any]]:
        ctx = self.ctx or build_context(self.plan, self.comp, device)
        return lambda item: (_compute_screen(ctx, item) if isinstance(item, ScreenItem)
                             else _compute_generation(ctx, item))


# --- the runner ---------------------------------------------------------------------------
def run_audit(plan: Plan, *, new_run: bool = False, device: str | None = None,
              components: Components | None = None,
              log: Callable[[str], None] | None = None, engine: Any = "local",
              address: str | None = None, actors: int | None = None) -> AuditResult:
    """Run (or resume) the audit a plan describes; returns the run id and the DB path.

    `engine` ("local", "ray" or an engine object, see memaudit.engine) decides where the
    units are computed; this process commits each finished unit, in unit order."""
    from memaudit.engine import make_engine

    eng = (make_engine(engine, address, actors, device or plan.device)
           if isinstance(engine, str) else engine)
    try:
        return _run_audit(plan, eng, new_run, components, log)
    finally:
        if isinstance(engine, str):
            eng.close()


def _run_audit(plan: Plan, eng: Any, new_run: bool, components: Components | None,
               log: Callable[[str], None] | None) -> AuditResult:
    t_start = time.perf_counter()
    comp = components or default_components()
    log = log or (lambda s: None)
    local = eng.name == "local"
    device = eng.worker_device()
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    kill_mid = int(os.environ.get(KILL_BEFORE_COMMIT_ENV, "0") or 0)

    # 1. index (built once; the builder writes its manifest last)
    assert plan.index is not None
    if plan.index_build is not None and not (Path(plan.index) / "manifest.json").exists():
        b = dict(plan.index_build)
        log(f"building index {plan.index} from {b['source']} ({b['embedder']})")
        source, embedder, factory = b.pop("source"), b.pop("embedder"), b.pop("factory")
        comp.build_index(source, embedder, plan.index, factory=factory, device=device, **b,
                         **({} if local else {"engine": eng}))
    if not Path(plan.index).exists():
        raise UserError(f"index {plan.index} not found")
    index = comp.open_index(plan.index)
    ihash = index_hash(index, plan.index)

    # 2. model, criteria, methods (fail early on a bad name, before any run row); with Ray
    # the driver's copy (names, hashes, thresholds) stays on CPU, the actors load their own
    ctx = build_context(plan, comp, device if local else "cpu", index)
    model, criteria, steps, scale = ctx.model, ctx.criteria, ctx.steps, ctx.scale
    guide_crit_name = ctx.guide_crit_name

    # 3. prompts
    records: list[tuple[str, str, str | None]] = []  # (text, source, label)
    for pl in plan.prompts:
        for r in comp.read_prompts(pl.file):
            records.append((r.text, Path(pl.file).name, pl.label or r.label))
    if not records:
        raise UserError("plan: the prompt lists hold no prompts")

    store = AuditStore(plan.db_path)
    try:
        latest = store.latest_run()
        if latest is not None and not new_run:
            old = json.loads(latest["plan_json"])
            old.pop("device", None)
            diffs = plan_difference(old, plan.comparable())
            if diffs:
                raise UserError(
                    f"the plan differs from run {latest['id']} in {plan.db_path} "
                    f"({'; '.join(diffs)}); use --new-run to start a new run")
            mh = getattr(model, "model_hash", None)
            if latest["model_hash"] and mh and latest["model_hash"] != mh:
                raise UserError(f"model weights changed since run {latest['id']} "
                                f"({latest['model_hash'][:12]} -> {mh[:12]}); use --new-run")
            if latest["index_hash"] and ihash and latest["index_hash"] != ihash:
                raise UserError(f"index changed since run {latest['id']}; use --new-run")
            run_id = int(latest["id"])
            log(f"resuming run {run_id}")
        settings = {"steps": steps, "guidance_scale": scale, "scheduler": plan.scheduler,
                    "criteria": {n: {"threshold": getattr(c, "threshold", None),
                                     "calibrated_threshold":
                                         getattr(c, "calibrated_threshold", None)}
                                 for n, c in criteria.items()},
                    "guidance_criterion": guide_crit_name,
                    "index_manifest": getattr(index, "manifest", None),
                    "engine": eng.describe()}
        with store.transaction():
            if latest is None or new_run:
                run_id = store.add_run(
                    model=getattr(model, "name", plan.model),
                    model_hash=getattr(model, "model_hash", None), index_path=plan.index,
                    index_hash=ihash, plan=plan.to_dict(), plan_hash=plan.hash(),
                    settings=json.loads(json.dumps(settings, default=str)),
                    versions=package_versions(), device=device, seeds=plan.seeds)
                log(f"started run {run_id}")
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
        if plan.screen is not None:
            units.append(("screen|0", "", -1))
        todo = [u for u in units if u[0] not in done]
        labels = {t: lab for t, _, lab in records}
        items = [ScreenItem(unit, plan.screen, texts, labels) if unit.startswith("screen")
                 else GenerationItem(unit, method, batches[bi],
                                     {t: prompt_ids[t] for t, _ in batches[bi]},
                                     f"images/run{run_id}")
                 for unit, method, bi in todo]
        n_committed = 0
        work = UnitFactory(plan, comp, ctx if local else None)
        with progress_bar("audit", total=len(todo), unit="units") as advance:
            for item, result in zip(items, eng.map(work, items), strict=True):
                if kill_mid and n_committed + 1 >= kill_mid:
                    os._exit(4)  # test hook: the unit's images are written, its rows not
                with store.transaction():
                    if isinstance(item, ScreenItem):
                        _commit_screen(store, run_id, item, result, prompt_ids)
                    else:
                        _commit_generation(store, run_id, item, result)
                    store.mark_unit(run_id, item.unit)
                n_committed += 1
                advance(1)
                if kill_after and n_committed >= kill_after:
                    os._exit(3)
        with store.transaction():
            store.finish_run(run_id)
    finally:
        store.close()
    return AuditResult(run_id=run_id, db_path=plan.db_path, units_done=len(todo),
                       units_skipped=len(units) - len(todo),
                       seconds=time.perf_counter() - t_start)


def _compute_generation(ctx: UnitContext, item: GenerationItem) -> dict[str, Any]:
    """Generate one batch with one method, write its images, score them (METHODS 1, 3)."""
    comp, batch = ctx.comp, item.batch
    guidance = ctx.methods[item.method]
    guide_crit = ctx.criteria[ctx.guide_crit_name]
    prompts = [t for t, _ in batch]
    seeds = [s for _, s in batch]
    res = comp.sample(ctx.model, prompts, seeds, guidance, steps=ctx.steps,
                      guidance_scale=ctx.scale, scheduler=ctx.scheduler,
                      criterion=guide_crit if getattr(guidance, "needs_criterion", False)
                      else None)
    images = res.images
    b = len(prompts)
    paths = []
    for i, (t, s) in enumerate(batch):
        rel = Path(item.img_dir) / _slug(item.method) / f"p{item.prompt_ids[t]}_s{s}.png"
        save_png(images[i], ctx.out / rel)
        paths.append(rel.as_posix())
    scores = {name: c.score(images) for name, c in ctx.criteria.items()}
    crit_info = {name: {"higher": bool(c.higher_is_more_similar),
                        "threshold": getattr(c, "threshold", None),
                        "calibrated_threshold": getattr(c, "calibrated_threshold", None)}
                 for name, c in ctx.criteria.items()}
    neighbours = {name: [_neighbour_info(ctx.index, int(r), ctx.neighbour_cache)
                         for r in sc.neighbour] if sc.neighbour is not None else None
                  for name, sc in scores.items()}
    return {
        "paths": paths, "scores": scores, "criteria": crit_info, "neighbours": neighbours,
        "finals": list(getattr(res, "prompts", None) or prompts),
        "align": (comp.alignment(ctx.model, prompts, images)
                  if ctx.use_alignment and comp.alignment else [None] * b),
        "unet": _per_image(getattr(res, "unet_rows", None), b),
        "wall": float(getattr(res, "wall_seconds", 0.0) or 0.0),  # per image (SampleOutput)
        "trace": list(getattr(res, "trace", None) or []),
        "steps": ctx.steps, "scale": ctx.scale,
    }


def _commit_generation(store: AuditStore, run_id: int, item: GenerationItem,
                       r: dict[str, Any]) -> None:
    """The rows of one computed generation unit (inside the caller's transaction)."""
    gids = []
    for i, (t, s) in enumerate(item.batch):
        gid = store.add_generation(
            run_id=run_id, prompt_id=item.prompt_ids[t], method=item.method, seed=s,
            image_path=r["paths"][i], guidance_scale=r["scale"], steps=r["steps"],
            wall_seconds=r["wall"], unet_calls=r["unet"][i], final_prompt=r["finals"][i],
            alignment=r["align"][i])
        gids.append(gid)
        for name, sc in r["scores"].items():
            crit = r["criteria"][name]
            row = int(sc.neighbour[i]) if sc.neighbour is not None else None
            info = r["neighbours"][name][i] if row is not None else {}
            cal = None if sc.is_copy_calibrated is None else bool(sc.is_copy_calibrated[i])
            store.add_match(
                generation_id=gid, criterion=name, score=float(sc.score[i]),
                higher_is_more_similar=crit["higher"], is_copy=bool(sc.is_copy[i]),
                is_copy_calibrated=cal, threshold=crit["threshold"],
                calibrated_threshold=crit["calibrated_threshold"],
                neighbour_row=row, neighbour_key=_opt_str(info.get("key")),
                neighbour_caption=_opt_str(info.get("caption")),
                dup_count=_opt_int(info.get("group_count", info.get("dup_count"))),
                extra={k: np.asarray(v)[i] for k, v in (sc.extra or {}).items()})
    store.add_steps(gids, r["trace"])


def _compute_screen(ctx: UnitContext, item: ScreenItem) -> dict[str, Any]:
    """Wen et al. screening of every prompt (METHODS 2); threshold fixed or calibrated."""
    spec, comp = item.spec, ctx.comp
    scores = np.asarray(comp.screen_prompts(ctx.model, item.texts, steps=spec.steps,
                                            seeds=spec.seeds), dtype=float).reshape(-1)
    threshold = spec.threshold
    if threshold is None and spec.clean_label:
        clean = np.array([s for t, s in zip(item.texts, scores, strict=True)
                          if item.labels.get(t) == spec.clean_label])
        if clean.size == 0:
            raise UserError(f"plan: [screen] clean_label {spec.clean_label!r} matches no prompt")
        threshold = float(comp.calibrate_threshold(clean, spec.fpr))
    return {"scores": scores, "threshold": threshold}


def _commit_screen(store: AuditStore, run_id: int, item: ScreenItem, r: dict[str, Any],
                   prompt_ids: dict[str, int]) -> None:
    spec, threshold = item.spec, r["threshold"]
    for t, s in zip(item.texts, r["scores"], strict=True):
        store.add_screen(run_id=run_id, prompt_id=prompt_ids[t], score=float(s),
                         steps=spec.steps, seeds=spec.seeds, threshold=threshold,
                         flagged=None if threshold is None else bool(s > threshold))


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _opt_int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None
