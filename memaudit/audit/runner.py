"""The audit runner: resumable units of work committed to the audit database (see
`memaudit.audit`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memaudit.audit.components import Components, default_components
from memaudit.audit.plan import Plan, check_plan_outputs
from memaudit.audit.resume import start_or_resume
from memaudit.audit.units import (
    GenerationItem,
    ScreenItem,
    UnitFactory,
    build_context,
    commit_generation,
    commit_screen,
    screen_binding,
)
from memaudit.common import UserError, package_versions, progress_bar, sha256_file
from memaudit.guidance.base import check_supported
from memaudit.models.resolution import finer_than_model, output_size
from memaudit.store import AuditStore

KILL_ENV = "MEMAUDIT_TEST_KILL_AFTER_UNITS"  # test hook: os._exit after N committed units
KILL_BEFORE_COMMIT_ENV = "MEMAUDIT_TEST_KILL_BEFORE_COMMIT"  # ... or mid-unit (images written)


# --- helpers ----------------------------------------------------------------------------
def index_hash(index: Any, index_dir: str | None) -> str | None:
    """What the run records as its index's identity (`training_index.index_hash`)."""
    from memaudit.index.training_index import index_hash as _hash

    return _hash(getattr(index, "manifest", None), index_dir)


@dataclass
class AuditResult:
    run_id: int
    db_path: Path
    units_done: int
    units_skipped: int
    seconds: float


def busy_cores(seconds: float = 0.25) -> float | None:
    """CPU cores in use by all processes over the next `seconds`, from /proc/stat (Linux);
    None where it cannot be read."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v[:8]), v[3] + v[4]  # all jiffies (no guest: in user), idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return None if total <= 0 else (1.0 - (idle1 - idle0) / total) * (os.cpu_count() or 1)


def default_threads() -> int:
    """$OMP_NUM_THREADS when set, else the CPU cores left idle (at least 1): those not busy
    over a quarter second (`busy_cores`), else by the 1-minute load average.

    Threads beyond the idle cores spin against the other jobs: on this project's 2-core
    machine, under load, one canary UNet forward of 128 rows took 0.17 s with 1 thread and
    3.2 s with 2; alone, 2 threads ran the demo 1.5x faster than 1 (docs/benchmarks.md "Demo").
    The load average alone lags: right after the test suite it still counted a busy core.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    busy = busy_cores()
    if busy is not None:
        return max(1, min(cores, (os.cpu_count() or 1) - round(busy)))
    try:
        load = int(os.getloadavg()[0])  # a job using one core full-time adds 1.0
    except (AttributeError, OSError):  # neither (Windows): the safe choice
        return 1
    return max(1, cores - load)


def set_threads(threads: int) -> int:
    """Set torch's intra-op CPU threads; returns the number in effect."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()


# --- the runner ---------------------------------------------------------------------------
def run_audit(plan: Plan, *, new_run: bool = False, device: str | None = None,
              components: Components | None = None,
              log: Callable[[str], None] | None = None, engine: Any = "local",
              address: str | None = None, actors: int | None = None) -> AuditResult:
    """Run (or resume) the audit a plan describes; returns the run id and the DB path.

    Everything that can be checked is checked before the database is written: the plan
    (`plan_from_dict`), the outputs against the inputs, the model, the methods, the index
    and the criteria over it, the prompts. A run an error ends part-way is marked `failed`;
    the same plan resumes it, a changed plan starts a new run beside it (as it does over a
    killed run, still marked `running`). A finished run is only ever extended by the same
    plan, or superseded with `new_run`.

    `engine` ("local", "ray" or an engine object, see memaudit.engine) decides where the
    units are computed; this process commits each finished unit, in unit order."""
    from memaudit.engine import make_engine

    check_plan_outputs(plan)  # again: files may have moved since the plan was read
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
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    kill_mid = int(os.environ.get(KILL_BEFORE_COMMIT_ENV, "0") or 0)
    # with Ray the driver's copy (names, hashes, thresholds, quality) stays on the CPU; the
    # actors load their own replicas
    drv = device if local else "cpu"

    # 1. model and methods (the model's output size decides a built pixel index's size)
    model = comp.load_model(plan.model, drv, **plan.model_options())
    methods = {spec: comp.make_method(spec, plan.params) for spec in plan.methods}
    for spec, g in methods.items():
        check_supported(g, model, spec)
    for note in getattr(model, "notes", []):
        log(f"model: {note}")
    n_sched = int(getattr(model, "default_steps", 50))
    if plan.screen is not None and plan.screen.steps > n_sched:
        raise UserError(f"plan: [screen] steps = {plan.screen.steps} exceeds the model's "
                        f"{n_sched}-step schedule")

    # 2. prompts
    records: list[tuple[str, str, str | None]] = []  # (text, source, label)
    targets: dict[str, str] = {}  # text -> the training key it is known to reproduce
    for pl in plan.prompts:  # the content audited is the content the run is keyed by
        digest = sha256_file(pl.file)
        read = comp.read_prompts(pl.file)
        if pl.sha256 is not None and (pl.sha256, pl.rows) != (digest, len(read)):
            raise UserError(f"prompt list {pl.file} changed since the plan was read "
                            f"(sha256 {pl.sha256[:12]} -> {digest[:12]}); start the audit "
                            "again")
        pl.sha256, pl.rows = digest, len(read)
        records += [(r.text, Path(pl.file).name, pl.label or r.label) for r in read]
        targets.update({r.text: r.target_key for r in read if r.target_key})
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
        if plan.memory_limit and "memory_limit" not in b:
            b["memory_limit"] = plan.memory_limit
        comp.build_index(source, embedder, plan.index, factory=factory, device=device,
                         embedder_opts=opts, **b, **({} if local else {"engine": eng}))
    if not Path(plan.index).exists():
        raise UserError(f"index {plan.index} not found")
    index = comp.open_index(plan.index, **({"weights": plan.weights} if plan.weights else {}))
    warning = finer_than_model(index, model)
    if warning:
        log(f"warning: {warning}")
    ihash = index_hash(index, plan.index)
    quality = (comp.quality(plan.quality, index, model, drv, log)
               if plan.quality is not None and comp.quality is not None else None)
    ctx = build_context(plan, comp, drv, model=model, index=index, methods=methods,
                        quality=quality)
    criteria, steps, scale, scheduler = ctx.criteria, ctx.steps, ctx.scale, ctx.scheduler
    guide_crit_name = ctx.guide_crit_name

    out.mkdir(parents=True, exist_ok=True)
    store = AuditStore(plan.db_path)
    if plan.memory_limit:  # the audit database's own cache (DuckDB spills beyond it)
        from memaudit.engine.memory import parse_memory, stage_budgets

        budget = stage_budgets(parse_memory(plan.memory_limit, "memory_limit"))["grouping"]
        store.con.execute(f"SET memory_limit = '{budget}B'")
    run_id: int | None = None
    try:
        run_id = start_or_resume(store, plan, model, ihash, new_run, log)
        settings = {"steps": steps, "guidance_scale": scale, "scheduler": scheduler,
                    "model": model.provenance() if hasattr(model, "provenance") else None,
                    "criteria": {n: {"threshold": getattr(c, "threshold", None),
                                     "calibrated_threshold":
                                         getattr(c, "calibrated_threshold", None)}
                                 for n, c in criteria.items()},
                    "guidance_criterion": guide_crit_name,
                    "index_size_from_model": size_from_model,
                    "index_manifest": getattr(index, "manifest", None),
                    "quality": quality.settings() if quality else None,
                    "engine": eng.describe()}
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
                prompt_ids[text] = store.upsert_prompt(text, source=source, label=label,
                                                       target_key=targets.get(text))
        texts = list(dict.fromkeys(t for t, _, _ in records))  # unique, in plan order
        done = store.done_units(run_id)

        # 4. units of work
        pairs = [(t, s) for t in texts for s in plan.seeds]
        batches = [pairs[i:i + plan.batch_size] for i in range(0, len(pairs), plan.batch_size)]
        units: list[tuple[str, str, int]] = [
            (f"gen|{m}|{i}", m, i) for m in plan.methods for i in range(len(batches))]
        autos = any(hasattr(g, "use_screen") for g in methods.values())
        if plan.screen is not None:  # first when `auto` decides with it
            units.insert(0 if autos else len(units), ("screen|0", "", -1))
        if quality is not None:  # after every generation unit of the method
            units += [(f"quality|{m}", m, -1) for m in plan.methods]
        todo = [u for u in units if u[0] not in done]
        labels = {t: lab for t, _, lab in records}

        def item_of(unit: str, method: str, bi: int, screen: dict[str, Any] | None) -> Any:
            if unit.startswith("screen"):
                return ScreenItem(unit, plan.screen, texts, labels)
            return GenerationItem(unit, method, batches[bi],
                                  {t: prompt_ids[t] for t, _ in batches[bi]},
                                  f"images/run{run_id}", screen,
                                  {t: targets[t] for t, _ in batches[bi] if t in targets})

        # generation and screening on the engine's workers, in phases: the screening unit
        # first when `auto` decides with its scores (committed before any generation unit is
        # handed out), then the rest; quality (reads the committed images back) here, last
        first = [u for u in todo if u[0].startswith("screen")] if autos else []
        rest = [u for u in todo if u not in first and not u[0].startswith("quality")]
        quality_units = [(unit, method) for unit, method, _ in todo
                         if unit.startswith("quality")]
        n_committed = 0
        work = UnitFactory(plan, comp, ctx if local else None)
        with progress_bar("audit", total=len(todo), unit="units") as advance:
            for phase in (first, rest):
                # the committed screening, read once per phase (after the first, with auto)
                screen = screen_binding(store, run_id, plan.screen) if autos else None
                items = [item_of(*u, screen) for u in phase]
                for item, result in zip(items, eng.map(work, items), strict=True):
                    if kill_mid and n_committed + 1 >= kill_mid:
                        os._exit(4)  # test hook: the unit's images are written, its rows not
                    with store.transaction():
                        if isinstance(item, ScreenItem):
                            commit_screen(store, run_id, item, result, prompt_ids)
                        else:
                            commit_generation(store, run_id, item, result)
                        store.mark_unit(run_id, item.unit)
                    n_committed += 1
                    advance(1)
                    if kill_after and n_committed >= kill_after:
                        os._exit(3)
            for unit, method in quality_units:
                assert quality is not None
                quality.unit(store, run_id, method, out, unit)
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


def _mark_failed(store: AuditStore, run_id: int, log: Callable[[str], None]) -> None:
    try:
        with store.transaction():
            store.set_run_status(run_id, "failed")
        log(f"run {run_id} marked failed")
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass
