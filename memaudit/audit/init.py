"""`memaudit audit --init MODEL DATA [PLAN]`: write a commented plan that runs.

The plan (default `plan.toml`) audits MODEL against the training set DATA (any layout,
memaudit.data.training_set) with default settings a new user can run as is and then edit:
a pixel index built from DATA (nL2, no weights to fetch), the methods `cfg` (the baseline)
and the transition-point and AMG mitigations, four seeds, quality on. Its prompts, in order
of preference:

- DreamBooth / kohya-ss data: the instance prompt(s) and the class prompt (label
  `instance` / `class`): the prompts the fine-tune was trained to answer;
- the prompt lists beside the data (`.txt`, `.jsonl`, `.csv`... in DATA's folder that
  `read_prompts` reads and that are not caption files or metadata), each labelled by its
  file name;
- otherwise the training captions (label `training-caption`), most repeated first, at most
  `MAX_CAPTIONS`, read from the first `CAPTION_ROWS` rows.

Generated prompts go to `PLAN-prompts.jsonl` beside the plan. The plan is validated (as
`memaudit audit` would) before it is written; nothing is left behind when it fails, and no
existing file is replaced without `overwrite`.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from memaudit.common import UserError

#: the methods a new plan compares (cfg first: the baseline of every ratio)
INIT_METHODS = ("cfg", "static", "dynamic", "amg")
INIT_SEEDS = (0, 1, 2, 3)
MAX_CAPTIONS = 200
CAPTION_ROWS = 10_000


def _rel(path: str | Path, base: Path) -> str:
    """`path` as written in the plan: relative to the plan's folder."""
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def find_prompt_lists(data: str | Path, units: list[Path]) -> list[Path]:
    """Prompt lists in DATA's folder (DATA itself when it is a folder), not caption files,
    metadata or training files."""
    from memaudit.data.imagefolder import METADATA_NAMES
    from memaudit.data.images import is_image
    from memaudit.data.prompts import CSV_SUFFIXES, JSONL_SUFFIXES, TEXT_SUFFIXES, read_prompts

    p = Path(data)
    folder = p if p.is_dir() else p.parent
    if not folder.is_dir():
        return []
    files = sorted(f for f in folder.iterdir() if f.is_file())
    image_stems = {f.stem for f in files if is_image(f)}
    taken = {u.resolve() for u in units}
    out = []
    for f in files:
        if (f.suffix.lower() not in TEXT_SUFFIXES | JSONL_SUFFIXES | CSV_SUFFIXES
                or f.name in METADATA_NAMES or f.stem in image_stems or f.resolve() in taken):
            continue
        try:
            read_prompts(f)
        except UserError:
            continue
        out.append(f)
    return out


def caption_prompts(training_set: Any) -> list[dict[str, Any]]:
    """The most repeated training captions (one prompt per caption line)."""
    counts: dict[str, int] = {}
    for batch in training_set.iter_batches(batch_rows=256, stop_row=CAPTION_ROWS):
        for r in batch:
            for line in r.caption.splitlines():
                if line.strip():
                    counts[line.strip()] = counts.get(line.strip(), 0) + 1
    order = sorted(counts, key=lambda c: -counts[c])[:MAX_CAPTIONS]  # stable: first seen
    return [{"prompt": c, "label": "training-caption", "rows": counts[c]} for c in order]


def _c(code: str, comment: str) -> str:
    return f"{code.ljust(33)} # {comment}"


def _plan_text(model: str, source: str, layout: dict[str, Any], lists: list[tuple[str, str]],
               rows: int, command: str, opts: dict[str, Any]) -> str:
    q = json.dumps
    name = layout["layout"]
    lines = [
        f"# memaudit audit plan, written by `{command}`.",
        "# Run it with `memaudit audit PLAN`; the keys are documented in docs/database.md.",
        "# Relative paths are relative to this file.",
        "",
        'out = "audit-out"                 # audit.duckdb, images/ and the index built below',
        _c(f"model = {q(model)}", "canary, a canary folder, a diffusers pipeline"),
        'criteria = ["nl2"]                # the pixel index\'s copy criterion (METHODS 1.2)',
        f"methods = {q(list(INIT_METHODS))}",
        "# cfg: no mitigation (the baseline); static, dynamic: transition-point rules (Jain et",
        "# al. 2025); amg: anti-memorization guidance (Chen et al. 2024). More: rna, wen,",
        "# init-noise, reanchor, auto (docs/mitigations.md)",
        f"seeds = {q(list(INIT_SEEDS))}",
        "# steps = 50                      # default: the model's",
        "# guidance_scale = 7.5            # default: the model's",
        "# device = \"cuda\"                 # default: cuda when available",
        "",
        "[index]                           # built once, into OUT/index",
        f"source = {q(source)}",
        f"# layout {name} ({rows} rows); docs/index-format.md \"Input\"",
    ]
    for k in ("layout", "caption_col", "instance_prompt", "class_prompt"):
        if opts.get(k):
            lines.append(f"{k} = {q(opts[k])}")
    lines += [
        'embedder = "pixels"               # compared at the model\'s output size; SSCD:',
        '# embedder = "sscd"  (and at the top: weights = "sscd_disc_mixup.torchscript.pt",',
        '#                     criteria = ["sscd"])',
        "",
    ]
    for file, label in lists:
        lines += ["[[prompts]]", f"file = {q(file)}"]
        lines += [f"label = {q(label)}"] if label else []
        lines.append("")
    lines += [
        "# [screen]                        # screening before generation (METHODS 2, 2.1),",
        "# clean_label = \"generic\"         # calibrated on the prompts with this label",
        "# fpr = 0.01",
        "",
    ]
    return "\n".join(lines)


def init_plan(model: str, data: str | Path, plan: str | Path = "plan.toml",
              overwrite: bool = False, command: str | None = None,
              **opts: Any) -> dict[str, Any]:
    """Write the plan (and its generated prompt list); returns what was written and found.
    `opts`: the training-set options (layout, caption_col, instance_prompt, class_prompt)."""
    from memaudit.audit.plan import plan_from_dict
    from memaudit.data.training_set import layout_options, open_training_set
    from memaudit.paths import atomic_write, check_output_file

    opts = layout_options(opts)
    plan = Path(plan)
    base = plan.resolve().parent
    data_s = str(data)
    ts = open_training_set(data_s, **opts)
    units = ts.units()
    rows = sum(ts.unit_rows(units))
    layout = ts.describe()
    model_in_plan = _rel(model, base) if model != "canary" and Path(model).exists() else model
    inputs = [data_s, model if Path(model).exists() else None, *units]
    check_output_file(plan, inputs, overwrite=overwrite, what="plan")

    generated: list[dict[str, Any]] = []
    for p in layout.get("instance_prompts") or []:
        generated.append({"prompt": p, "label": "instance"})
    if layout.get("class_prompt"):
        generated.append({"prompt": layout["class_prompt"], "label": "class"})
    found = find_prompt_lists(data_s, units)
    lists = [(_rel(f, base), f.stem) for f in found]
    if not generated and not lists:
        generated = caption_prompts(ts)
        if not generated:
            raise UserError(f"{data_s}: no prompt lists beside the data and no captions to "
                            "audit with; add a prompt list and run --init again")
    prompt_file = plan.with_name(plan.stem + "-prompts.jsonl") if generated else None
    if prompt_file is not None:
        check_output_file(prompt_file, inputs, overwrite=overwrite, what="prompt list")
        lists.insert(0, (prompt_file.name, ""))

    text = _plan_text(model_in_plan, _rel(data_s, base) if Path(data_s).exists() else data_s,
                      layout, lists, rows, command or "memaudit audit --init", opts)
    written: list[Path] = []
    try:
        if prompt_file is not None:
            with atomic_write(prompt_file, "prompt list") as tmp:
                tmp.write_text("".join(json.dumps(g) + "\n" for g in generated))
            written.append(prompt_file)
        plan_from_dict(tomllib.loads(text), base=base)  # the checks `memaudit audit` makes
        with atomic_write(plan, "plan") as tmp:
            tmp.write_text(text)
    except BaseException:
        for w in written:
            w.unlink(missing_ok=True)
        raise
    return {"plan": plan, "prompts": prompt_file, "lists": [f for f, _ in lists],
            "generated": len(generated), "layout": layout, "rows": rows}
