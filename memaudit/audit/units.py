"""An audit's units of work, computed apart from their commit: what a worker (this process,
or a Ray actor holding its own model replica, memaudit.engine) computes for one unit, and the
rows the runner's single writer then commits for it in one transaction (METHODS 1-3)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memaudit.audit.components import Components
from memaudit.audit.plan import Plan, ScreenSpec
from memaudit.common import UserError, require_finite
from memaudit.criteria.reproduction import reproduced, target_groups
from memaudit.generate import save_png
from memaudit.store import AuditStore


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "m"


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
    clip_scores: Callable[[Any, list[str]], list[float | None]] | None = None


def build_context(plan: Plan, comp: Components, device: str, *, model: Any = None,
                  index: Any = None, methods: dict[str, Any] | None = None,
                  quality: Any = None) -> UnitContext:
    """The model, index, criteria and methods of a plan: what the driver already loaded, the
    rest loaded here (a worker loads its own replica; a bad name fails early)."""
    model = (comp.load_model(plan.model, device, **plan.model_options()) if model is None
             else model)
    if index is None:
        index = comp.open_index(plan.index,
                                **({"weights": plan.weights} if plan.weights else {}))
    if methods is None:
        methods = {spec: comp.make_method(spec, plan.params) for spec in plan.methods}
    criteria = {name: comp.make_criterion(name, index) for name in plan.criteria}
    steps = plan.steps if plan.steps is not None else getattr(model, "default_steps", 50)
    scale = plan.guidance_scale
    if scale is None:
        scale = getattr(model, "default_guidance_scale", 7.5)
    guide_crit_name = plan.guidance_criterion or plan.criteria[0]
    if guide_crit_name not in criteria:
        criteria[guide_crit_name] = comp.make_criterion(guide_crit_name, index)
    use_alignment = comp.alignment is not None and (
        plan.alignment == "digits"
        or (plan.alignment == "auto" and "canary" in type(model).__name__.lower()))
    clip = quality.clip_scores if quality is not None else _worker_clip(plan, comp, device)
    scheduler = plan.scheduler or getattr(model, "default_scheduler", "ddim")
    return UnitContext(comp, model, index, criteria, methods, guide_crit_name, steps, scale,
                       scheduler, use_alignment, plan.out_dir, {}, clip)


def _worker_clip(plan: Plan, comp: Components, device: str):
    """A worker's CLIP scorer for the plan's `[quality]` (the driver keeps KID/FD)."""
    q = plan.quality
    if comp.quality is None or q is None or not q.clip_model:
        return None
    from memaudit.quality.clipscore import ClipScorer

    clip = ClipScorer(q.clip_model, q.clip_pretrained, q.clip_model_config, device=device)
    return lambda images, prompts: [float(v) for v in clip.score(images, prompts)]


@dataclass
class GenerationItem:
    """One unit of work: one method over one batch of (prompt, seed) pairs."""

    unit: str
    method: str
    batch: list[tuple[str, int]]
    prompt_ids: dict[str, int]
    img_dir: str
    screen: dict[str, Any] | None = None  # the run's screening, for `auto` (use_screen kwargs)
    targets: dict[str, str] = field(default_factory=dict)  # prompt -> its known target key


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


def _compute_generation(ctx: UnitContext, item: GenerationItem) -> dict[str, Any]:
    """Generate one batch with one method, write its images, score them (METHODS 1, 3)."""
    comp, batch = ctx.comp, item.batch
    guidance = ctx.methods[item.method]
    guide_crit = ctx.criteria[ctx.guide_crit_name]
    if item.screen is not None and hasattr(guidance, "use_screen") and guidance.screen is None:
        guidance.use_screen(**item.screen)
    prompts = [t for t, _ in batch]
    seeds = [s for _, s in batch]
    res = comp.sample(ctx.model, prompts, seeds, guidance, steps=ctx.steps,
                      guidance_scale=ctx.scale, scheduler=ctx.scheduler,
                      criterion=guide_crit if getattr(guidance, "needs_criterion", False)
                      or getattr(guidance, "uses_criterion", False) else None)
    images = res.images
    b = len(prompts)
    for i, (t, s) in enumerate(batch):  # an error of this unit: never written, never scored
        require_finite(images[i], f"unit {item.unit}: the {item.method} generation of prompt "
                       f"{t!r} seed {s}")
    paths = []
    for i, (t, s) in enumerate(batch):
        rel = Path(item.img_dir) / _slug(item.method) / f"p{item.prompt_ids[t]}_s{s}.png"
        save_png(images[i], ctx.out / rel)
        paths.append(rel.as_posix())
    scores = {name: c.score(images) for name, c in ctx.criteria.items()}
    groups = target_groups(ctx.index, [item.targets.get(t) for t in prompts]) \
        if item.targets else None
    repro = {name: (reproduced(ctx.index, sc, groups) if groups is not None
                    and sc.neighbour is not None else [None] * b)
             for name, sc in scores.items()}
    crit_info = {name: {"higher": bool(c.higher_is_more_similar),
                        "threshold": getattr(c, "threshold", None),
                        "calibrated_threshold": getattr(c, "calibrated_threshold", None)}
                 for name, c in ctx.criteria.items()}
    neighbours = {name: [_neighbour_info(ctx.index, int(r), ctx.neighbour_cache)
                         for r in sc.neighbour] if sc.neighbour is not None else None
                  for name, sc in scores.items()}
    return {
        "paths": paths, "scores": scores, "criteria": crit_info, "neighbours": neighbours,
        "reproduced": repro,
        "finals": list(getattr(res, "prompts", None) or prompts),
        "align": (comp.alignment(ctx.model, prompts, images)
                  if ctx.use_alignment and comp.alignment else [None] * b),
        "clip": ctx.clip_scores(images, prompts) if ctx.clip_scores else [None] * b,
        "unet": _per_image(getattr(res, "unet_rows", None), b),
        "wall": float(getattr(res, "wall_seconds", 0.0) or 0.0),  # per image (SampleOutput)
        "trace": list(getattr(res, "trace", None) or []),
        "steps": ctx.steps, "scale": ctx.scale,
        "extra": [_record(guidance, t, s) for t, s in batch],
    }


def commit_generation(store: AuditStore, run_id: int, item: GenerationItem,
                       r: dict[str, Any]) -> None:
    """The rows of one computed generation unit (inside the caller's transaction)."""
    gids = []
    for i, (t, s) in enumerate(item.batch):
        gid = store.add_generation(
            run_id=run_id, prompt_id=item.prompt_ids[t], method=item.method, seed=s,
            image_path=r["paths"][i], guidance_scale=r["scale"], steps=r["steps"],
            wall_seconds=r["wall"], unet_calls=r["unet"][i], final_prompt=r["finals"][i],
            alignment=r["align"][i], clip_score=r["clip"][i], extra=r["extra"][i])
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
                extra={k: np.asarray(v)[i] for k, v in (sc.extra or {}).items()},
                reproduced=r.get("reproduced", {}).get(name, [None] * len(item.batch))[i])
    store.add_steps(gids, r["trace"])


def _compute_screen(ctx: UnitContext, item: ScreenItem) -> dict[str, Any]:
    """Screening of every prompt by the plan's score (METHODS 2, 2.1); threshold fixed or
    calibrated."""
    from memaudit.screen import score_for

    spec, comp = item.spec, ctx.comp
    scores = np.asarray(comp.screen_prompts(ctx.model, item.texts, steps=spec.steps,
                                            seeds=spec.seeds, score=spec.score or None,
                                            params=spec.params or None),
                        dtype=float).reshape(-1)
    # what the score was, with where its model-dependent parameters came from (the database)
    record = score_for(ctx.model, spec.score or None, spec.params or None).record()
    threshold = spec.threshold
    if threshold is None and spec.clean_label:
        clean = np.array([s for t, s in zip(item.texts, scores, strict=True)
                          if item.labels.get(t) == spec.clean_label])
        if clean.size == 0:
            raise UserError(f"plan: [screen] clean_label {spec.clean_label!r} matches no prompt")
        threshold = float(comp.calibrate_threshold(clean, spec.fpr))
    return {"scores": scores, "threshold": threshold, "record": record}


def commit_screen(store: AuditStore, run_id: int, item: ScreenItem, r: dict[str, Any],
                   prompt_ids: dict[str, int]) -> None:
    spec, threshold, rec = item.spec, r["threshold"], r.get("record") or {}
    for t, s in zip(item.texts, r["scores"], strict=True):
        store.add_screen(run_id=run_id, prompt_id=prompt_ids[t], score=float(s),
                         steps=spec.steps, seeds=spec.seeds, threshold=threshold,
                         flagged=None if threshold is None else bool(s > threshold),
                         score_name=rec.get("score"),
                         params={k: v for k, v in rec.items() if k != "score"} or None)


def screen_binding(store: AuditStore, run_id: int, spec: ScreenSpec | None
                   ) -> dict[str, Any] | None:
    """The run's screening (scores and threshold of the committed screening unit) as
    `auto`'s `use_screen` arguments; None without a plan [screen] or before it ran."""
    if spec is None:
        return None
    rows = store.query("SELECT p.text AS prompt, s.score, s.threshold FROM screens s "
                       "JOIN prompts p ON p.id = s.prompt_id WHERE s.run_id = ? "
                       "AND s.steps = ? AND s.seeds = ?", [run_id, spec.steps, spec.seeds])
    if not rows:
        return None
    thr = next((r["threshold"] for r in rows if r["threshold"] is not None), None)
    how = "plan [screen] " + ("threshold" if spec.threshold is not None else
                              f"calibrated on label {spec.clean_label!r} at FPR {spec.fpr:g}")
    return {"scores": {r["prompt"]: r["score"] for r in rows}, "threshold": thr,
            "score": spec.score or "", "seeds": spec.seeds, "steps": spec.steps,
            "source": how}


def _record(guidance: Any, prompt: str, seed: int) -> dict[str, Any] | None:
    """A method's own per-generation record (auto's decision), for generations.extra_json."""
    record = getattr(guidance, "generation_record", None)
    return (record(prompt, seed) or None) if record is not None else None


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _opt_int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None
