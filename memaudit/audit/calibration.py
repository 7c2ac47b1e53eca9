"""`memaudit calibrate`: the transition rules' switch points measured on a model (issue 17).

Composes the sweep of `memaudit.guidance.calibrate` with the measures it needs: clean-prompt
alignment (the canary's digit classifier, METHODS 4, or the CLIP score of a CLIP checkpoint
the user names) and the triggers' reproduction of their known training image
(`memaudit.criteria.reproduction`: a `target_key` / `key` column of the trigger list, looked up
in the index; triggers without one count as reproduced when their nearest item passes the
criterion's fixed cut).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from memaudit.common import UserError


def read_list(path: str | Path, label: str | None = None) -> tuple[list[str], list[str | None]]:
    """(prompts, target keys) of a prompt list, only rows labelled `label` when given."""
    from memaudit.data.prompts import read_prompts

    recs = [r for r in read_prompts(path) if label is None or r.label == label]
    if not recs:
        raise UserError(f"{path}: no prompts" + (f" labelled {label!r}" if label else ""))
    return [r.text for r in recs], [r.target_key for r in recs]


def alignment_measure(model, clip_model: str | None = None, clip_pretrained: str | None = None,
                      device: str | None = None) -> Callable[[Any, list[str]], list]:
    """images, prompts -> per-image alignment: digits on a canary, else the CLIP score."""
    if clip_model:
        from memaudit.quality.clipscore import ClipScorer

        scorer = ClipScorer(clip_model, clip_pretrained, None, device=device or "cpu")
        return lambda images, prompts: [float(v) for v in scorer.score(images, prompts)]
    if getattr(model, "family", "") == "canary":
        from memaudit.audit.components import _digits_alignment

        def digits(images, prompts):
            out = _digits_alignment(model, prompts, images)
            if all(v is None for v in out):
                raise UserError("the clean list names no digit: the canary's alignment is "
                                "its digit classifier (give digit prompts, e.g. generic.txt)")
            return out

        return digits
    raise UserError("clean-prompt alignment needs a CLIP checkpoint on this model: "
                    "--clip-model NAME --clip-pretrained FILE")


def reproduction_measure(index_dir: str | Path, criterion: str,
                         targets: dict[str, str | None]) -> Callable[[Any, list[str]], list]:
    """images, prompts -> per-image reproduction of each prompt's target (see the module
    docstring)."""
    from memaudit.criteria import make_criterion
    from memaudit.criteria.reproduction import reproduced, target_groups

    crit = make_criterion(criterion, index_dir)

    def measure(images, prompts):
        sc = crit.score(images)
        groups = target_groups(crit.index, [targets.get(p) for p in prompts])
        out = reproduced(crit.index, sc, groups)
        return [bool(sc.is_copy[i]) if v is None else v for i, v in enumerate(out)]

    return measure


def run_calibration(model_spec: str, clean: str | Path, triggers: str | Path,
                    index_dir: str | Path, *, trigger_label: str | None = None,
                    criterion: str = "nl2", methods: Sequence[str] = ("static", "opposite",
                                                                      "dynamic"),
                    seeds: int = 4, steps: int | None = None,
                    guidance_scale: float | None = None, keep: float = 0.95,
                    clip_model: str | None = None, clip_pretrained: str | None = None,
                    device: str | None = None, progress=None):
    """Load the model and lists, sweep, return the `Calibration`."""
    from memaudit.guidance.calibrate import calibrate_transition
    from memaudit.models import load_model

    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if not 0 <= keep <= 1:
        raise UserError(f"--keep must be in [0, 1], got {keep}")
    clean_prompts, _ = read_list(clean)
    trig, keys = read_list(triggers, trigger_label)
    model = load_model(model_spec, device=device)
    return calibrate_transition(
        model, clean_prompts, trig,
        alignment_measure(model, clip_model, clip_pretrained, device),
        reproduction_measure(index_dir, criterion, dict(zip(trig, keys, strict=True))),
        methods=methods, seeds=range(seeds), steps=steps, guidance_scale=guidance_scale,
        keep=keep, progress=progress)


MARK = "# transition rules calibrated by `memaudit calibrate`"


def _own(path: Path) -> bool:
    """An existing file this command wrote (replaced without --overwrite)."""
    try:
        return MARK in path.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return False


def check_calibration_out(out: str | Path, inputs: Sequence[str | Path | None],
                          plan: str | Path | None, methods: Sequence[str] = (),
                          overwrite: bool = False) -> Path:
    """Refuse (one line, before any work) an output that is an input, or a plan that already
    sets the tables the calibration writes."""
    from memaudit.paths import check_output_file

    out = check_output_file(out, [*inputs, plan], overwrite=overwrite, own=_own,
                            what="calibration")
    check_output_file(out.with_suffix(".json"), [*inputs, plan], overwrite=True,
                      what="calibration record")
    if plan is not None:  # a plan that does not load is refused before the sweep
        from memaudit.audit.plan import load_plan

        _no_clash(plan, load_plan(plan).params, methods)
    return out


def _no_clash(plan, params: dict, methods) -> None:
    clash = sorted(set(params or {}) & set(methods))
    if clash:
        raise UserError(f"{plan} already sets [params.{clash[0]}]; remove it, or write the "
                        "tables alone (without --plan)")


def write_calibration(cal, out: str | Path, plan: str | Path | None = None) -> Path:
    """OUT: the plan's text with the chosen [params] tables appended (checked to load as a
    plan), or the tables alone; OUT.json: every candidate. Atomic; nothing on failure."""
    import json

    from memaudit.common import read_toml
    from memaudit.paths import atomic_write

    out = Path(out)
    text = cal.toml()
    if plan is not None:
        _no_clash(plan, read_toml(plan).get("params"), cal.chosen)
        text = Path(plan).read_text(encoding="utf-8").rstrip("\n") + "\n\n" + text
    with atomic_write(out, "calibration") as tmp:
        tmp.write_text(text, encoding="utf-8")
        if plan is not None:
            from memaudit.audit.plan import load_plan

            load_plan(tmp)  # the written plan must load (paths relative to OUT's folder)
    with atomic_write(out.with_suffix(".json"), "calibration record") as tmp:
        tmp.write_text(json.dumps(cal.to_dict(), indent=1) + "\n")
    return out
