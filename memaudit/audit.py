"""`memaudit audit PLAN.toml`: one plan file -> generate, detect, screen -> OUT/audit.duckdb.

The plan (TOML; relative paths are relative to the plan file)::

    out = "audit-out"                 # OUT: audit.duckdb and images/ go here
    model = "canary"                  # load_model spec
    index = "indexes/canary-pixels"   # an index folder, or an [index] table to build one:
    # [index]
    # source = "canary-data/train.parquet"; embedder = "pixels"; factory = "Flat"
    # path = "index"                  # where to build it (default OUT/index)
    criteria = ["nl2"]
    methods = ["cfg", "static", "amg:spe,dup"]
    seeds = [0, 1]
    steps = 20                        # default: the model's
    guidance_scale = 2.0              # default: the model's
    scheduler = "ddim"
    batch_size = 16                   # prompts x seeds per unit of work
    alignment = "auto"                # auto | digits | none
    [params.amg]                      # method parameters (or "amg.c3" = 50 under [params])
    c3 = 50
    [[prompts]]
    file = "triggers_64x.txt"
    label = "trigger"                 # optional; overrides labels read from the file
    [screen]                          # optional: pre-generation screening (METHODS 2)
    steps = 1
    seeds = 4
    threshold = 12.0                  # or calibrate from the prompts labelled clean_label:
    clean_label = "generic"
    fpr = 0.01

Resumable (DESIGN.md "The data flow"): the work is cut into units (one method x one batch of
(prompt, seed) pairs, and one screening unit); a unit's images are written first (fixed
names, atomic renames), then all its rows and its `units` row are committed in one
transaction. A rerun skips committed units, so a kill at any point loses or duplicates
nothing. A plan that differs from the run in the database is refused, naming the
difference, unless `new_run=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memaudit.common import (
    UserError,
    package_versions,
    progress_bar,
    read_toml,
    resolve_device,
)
from memaudit.generate import save_png
from memaudit.store import AuditStore

KILL_ENV = "MEMAUDIT_TEST_KILL_AFTER_UNITS"  # test hook: os._exit after N committed units
KILL_BEFORE_COMMIT_ENV = "MEMAUDIT_TEST_KILL_BEFORE_COMMIT"  # ... or mid-unit (images written)

_PLAN_KEYS = {"out", "model", "index", "criteria", "methods", "seeds", "steps",
              "guidance_scale", "scheduler", "batch_size", "alignment", "params", "prompts",
              "screen", "device", "guidance_criterion"}


@dataclass
class PromptList:
    file: str
    label: str | None = None


@dataclass
class ScreenSpec:
    steps: int = 1
    seeds: int = 4
    threshold: float | None = None
    clean_label: str | None = None
    fpr: float = 0.01


@dataclass
class Plan:
    """A parsed, normalised audit plan (paths absolute)."""

    out: str
    model: str
    index: str | None = None
    index_build: dict[str, Any] | None = None
    criteria: list[str] = field(default_factory=lambda: ["nl2"])
    methods: list[str] = field(default_factory=lambda: ["cfg"])
    params: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str = "ddim"
    batch_size: int = 16
    alignment: str = "auto"
    guidance_criterion: str | None = None
    prompts: list[PromptList] = field(default_factory=list)
    screen: ScreenSpec | None = None
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def comparable(self) -> dict[str, Any]:
        """What must match for a run to be resumed (the device may change)."""
        d = self.to_dict()
        d.pop("device", None)
        return d

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.comparable(), sort_keys=True).encode()).hexdigest()

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    @property
    def db_path(self) -> Path:
        return self.out_dir / "audit.duckdb"


def _abs(base: Path, p: str) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


def plan_from_dict(d: dict[str, Any], base: str | Path = ".") -> Plan:
    """Validate a plan dictionary (as read from TOML); `UserError` names what is wrong."""
    base = Path(base)
    unknown = set(d) - _PLAN_KEYS
    if unknown:
        raise UserError(f"plan: unknown key(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(_PLAN_KEYS))}")
    for req in ("out", "model", "prompts"):
        if req not in d:
            raise UserError(f"plan: missing required key {req!r}")
    model = str(d["model"])
    if model != "canary" and (base / model).exists():
        model = _abs(base, model)
    index: str | None = None
    build: dict[str, Any] | None = None
    raw_index = d.get("index")
    if isinstance(raw_index, str):
        index = _abs(base, raw_index)
    elif isinstance(raw_index, dict):
        if "source" not in raw_index:
            raise UserError("plan: [index] needs 'source' (training Parquet) to build an index, "
                            "or give index = \"PATH\" to an existing one")
        build = {"source": _abs(base, str(raw_index["source"])),
                 "embedder": str(raw_index.get("embedder", "pixels")),
                 "factory": str(raw_index.get("factory", "Flat"))}
        for k, v in raw_index.items():
            if k not in ("source", "embedder", "factory", "path"):
                build[k] = v
        index = _abs(base, str(raw_index["path"])) if "path" in raw_index else None
    elif raw_index is not None:
        raise UserError("plan: 'index' must be a path or an [index] table")
    if index is None and build is None:
        raise UserError("plan: give index = \"PATH\" or an [index] table with source/embedder")
    out = _abs(base, str(d["out"]))
    if build is not None and index is None:
        index = str(Path(out) / "index")

    def str_list(key: str, default: list[str]) -> list[str]:
        v = d.get(key, default)
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
            raise UserError(f"plan: {key!r} must be a non-empty list of strings")
        return list(v)

    seeds = d.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UserError("plan: 'seeds' must be a list of integers (or a count)")
    if len(set(seeds)) != len(seeds):
        raise UserError("plan: 'seeds' has duplicates")
    prompts: list[PromptList] = []
    raw_prompts = d["prompts"]
    if isinstance(raw_prompts, str | dict):
        raw_prompts = [raw_prompts]
    for p in raw_prompts:
        if isinstance(p, str):
            p = {"file": p}
        if not isinstance(p, dict) or "file" not in p:
            raise UserError("plan: each [[prompts]] entry needs 'file'")
        f = _abs(base, str(p["file"]))
        if not Path(f).exists():
            raise UserError(f"plan: prompt list {f} not found")
        prompts.append(PromptList(file=f, label=p.get("label")))
    screen = None
    if "screen" in d and d["screen"] is not False:
        s = d["screen"] if isinstance(d["screen"], dict) else {}
        bad = set(s) - {"steps", "seeds", "threshold", "clean_label", "fpr"}
        if bad:
            raise UserError(f"plan: unknown [screen] key(s) {', '.join(sorted(bad))}")
        screen = ScreenSpec(**s)
    methods = str_list("methods", ["cfg"])
    if len(set(methods)) != len(methods):
        raise UserError("plan: 'methods' has duplicates")
    batch = int(d.get("batch_size", 16))
    if batch < 1:
        raise UserError("plan: 'batch_size' must be >= 1")
    alignment = str(d.get("alignment", "auto"))
    if alignment not in ("auto", "digits", "none"):
        raise UserError("plan: 'alignment' must be auto, digits or none")
    params = d.get("params", {})
    if not isinstance(params, dict):
        raise UserError("plan: [params] must be a table of \"method.param\" = value")
    return Plan(
        out=out, model=model, index=index, index_build=build,
        criteria=str_list("criteria", ["nl2"]), methods=methods,
        params=normalise_params(params),
        seeds=list(seeds), steps=d.get("steps"), guidance_scale=d.get("guidance_scale"),
        scheduler=str(d.get("scheduler", "ddim")), batch_size=batch, alignment=alignment,
        guidance_criterion=d.get("guidance_criterion"), prompts=prompts, screen=screen,
        device=d.get("device"),
    )


def load_plan(path: str | Path) -> Plan:
    """Read and validate PLAN.toml."""
    path = Path(path)
    return plan_from_dict(read_toml(path, "plan"), base=path.parent.resolve())


def plan_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of keys whose values differ between two plan dicts."""
    diffs: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += plan_difference(a, b, name + ".")
        elif a != b:
            diffs.append(f"{name}: {json.dumps(a)} -> {json.dumps(b)}")
    return diffs


# --- the pieces the runner orchestrates (other areas' libraries; injectable for tests) -----
@dataclass
class Components:
    """Callables the runner uses; defaults are memaudit's own. Tests may swap one."""

    load_model: Callable[..., Any]
    open_index: Callable[[str], Any]
    build_index: Callable[..., Any]
    make_criterion: Callable[[str, Any], Any]
    make_method: Callable[[str, dict[str, Any]], Any]
    sample: Callable[..., Any]
    read_prompts: Callable[[str], list[Any]]
    screen_prompts: Callable[..., np.ndarray]
    calibrate_threshold: Callable[[np.ndarray, float], float]
    alignment: Callable[[Any, list[str], Any], list[float | None]] | None = None


def make_method(spec: str, params: dict[str, Any]) -> Any:
    """A guidance from a method spec ("amg:spe,dup") and the plan's [params.METHOD] tables."""
    from memaudit.guidance import build_guidance, params_from_table

    return build_guidance(spec, params_from_table(params))


def normalise_params(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"amg.c3": 50}` or `{"amg": {"c3": 50}}` -> `{"amg": {"c3": 50}}`."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.setdefault(k, {}).update(v)
        else:
            method, dot, key = k.rpartition(".")
            if not dot:
                raise UserError(f"plan: [params] key {k!r} must be METHOD.NAME or a "
                                "[params.METHOD] table")
            out.setdefault(method, {})[key] = v
    return out


_CLASSIFIERS: dict[str, Any] = {}


def _digits_alignment(model: Any, prompts: list[str], images: Any) -> list[float | None]:
    """Canary text alignment (METHODS 4): 1 when the digit classifier reads the prompt's
    digit in the image, 0 when not, None for prompts that name no digit."""
    from memaudit.canary.digits import DigitClassifier, digit_of_prompt

    want = [digit_of_prompt(p) for p in prompts]
    if all(w is None for w in want):
        return [None] * len(prompts)
    if "digits" not in _CLASSIFIERS:
        _CLASSIFIERS["digits"] = DigitClassifier()
    got = np.asarray(_CLASSIFIERS["digits"].predict(images)).reshape(-1)
    return [None if w is None else float(int(g) == int(w)) for w, g in zip(want, got,
                                                                            strict=True)]


def default_components() -> Components:
    from memaudit.criteria import make_criterion
    from memaudit.data.prompts import read_prompts
    from memaudit.index import TrainingIndex, build_index
    from memaudit.models import load_model
    from memaudit.sampler import sample
    from memaudit.screen import calibrate_threshold, screen_prompts

    try:  # the canary's digit classifier (text alignment, METHODS 4), when installed
        import memaudit.canary.digits  # noqa: F401

        alignment = _digits_alignment
    except ImportError:
        alignment = None
    return Components(load_model=load_model, open_index=TrainingIndex.open,
                      build_index=build_index, make_criterion=make_criterion,
                      make_method=make_method, sample=sample, read_prompts=read_prompts,
                      screen_prompts=screen_prompts, calibrate_threshold=calibrate_threshold,
                      alignment=alignment)


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
    """Run (or resume) the audit a plan describes; returns the run id and the DB path."""
    t_start = time.perf_counter()
    comp = components or default_components()
    log = log or (lambda s: None)
    device = resolve_device(device or plan.device)
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
        comp.build_index(source, embedder, plan.index, factory=factory, device=device, **b)
    if not Path(plan.index).exists():
        raise UserError(f"index {plan.index} not found")
    index = comp.open_index(plan.index)
    ihash = index_hash(index, plan.index)

    # 2. model, criteria, methods (fail early on a bad name, before any run row)
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
                    "index_manifest": getattr(index, "manifest", None)}
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
        n_committed = 0
        neighbour_cache: dict[int, dict[str, Any]] = {}
        img_dir = out / "images" / f"run{run_id}"
        with progress_bar("audit", total=len(todo), unit="units") as advance:
            for unit, method, bi in todo:
                if unit.startswith("screen"):
                    _screen_unit(store, comp, model, plan.screen, run_id, texts, records,
                                 prompt_ids, unit, kill_mid and n_committed + 1 >= kill_mid)
                else:
                    _generation_unit(
                        store, comp, model, run_id, unit, method, methods[method],
                        batches[bi], prompt_ids, criteria, criteria[guide_crit_name], index,
                        neighbour_cache, img_dir, out, steps, scale, plan.scheduler,
                        use_alignment, kill_mid and n_committed + 1 >= kill_mid)
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


def _generation_unit(store: AuditStore, comp: Components, model: Any, run_id: int, unit: str,
                     method: str, guidance: Any, batch: list[tuple[str, int]],
                     prompt_ids: dict[str, int], criteria: dict[str, Any], guide_crit: Any,
                     index: Any, neighbour_cache: dict[int, dict[str, Any]], img_dir: Path,
                     out: Path, steps: int, scale: float, scheduler: str, use_alignment: bool,
                     kill_mid: bool) -> None:
    """Generate one batch with one method, score it, commit it (METHODS 1, 3)."""
    prompts = [t for t, _ in batch]
    seeds = [s for _, s in batch]
    res = comp.sample(model, prompts, seeds, guidance, steps=steps, guidance_scale=scale,
                      scheduler=scheduler,
                      criterion=guide_crit if getattr(guidance, "needs_criterion", False)
                      else None)
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
                unet_calls=unet[i], final_prompt=finals[i], alignment=align[i])
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
    scores = np.asarray(comp.screen_prompts(model, texts, steps=spec.steps, seeds=spec.seeds),
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


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _opt_int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None
