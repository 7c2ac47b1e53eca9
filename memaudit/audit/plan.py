"""The audit plan: PLAN.toml -> a validated `Plan` (the format is documented in
`memaudit.audit`'s docstring and docs/database.md)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memaudit.common import UserError, read_toml

_PLAN_KEYS = {"out", "model", "index", "criteria", "methods", "seeds", "steps",
              "guidance_scale", "scheduler", "batch_size", "alignment", "params", "prompts",
              "screen", "device", "guidance_criterion", "lora", "dtype"}



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
    scheduler: str | None = None  # None: the model family's default (ddim; euler for SD3/FLUX)
    batch_size: int = 16
    alignment: str = "auto"
    guidance_criterion: str | None = None
    prompts: list[PromptList] = field(default_factory=list)
    screen: ScreenSpec | None = None
    device: str | None = None
    lora: list[str] = field(default_factory=list)  # PATH[:SCALE] (memaudit.models.lora)
    dtype: str | None = None  # fp32 / fp16 / bf16 (default: the family's on CUDA)

    def model_options(self) -> dict[str, Any]:
        """load_model keyword arguments beyond (spec, device), only those set."""
        return {k: v for k, v in (("loras", self.lora), ("dtype", self.dtype)) if v}

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
        scheduler=d.get("scheduler"), batch_size=batch, alignment=alignment,
        guidance_criterion=d.get("guidance_criterion"), prompts=prompts, screen=screen,
        device=d.get("device"), lora=_lora_list(d.get("lora", []), base),
        dtype=d.get("dtype"),
    )


def _lora_list(value: Any, base: Path) -> list[str]:
    """`lora = "x.safetensors:0.8"` or a list of them; paths made absolute."""
    from memaudit.models.lora import parse_lora_spec

    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise UserError("plan: 'lora' must be a PATH[:SCALE] string or a list of them")
    out = []
    for item in items:
        path, scale = parse_lora_spec(item)
        out.append(f"{_abs(base, str(path))}:{scale!r}")
    return out


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

