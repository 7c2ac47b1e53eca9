"""Label a canary's prompts by what the model does, for the screening benchmark (issue 19;
docs/mitigations.md "Screening scores").

    python -m memaudit.screen.label --work W [--model canary|FOLDER] [--data D --index I]
                                    [--seeds 4] [--scale S] [--steps N]

Every planted caption of the canary's data (each trigger group, and the guided group when the
data has one) is generated with `cfg` at seeds 0..n-1 (default 4), at the model's default CFG
scale and step count. An image *reproduces* its caption's planted image when that image is its
nearest training image and nL2 < 1.4 (the published cut; Carlini et al. 2023, AMG Eq. 8). A
caption is `memorized` when at least half of its seeds reproduce, `clean` when none does,
`ambiguous` otherwise (left out of the split); the data's generic prompts are `generic`. This
is how the field checks which of Webster's 500 prompts really reproduce, rather than trusting
a duplication count (a once-seen canary caption can be copied). The data and index default to
the ones the canary was trained on (`memaudit.canary.evaluate.prepare`: rebuilt from its
canary.json). Writes W/labels.csv (prompt, label, group, reproduced, seeds, median_nl2), a
prompt file `memaudit screen --prompts W/labels.csv` reads (memorized counts as positive;
clean and generic as negative, or `--negative clean` for the planted captions only).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from memaudit.common import UserError

REPRO_NL2 = 1.4  # the published nL2 copy cut


def label_of(reproduced: int, seeds: int) -> str:
    """memorized (>= half of the seeds reproduce), clean (none), ambiguous (in between)."""
    if reproduced == 0:
        return "clean"
    return "memorized" if 2 * reproduced >= seeds else "ambiguous"


def label_prompts(model: Any, crit: Any, data: Path, seeds: int = 4,
                  scale: float | None = None, steps: int | None = None,
                  batch_size: int = 256) -> list[dict[str, Any]]:
    """One record per prompt of the canary data (planted captions, then generic prompts)."""
    from memaudit.canary.evaluate import planted_images, read_prompts
    from memaudit.guidance import make_guidance
    from memaudit.sampler import sample

    if seeds < 1:
        raise UserError("--seeds must be >= 1")
    planted = planted_images(data)
    groups = {p: lab for p, lab in read_prompts(data)}
    captions = [p for p in groups if p in planted]
    rows = [(p, s) for p in captions for s in range(seeds)]
    out = sample(model, [p for p, _ in rows], [s for _, s in rows], make_guidance("cfg"),
                 steps=steps, guidance_scale=scale, batch_size=batch_size)
    sc = crit.score(out.images)
    keys = crit.index.keys(sc.neighbour)
    nl2 = np.asarray(sc.score, dtype=float)
    records = []
    for i, p in enumerate(captions):
        idx = range(i * seeds, (i + 1) * seeds)
        own = planted[p]["key_prefix"] + "-"
        rep = sum(bool(keys[j].startswith(own) and nl2[j] < REPRO_NL2) for j in idx)
        records.append({"prompt": p, "label": label_of(rep, seeds), "group": groups[p],
                        "reproduced": rep, "seeds": seeds,
                        "median_nl2": float(np.median(nl2[list(idx)]))})
    records += [{"prompt": p, "label": "generic", "group": lab, "reproduced": "",
                 "seeds": "", "median_nl2": ""} for p, lab in groups.items() if p not in planted]
    return records


def write_labels(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "label", "group", "reproduced", "seeds",
                                          "median_nl2"])
        w.writeheader()
        w.writerows(records)


def read_labels(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise UserError(f"{path} not found: run `python -m memaudit.screen.label` first")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def summary(records: list[dict[str, Any]]) -> str:
    by: dict[str, dict[str, int]] = {}
    for r in records:
        by.setdefault(r["group"], {}).setdefault(r["label"], 0)
        by[r["group"]][r["label"]] += 1
    return "; ".join(f"{g}: " + ", ".join(f"{n} {lab}" for lab, n in sorted(c.items()))
                     for g, c in by.items())


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from memaudit.canary.evaluate import prepare
    from memaudit.guidance.bench import bench_parser

    ap = bench_parser(__doc__)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--scale", type=float, help="CFG scale (default: the model's).")
    ap.add_argument("--steps", type=int, help="Sampling steps (default: the model's).")
    args = ap.parse_args(argv)
    model, crit, data, _ = prepare(args.model, args.work, args.data, args.index, args.device)
    records = label_prompts(model, crit, data, args.seeds, args.scale, args.steps)
    args.work.mkdir(parents=True, exist_ok=True)
    write_labels(args.work / "labels.csv", records)
    print(f"labels ({args.seeds} seeds, scale "
          f"{args.scale if args.scale is not None else model.default_guidance_scale:g}): "
          f"{summary(records)}\nwrote {args.work / 'labels.csv'}")
    return records


if __name__ == "__main__":
    from memaudit.guidance.bench import run_cli

    run_cli(main)
