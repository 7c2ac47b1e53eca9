"""`generate`: prompts x methods x seeds -> PNG images, generations.parquet, trace.parquet.

The library function behind `memaudit generate` (issue 3). Every image comes from
`memaudit.sampler.sample` (one row per (prompt, seed)); a method is a registered guidance
(METHODS.md section 3) with its parameters.

Output layout in `out_dir`:
  images/{method}/{prompt_id:05d}_{seed}.png
  generations.parquet  one row per image: prompt_id, prompt, final_prompt, label, source, seed,
                       method, params_json, file, wall_seconds, unet_calls, forwards, steps,
                       guidance_scale, scheduler, model, model_hash, model_json (the model's
                       provenance: family, dtype, prediction type, LoRAs with SHA-256, notes),
                       and for methods guided by a copy criterion (amg) guidance_criterion,
                       guidance_index and guidance_index_hash (null otherwise), as the audit
                       database records
  trace.parquet        one row per image and step: file, method, prompt_id, seed, step, t, u,
                       guidance_norm and every trace field of the guidance
Both tables are rewritten (atomically) after every batch, so a killed run started again with
the same arguments skips the images already recorded and does the rest only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memaudit.common import UserError, progress_bar, require_finite
from memaudit.data.prompts import PromptRecord

GEN_COLUMNS = ["prompt_id", "prompt", "final_prompt", "label", "source", "seed", "method",
               "params_json", "file", "wall_seconds", "unet_calls", "forwards", "steps",
               "guidance_scale", "scheduler", "model", "model_hash", "guidance_criterion",
               "guidance_index", "guidance_index_hash", "model_json"]
GEN_SCHEMA = pa.schema([
    ("prompt_id", pa.int64()), ("prompt", pa.string()), ("final_prompt", pa.string()),
    ("label", pa.string()), ("source", pa.string()), ("seed", pa.int64()),
    ("method", pa.string()), ("params_json", pa.string()), ("file", pa.string()),
    ("wall_seconds", pa.float64()), ("unet_calls", pa.float64()), ("forwards", pa.int64()),
    ("steps", pa.int64()), ("guidance_scale", pa.float64()), ("scheduler", pa.string()),
    ("model", pa.string()), ("model_hash", pa.string()), ("guidance_criterion", pa.string()),
    ("guidance_index", pa.string()), ("guidance_index_hash", pa.string()),
    ("model_json", pa.string()),
])
TRACE_FIXED = ["file", "method", "prompt_id", "seed", "step", "t", "u"]


def method_slug(label: str) -> str:
    """A method label as a folder name: `amg:spe,dup` -> `amg_spe_dup`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "method"


def save_png(image: Any, path: Path) -> None:
    """[3, H, W] float in [0, 1] -> 8-bit RGB PNG (round to nearest), written atomically."""
    from PIL import Image

    a = image.detach().float().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    a = np.moveaxis(a, 0, -1) if a.ndim == 3 and a.shape[0] in (1, 3) else a
    a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(a).save(tmp, format="PNG")
    os.replace(tmp, path)


def _resolve_methods(methods: Sequence[str | tuple[str, dict[str, Any]]],
                     params: dict[str, dict[str, Any]] | None) -> list[tuple[str, Any]]:
    """(label, guidance) per method. A method is `(name, {params})` or a spec string
    (`amg:spe,dup`); `params` holds per-method overrides ({"amg": {"c3": 50}}) that the
    method's own dict overrides in turn. A name used twice gets labels name, name-2, ..."""
    from memaudit.guidance import make_guidance
    from memaudit.guidance.spec import parse_method_spec

    if not methods:
        raise UserError("no method given (e.g. cfg)")
    out: list[tuple[str, Any]] = []
    seen: dict[str, int] = {}
    for m in methods:
        if isinstance(m, str):
            label = m.strip()
            name, kw = parse_method_spec(label)
        else:
            name, kw = m[0], dict(m[1] or {})
            label = name
        guidance = make_guidance(name, **{**(params or {}).get(name, {}), **kw})
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}-{seen[label]}"
        out.append((label, guidance))
    return out


def _params_json(name: str, guidance: Any, steps: int, scale: float, scheduler: str) -> str:
    p = asdict(guidance.params) if is_dataclass(guidance.params) else {}
    return json.dumps({"method": name, "params": p, "steps": steps, "guidance_scale": scale,
                       "scheduler": scheduler}, sort_keys=True, default=str)


def guidance_source(criterion: Any) -> dict[str, str | None]:
    """Which criterion and index guide a method (amg): name, index folder, content hash."""
    if criterion is None:
        return {"guidance_criterion": None, "guidance_index": None, "guidance_index_hash": None}
    index = getattr(criterion, "index", None)
    man = getattr(index, "manifest", None) or {}
    path = getattr(index, "path", None)
    return {"guidance_criterion": str(getattr(criterion, "name", type(criterion).__name__)),
            "guidance_index": None if path is None else str(Path(path).resolve()),
            "guidance_index_hash": None if not man.get("content_hash")
            else str(man["content_hash"])}


def _read_earlier(path: Path) -> pa.Table:
    """generations.parquet of an earlier run into this folder (older files lack the
    guidance_* columns: null)."""
    t = pq.read_table(path)
    for f in GEN_SCHEMA:
        if f.name not in t.column_names:
            t = t.append_column(f, pa.nulls(t.num_rows, f.type))
    return t.select([f.name for f in GEN_SCHEMA]).cast(GEN_SCHEMA)


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _scalar(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def _trace_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Per-step rows -> a table; numeric/bool fields become float64, others JSON text."""
    keys: list[str] = list(TRACE_FIXED)
    for r in rows:
        keys += [k for k in r if k not in keys]
    cols: dict[str, pa.Array] = {}
    for k in keys:
        vals = [_scalar(r.get(k)) for r in rows]
        if k in ("file", "method"):
            cols[k] = pa.array(vals, pa.string())
        elif k in ("prompt_id", "seed", "step", "t"):
            cols[k] = pa.array(vals, pa.int64())
        elif all(v is None or isinstance(v, (bool, int, float)) for v in vals):
            cols[k] = pa.array([None if v is None else float(v) for v in vals], pa.float64())
        else:
            cols[k] = pa.array([v if v is None or isinstance(v, str)
                                else json.dumps(v, default=str) for v in vals], pa.string())
    return pa.table(cols)


def _concat_traces(tables: list[pa.Table]) -> pa.Table:
    """Concatenate per-batch trace tables whose columns differ by method (missing -> null)."""
    if not tables:
        return _trace_table([])
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a field numeric in one batch, text in another
        return _trace_table([r for t in tables for r in t.to_pylist()])


def generate(model: Any, prompts: Sequence[PromptRecord | str],
             methods: Sequence[str | tuple[str, dict[str, Any]]], seeds: int | Sequence[int],
             out_dir: str | Path, steps: int | None = None, guidance_scale: float | None = None,
             scheduler: str | None = None, criterion: Any = None, batch_size: int = 8,
             params: dict[str, dict[str, Any]] | None = None) -> pa.Table:
    """Generate every (method, prompt, seed) image into `out_dir` (layout: module docstring).

    model: a Denoiser or a spec for `memaudit.models.load_model` ("canary", a folder, a hub id);
    prompts: PromptRecords (or plain strings); prompt_id is the position in this list;
    methods: (name, params) pairs or spec strings, resolved with memaudit.guidance;
    seeds: N for seeds 0..N-1, or an explicit list; params: per-method overrides by name.
    Returns the generations table (all rows in out_dir, including earlier ones).
    """
    from memaudit.guidance.base import check_supported
    from memaudit.sampler import SCHEDULERS, sample

    if isinstance(model, (str, Path)):
        from memaudit.models import load_model

        model = load_model(model)
    records = [p if isinstance(p, PromptRecord) else PromptRecord(str(p), "<list>", None, i)
               for i, p in enumerate(prompts)]
    if not records:
        raise UserError("no prompts to generate from")
    seed_list = list(range(int(seeds))) if isinstance(seeds, (int, np.integer)) else \
        [int(s) for s in seeds]
    if not seed_list:
        raise UserError("no seeds (give --seeds N with N >= 1)")
    scheduler = scheduler or getattr(model, "default_scheduler", "ddim")
    known = getattr(model, "schedulers", SCHEDULERS)
    if scheduler not in known:
        raise UserError(f"unknown scheduler {scheduler!r} for this model; known: "
                        f"{', '.join(known)}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    steps = int(model.default_steps if steps is None else steps)
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    scale = float(model.default_guidance_scale if guidance_scale is None else guidance_scale)
    resolved = _resolve_methods(methods, params)
    for label, g in resolved:
        check_supported(g, model, label)
        if g.needs_criterion and criterion is None:
            raise UserError(f"method {label!r} needs a copy criterion: give an index")
        if g.needs_criterion and not getattr(criterion, "differentiable", True):
            from memaudit.criteria import check_guiding

            check_guiding(criterion.name, label)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    from memaudit.paths import make_dirs

    make_dirs(out)
    gen_path, trace_path = out / "generations.parquet", out / "trace.parquet"
    gen_tables: list[pa.Table] = []  # earlier rows, then one table per batch
    trace_tables: list[pa.Table] = []
    if gen_path.exists():
        gen_tables.append(_read_earlier(gen_path))
        if trace_path.exists():  # drop rows of a batch killed before its generations write
            import pyarrow.compute as pc

            tr = pq.read_table(trace_path)
            trace_tables.append(tr.filter(pc.is_in(tr["file"], value_set=gen_tables[0]["file"])))
    done = {(r["method"], r["prompt_id"], r["seed"]): r
            for t in gen_tables for r in t.to_pylist()}
    model_hash = str(getattr(model, "model_hash", ""))
    model_json = json.dumps(model.provenance(), sort_keys=True, default=str) \
        if hasattr(model, "provenance") else None

    work: list[tuple[str, Any, str, list[tuple[int, int]]]] = []
    for label, g in resolved:
        pj = _params_json(g.name, g, steps, scale, scheduler)
        gsrc = guidance_source(criterion if g.needs_criterion else None)
        todo = []
        for pid in range(len(records)):
            for s in seed_list:
                prev = done.get((label, pid, s))
                if prev is None:
                    todo.append((pid, s))
                elif prev["params_json"] != pj or prev["model_hash"] != model_hash \
                        or prev["prompt"] != records[pid].text or (
                        g.needs_criterion and prev["guidance_index_hash"] is not None
                        and (prev["guidance_criterion"], prev["guidance_index_hash"])
                        != (gsrc["guidance_criterion"], gsrc["guidance_index_hash"])):
                    raise UserError(f"{out} already holds {label} image {prev['file']} made "
                                    "with other settings, model, prompts or guiding index; "
                                    "use a new --out")
        work.append((label, g, pj, todo))

    total = sum(len(w[3]) for w in work)
    with progress_bar("generate", total=total, unit="images") as advance:
        for label, g, pj, todo in work:
            crit = criterion if g.needs_criterion or g.uses_criterion else None
            gsrc = guidance_source(crit)
            for lo in range(0, len(todo), batch_size):
                batch = todo[lo:lo + batch_size]
                gen_rows: list[dict[str, Any]] = []
                trace_rows: list[dict[str, Any]] = []
                res = sample(model, [records[p].text for p, _ in batch], [s for _, s in batch],
                             g, steps=steps, guidance_scale=scale, scheduler=scheduler,
                             criterion=crit)
                for i, (pid, seed) in enumerate(batch):  # nothing of this batch is written
                    require_finite(res.images[i], f"the {label} generation of prompt "
                                   f"{records[pid].text!r} seed {seed}")
                for i, (pid, seed) in enumerate(batch):
                    rec = records[pid]
                    rel = f"images/{method_slug(label)}/{pid:05d}_{seed}.png"
                    save_png(res.images[i], out / rel)
                    gen_rows.append(dict(
                        prompt_id=pid, prompt=rec.text, final_prompt=res.prompts[i],
                        label=rec.label, source=rec.source, seed=seed, method=label,
                        params_json=pj, file=rel, wall_seconds=res.wall_seconds,
                        unet_calls=res.unet_rows, forwards=res.forwards, steps=steps,
                        guidance_scale=scale, scheduler=scheduler,
                        model=str(getattr(model, "name", "")), model_hash=model_hash,
                        model_json=model_json, **gsrc))
                    for j, step in enumerate(res.trace):
                        row = dict(file=rel, method=label, prompt_id=pid, seed=seed, step=j,
                                   t=step["t"], u=step["u"])
                        for k, v in step.items():
                            if k not in ("t", "u"):
                                row[k] = v[i]
                        trace_rows.append(row)
                gen_tables.append(pa.Table.from_pylist(gen_rows, schema=GEN_SCHEMA))
                trace_tables.append(_trace_table(trace_rows))
                _write_atomic(_concat_traces(trace_tables), trace_path)
                _write_atomic(pa.concat_tables(gen_tables), gen_path)  # last: marks it done
                advance(len(batch))
    gen = pa.concat_tables(gen_tables) if gen_tables else GEN_SCHEMA.empty_table()
    if not gen_path.exists():  # nothing to do and nothing before: still write the tables
        _write_atomic(_concat_traces(trace_tables), trace_path)
        _write_atomic(gen, gen_path)
    return gen
