"""The audit plan: PLAN.toml -> a validated `Plan` (the format is documented in
`memaudit.audit`'s docstring and docs/database.md)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memaudit.audit.quality import QualitySpec, quality_from_plan
from memaudit.common import UserError, check_finite_tree, read_toml, sha256_file

_PLAN_KEYS = {"out", "model", "index", "criteria", "methods", "seeds", "steps",
              "guidance_scale", "scheduler", "batch_size", "alignment", "params", "prompts",
              "screen", "device", "guidance_criterion", "weights", "lora", "dtype", "quality",
              "memory_limit"}
_SCREEN_KEYS = {"steps", "seeds", "threshold", "clean_label", "fpr", "score", "params"}
#: what an audit writes under OUT (besides an index it builds): checked against the inputs
OUT_WRITES = ("audit.duckdb", "audit.duckdb.wal", "images")


@dataclass
class PromptList:
    """One [[prompts]] entry; `sha256` (of the file's bytes) and `rows` (prompts read) are the
    content a run audits, part of its identity (docs/database.md "Resuming")."""

    file: str
    label: str | None = None
    sha256: str | None = None
    rows: int | None = None


@dataclass
class ScreenSpec:
    steps: int = 1
    seeds: int = 4
    threshold: float | None = None
    clean_label: str | None = None
    fpr: float = 0.01
    score: str = ""  # a memaudit.screen score; "" in a plan file = the default score
    params: dict[str, Any] = field(default_factory=dict)  # the score's parameters


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
    scheduler: str | None = None  # None: the model family's default (ddim; euler for SD3/FLUX)
    batch_size: int = 16
    alignment: str = "auto"
    guidance_criterion: str | None = None
    prompts: list[PromptList] = field(default_factory=list)
    screen: ScreenSpec | None = None
    device: str | None = None
    weights: str | None = None  # the embedder weights file the user names (SSCD index)
    quality: QualitySpec | None = field(default_factory=QualitySpec)
    lora: list[str] = field(default_factory=list)  # PATH[:SCALE] (memaudit.models.lora)
    dtype: str | None = None  # fp32 / fp16 / bf16 (default: the family's on CUDA)
    memory_limit: str | None = None  # "4GB": memaudit.engine.memory (not part of the hash)

    def model_options(self) -> dict[str, Any]:
        """load_model keyword arguments beyond (spec, device), only those set."""
        return {k: v for k, v in (("loras", self.lora), ("dtype", self.dtype)) if v}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def comparable(self) -> dict[str, Any]:
        """What must match for a run to be resumed (the device may change)."""
        d = self.to_dict()
        d.pop("device", None)
        d.pop("memory_limit", None)  # where it runs, not what it computes
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


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"plan: {message}")


def _str_list(d: dict[str, Any], key: str, default: list[str]) -> list[str]:
    v = d.get(key, default)
    if isinstance(v, str):
        v = [v]
    _need(isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v),
          f"{key!r} must be a non-empty list of strings")
    _need(len(set(v)) == len(v), f"{key!r} has duplicates")
    return list(v)


def plan_from_dict(d: dict[str, Any], base: str | Path = ".") -> Plan:
    """Validate a whole plan dictionary (as read from TOML) before anything is written:
    types and ranges, files (prompt lists read, index source found), methods and their
    parameters, schedulers, [screen], the criteria an index to build supports, the output
    folder against the inputs. `UserError` names what is wrong."""
    from memaudit.index.recipe import index_options
    from memaudit.models.base import DTYPES
    from memaudit.sampler import SCHEDULERS

    base = Path(base)
    check_finite_tree(d, "plan:")  # every number: no NaN or infinity, whatever the field
    unknown = set(d) - _PLAN_KEYS
    if unknown:
        raise UserError(f"plan: unknown key(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(_PLAN_KEYS))}")
    for req in ("out", "model", "prompts"):
        _need(req in d, f"missing required key {req!r}")
    for key in ("out", "model", "guidance_criterion", "device", "weights"):
        _need(key not in d or (isinstance(d[key], str) and d[key] != ""),
              f"{key!r} must be a non-empty string, got {d.get(key)!r}")
    model = d["model"]
    if model != "canary" and (base / model).exists():
        model = _abs(base, model)
    weights = d.get("weights")
    if weights is not None and "://" not in weights:
        weights = _abs(base, weights)
        _need(Path(weights).is_file(), f"weights file {weights} not found")
    out = _abs(base, d["out"])
    index: str | None = None
    build: dict[str, Any] | None = None
    raw_index = d.get("index")
    if isinstance(raw_index, str) and raw_index:
        index = _abs(base, raw_index)
        _need(Path(index).is_dir(), f"index {index} not found (give an existing index "
              "folder, or an [index] table with source/embedder to build one)")
    elif isinstance(raw_index, dict):
        build = index_options(raw_index, "plan: [index]", base=base, plan=True)
        index = build.pop("out", None) or str(Path(out) / "index")
        if weights is None:
            weights = (build.get("embedder_opts") or {}).get("weights")
    else:
        raise UserError("plan: give index = \"PATH\" or an [index] table with source/embedder")

    seeds = d.get("seeds", [0])
    if _int(seeds):
        _need(seeds >= 1, f"'seeds' as a count must be >= 1, got {seeds}")
        seeds = list(range(seeds))
    _need(isinstance(seeds, list) and bool(seeds) and all(_int(s) and s >= 0 for s in seeds),
          "'seeds' must be a list of integers >= 0 (or a count)")
    _need(len(set(seeds)) == len(seeds), "'seeds' has duplicates")
    steps = d.get("steps")
    _need(steps is None or (_int(steps) and steps >= 1),
          f"'steps' must be an integer >= 1 (omit it for the model's default), got {steps!r}")
    scale = d.get("guidance_scale")
    _need(scale is None or (_num(scale) and scale >= 0),
          f"'guidance_scale' must be a number >= 0, got {scale!r}")
    scheduler = d.get("scheduler")
    _need(scheduler is None or scheduler in SCHEDULERS,
          f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
    dtype = d.get("dtype")
    _need(dtype is None or (isinstance(dtype, str) and dtype.lower() in DTYPES),
          f"unknown dtype {dtype!r}; known: fp32, fp16, bf16")
    lora = _lora_list(d.get("lora", []), base)
    batch = d.get("batch_size", 16)
    _need(_int(batch) and batch >= 1, f"'batch_size' must be an integer >= 1, got {batch!r}")
    alignment = d.get("alignment", "auto")
    _need(alignment in ("auto", "digits", "none"), "'alignment' must be auto, digits or none")

    memory_limit = d.get("memory_limit")
    if memory_limit is not None:
        from memaudit.engine.memory import parse_memory

        parse_memory(memory_limit, "plan: memory_limit")
        memory_limit = str(memory_limit)
    prompts, labels = _prompt_lists(d["prompts"], base)
    screen = _screen(d.get("screen"), labels)
    params = d.get("params", {})
    _need(isinstance(params, dict), "[params] must be a table of \"method.param\" = value")
    params = normalise_params(params)
    _param_paths(params, base)
    methods = _str_list(d, "methods", ["cfg"])
    criteria, guide = _criteria(d, methods, params, build)
    plan = Plan(
        out=out, model=model, index=index, index_build=build, criteria=criteria,
        methods=methods, params=params, seeds=list(seeds), steps=steps,
        guidance_scale=None if scale is None else float(scale), scheduler=scheduler,
        batch_size=batch, alignment=alignment, guidance_criterion=guide, prompts=prompts,
        screen=screen, device=d.get("device"), weights=weights, lora=lora, dtype=dtype,
        memory_limit=memory_limit,
        quality=quality_from_plan(d.get("quality"), base))
    check_plan_outputs(plan)
    return plan


def _lora_list(value: Any, base: Path) -> list[str]:
    """`lora = "x.safetensors:0.8"` or a list of them; paths made absolute and checked."""
    from memaudit.models.lora import parse_lora_spec

    items = [value] if isinstance(value, str) else value
    _need(isinstance(items, list) and all(isinstance(x, str) and x for x in items),
          "'lora' must be a PATH[:SCALE] string or a list of them")
    out = []
    for item in items:
        path, scale = parse_lora_spec(item)
        path = Path(_abs(base, str(path)))
        _need(path.exists(), f"LoRA {path} not found")
        out.append(f"{path}:{scale!r}")
    return out


def _prompt_lists(raw: Any, base: Path) -> tuple[list[PromptList], set[str | None]]:
    """[[prompts]] entries, each file read now (missing, empty, non-UTF-8: one line), and
    the labels their prompts get."""
    from memaudit.data.prompts import read_prompts

    if isinstance(raw, str | dict):
        raw = [raw]
    _need(isinstance(raw, list) and bool(raw), "'prompts' must name at least one prompt list")
    out: list[PromptList] = []
    labels: set[str | None] = set()
    for p in raw:
        if isinstance(p, str):
            p = {"file": p}
        _need(isinstance(p, dict) and isinstance(p.get("file"), str),
              "each [[prompts]] entry needs file = \"PATH\"")
        bad = set(p) - {"file", "label"}
        _need(not bad, f"unknown [[prompts]] key(s) {', '.join(sorted(bad))}")
        label = p.get("label")
        _need(label is None or isinstance(label, str), "a [[prompts]] label must be a string")
        f = _abs(base, p["file"])
        _need(Path(f).exists(), f"prompt list {f} not found")
        digest = sha256_file(f)
        records = read_prompts(f)
        labels |= {label} if label is not None else {r.label for r in records}
        out.append(PromptList(file=f, label=label, sha256=digest, rows=len(records)))
    return out, labels


def _screen(raw: Any, labels: set[str | None]) -> ScreenSpec | None:
    if raw is None or raw is False:
        return None
    s = {} if raw is True else raw
    _need(isinstance(s, dict), "[screen] must be a table (or true)")
    bad = set(s) - _SCREEN_KEYS
    _need(not bad, f"unknown [screen] key(s) {', '.join(sorted(bad))}; known: "
          f"{', '.join(sorted(_SCREEN_KEYS))}")
    for key in ("steps", "seeds"):
        v = s.get(key, 1)
        _need(_int(v) and v >= 1, f"[screen] {key} must be an integer >= 1, got {v!r}")
    thr, fpr, clean = s.get("threshold"), s.get("fpr", 0.01), s.get("clean_label")
    _need(thr is None or _num(thr), f"[screen] threshold must be a number, got {thr!r}")
    _need(_num(fpr) and 0 < fpr < 1, f"[screen] fpr must be in (0, 1), got {fpr!r}")
    _need(clean is None or isinstance(clean, str), "[screen] clean_label must be a string")
    _need(thr is None or clean is None, "[screen]: give threshold or clean_label, not both")
    if clean is not None:
        _need(clean in labels, f"[screen] clean_label {clean!r} matches no prompt label "
              f"(labels: {', '.join(sorted(str(x) for x in labels)) or 'none'})")
    from memaudit.screen import DEFAULT_SCORE, make_score

    score, sparams = s.get("score") or DEFAULT_SCORE, s.get("params", {})
    _need(isinstance(score, str), f"[screen] score must be a name, got {score!r}")
    _need(isinstance(sparams, dict), "[screen] params must be a table of NAME = VALUE")
    make_score(score, **sparams)  # unknown score / parameter: one line
    return ScreenSpec(steps=s.get("steps", 1), seeds=s.get("seeds", 4),
                      threshold=None if thr is None else float(thr), clean_label=clean,
                      fpr=float(fpr), score=score, params=dict(sparams))


def _criteria(d: dict[str, Any], methods: list[str], params: dict[str, dict[str, Any]],
              build: dict[str, Any] | None) -> tuple[list[str], str | None]:
    """Criterion names (canonical), the methods and their parameters built once, and the
    criterion that guides methods needing one (AMG: a differentiable one)."""
    from memaudit.audit.components import make_method
    from memaudit.criteria import canonical_name, check_guiding
    from memaudit.criteria.common import SUPPORTED

    names = [canonical_name(c) for c in _str_list(d, "criteria", ["nl2"])]
    _need(len(set(names)) == len(names), "'criteria' names one criterion twice")
    if build is not None:
        ok = SUPPORTED.get(build["embedder"], ())
        for c in names:
            _need(c in ok, f"criterion {c!r} needs another index: the [index] embedder "
                  f"{build['embedder']!r} supports {', '.join(ok)}")
    guidances = [make_method(m, params) for m in methods]  # names, parts, parameter types
    guide = d.get("guidance_criterion")
    if guide is not None:
        guide = canonical_name(guide)
        if build is not None:
            ok = SUPPORTED.get(build["embedder"], ())
            _need(guide in ok, f"guidance_criterion {guide!r} needs another index: the "
                  f"[index] embedder {build['embedder']!r} supports {', '.join(ok)}")
    if any(getattr(g, "needs_criterion", False) for g in guidances):
        needing = next(m for m, g in zip(methods, guidances, strict=True) if g.needs_criterion)
        try:
            check_guiding(guide or names[0], needing)
        except UserError as e:
            hint = "" if guide else " (set guidance_criterion)"
            raise UserError(f"plan: {e}{hint}") from None
    return names, guide


def check_plan_outputs(plan: Plan) -> None:
    """OUT is not an input, not inside an input folder, and what the audit writes there
    (audit.duckdb, images/, a built index) holds no input (memaudit.paths)."""
    from memaudit.data.training_set import open_training_set
    from memaudit.models.lora import parse_lora_spec
    from memaudit.paths import check_output_dir

    inputs: list[str] = [p.file for p in plan.prompts]
    if plan.weights and "://" not in plan.weights:
        inputs.append(plan.weights)
    if Path(plan.model).exists():
        inputs.append(plan.model)
    inputs += [str(parse_lora_spec(x)[0]) for x in plan.lora]  # LoRA files or folders
    q = plan.quality
    inputs += [f for f in ((q.inception, q.clip_pretrained, q.clip_model_config) if q else ())
               if f and Path(f).exists()]  # weights files named in [quality]
    writes = list(OUT_WRITES)
    if plan.index_build is not None:
        b = plan.index_build
        data = open_training_set(b["source"], **{k: v for k, v in b.items() if k != "source"})
        inputs += [str(f) for f in [*data.units(), *data.roots()]]
        if plan.index and Path(plan.index).parent == Path(plan.out):
            writes.append(Path(plan.index).name)
    elif plan.index:
        inputs.append(plan.index)
    check_output_dir(plan.out, inputs, writes=writes, what="audit output folder")


def load_plan(path: str | Path) -> Plan:
    """Read and validate PLAN.toml."""
    path = Path(path)
    return plan_from_dict(read_toml(path, "plan"), base=path.parent.resolve())


def _param_paths(params: dict[str, dict[str, Any]], base: Path) -> None:
    """Method parameters that name a file, relative to the plan like its other paths: AMG's
    `decoder` (a folder beside the plan, or ./, / or ~; anything else stays a hub id)."""
    amg = params.get("amg", {})
    dec = amg.get("decoder")
    if isinstance(dec, str) and dec and (dec.startswith((".", "/", "~")) or (base / dec).exists()):
        amg["decoder"] = _abs(base, dec)


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

