"""CLI: `memaudit screen` -- pre-generation screening (METHODS.md 2, 2.1).

A thin layer over `memaudit.screen`: read prompts, score them with a registered score, flag
them against a threshold calibrated on a clean list, print the scores (and AUC / TPR at the FPR
when labels exist).
"""

from __future__ import annotations

from pathlib import Path

import typer

#: columns of `screen --out` (a file with exactly these is replaced without --overwrite)
SCREEN_COLUMNS = ("prompt", "source", "label", "score", "score_name", "flagged", "threshold",
                  "steps", "seeds")
POSITIVE = {"1", "true", "yes", "pos", "positive", "memorized", "memorised", "mem", "vm", "tm",
            "trigger", "copy"}
NEGATIVE = {"0", "false", "no", "neg", "negative", "clean", "generic", "normal", "nonmem",
            "not-memorized", "not_memorized"}


def label_value(label: str | None, positive: set[str] | None = None,
                negative: set[str] | None = None) -> bool | None:
    """A prompt label read as memorized (True) / clean (False) / unknown (None); `positive` /
    `negative` override the default vocabularies (e.g. {"64x", "16x"} vs {"1x"})."""
    if label is None:
        return None
    s = label.strip().lower()
    pos = POSITIVE if positive is None else positive
    neg = NEGATIVE if negative is None else negative
    return True if s in pos else False if s in neg else None


def _label_set(text: str | None) -> set[str] | None:
    return None if text is None else {w.strip().lower() for w in text.split(",") if w.strip()}


def parse_score_params(score: str | None, items: list[str] | None) -> dict:
    """`["g2=0.05"]` -> {"g2": 0.05}, typed from the score's Params (one-line errors)."""
    from dataclasses import MISSING, fields

    from memaudit.common import UserError, user_number
    from memaudit.screen import make_score

    cls = type(make_score(score))
    types = {f.name: (f.default if f.default is not MISSING else None) for f in
             fields(cls.Params)}
    out: dict = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        key = key.strip().rpartition(".")[2]  # `anisotropy.g2=...` or `g2=...`
        if not eq or key not in types:
            raise UserError(f"bad --param {item!r} for score {cls.name!r}; expected NAME=VALUE "
                            f"with NAME in {', '.join(sorted(types)) or '(none)'}")
        default = types[key]
        if isinstance(default, str):  # e.g. attention-entropy.aggregate
            out[key] = value.strip()
            continue
        out[key] = user_number(value, f"--param {key}", integer=isinstance(default, int)
                               and not isinstance(default, bool))
    return out


def _describe(sc) -> str:
    from dataclasses import asdict

    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in asdict(sc.params).items()) or "no parameters"


def _read(path: Path):
    from memaudit.data.prompts import read_prompts

    return read_prompts(path)


def register(app: typer.Typer) -> None:
    @app.command("screen")
    def screen(
        model: str = typer.Option(..., "--model", help="'canary', a canary or diffusers folder"),
        prompts: Path = typer.Option(..., "--prompts", help="Prompt file (txt, jsonl, csv)."),
        score: str = typer.Option(None, "--score", help="Screening score: wen, anisotropy, "
                                  "attention-entropy, update-norm (default: "
                                  "memaudit.screen.DEFAULT_SCORE)."),
        param: list[str] = typer.Option(None, "--param",
                                        help="Score parameter NAME=VALUE (repeatable)."),
        steps: int = typer.Option(1, "--steps",
                                  help="Steps averaged (wen only; first n of the schedule)."),
        seeds: int = typer.Option(4, "--seeds", help="Seeds averaged (0..n-1)."),
        calibrate: Path | None = typer.Option(None, "--calibrate",
                                              help="Clean prompt file to set the threshold."),
        fpr: float = typer.Option(0.01, "--fpr", help="False-positive rate of the threshold."),
        threshold: float | None = typer.Option(None, "--threshold", help="Fixed threshold."),
        guidance_scale: float | None = typer.Option(None, "--guidance-scale", min=0.0,
                                                    help="CFG scale for steps > 1."),
        positive: str | None = typer.Option(None, "--positive",
                                            help="Labels counted as memorized, e.g. 64x,16x."),
        negative: str | None = typer.Option(None, "--negative",
                                            help="Labels counted as clean, e.g. 1x,generic."),
        batch_size: int = typer.Option(32, "--batch-size"),
        out: Path | None = typer.Option(None, "--out", help="Write scores to this Parquet."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Let --out replace a file "
                                       "that is not a screen table memaudit wrote."),
        device: str | None = typer.Option(None, "--device", help="cuda / cpu (default auto)."),
    ) -> None:
        """Score prompts before generating (Wen's magnitude, anisotropy, attention entropy)."""
        import numpy as np

        from memaudit.models.base import load_model
        from memaudit.paths import check_output_file, parquet_with_columns
        from memaudit.screen import (
            auc,
            calibrate_threshold,
            score_for,
            screen_prompts,
            tpr_at_fpr,
        )
        from memaudit.text import terminal_text

        if out is not None:
            check_output_file(out, [prompts, calibrate, model], overwrite=overwrite,
                              own=parquet_with_columns(SCREEN_COLUMNS), what="screen table")
        if not 0 <= fpr < 1:
            from memaudit.common import UserError

            raise UserError(f"--fpr must be in [0, 1), got {fpr:g}")
        records = _read(prompts)
        if not records:
            from memaudit.common import UserError

            raise UserError(f"{prompts}: no prompts")
        sc_params = parse_score_params(score, param)
        m = load_model(model, device=device)
        sc = score_for(m, score, sc_params)
        texts = [r.text for r in records]
        kw = dict(steps=steps, seeds=seeds, guidance_scale=guidance_scale, batch_size=batch_size,
                  score=sc)
        scores = screen_prompts(m, texts, **kw)
        thr = threshold
        clean_scores = None
        if calibrate is not None:
            clean = [r.text for r in _read(calibrate)]
            clean_scores = screen_prompts(m, clean, **kw)
            if thr is None:
                thr = calibrate_threshold(clean_scores, fpr)
        flags = scores > thr if thr is not None else np.zeros(len(scores), dtype=bool)
        for r, s, f in zip(records, scores, flags, strict=True):
            mark = "FLAG" if f else "    "
            typer.echo(f"{s:10.4f}  {mark}  {terminal_text(r.text)}")
        typer.echo(f"score {sc.name} ({_describe(sc)}), {seeds} seeds")
        for note in sc.notes():  # where model-dependent parameters come from (METHODS 2.1)
            typer.echo(terminal_text(note))
        if thr is not None:
            src = f"calibrated on {calibrate} at FPR {fpr}" if threshold is None else "given"
            typer.echo(terminal_text(f"threshold {thr:.4f} ({src}); flagged "
                                     f"{int(flags.sum())}/{len(flags)}"))
        pos_set, neg_set = _label_set(positive), _label_set(negative)
        labels = [label_value(r.label, pos_set, neg_set) for r in records]
        pos = np.array([s for s, lab in zip(scores, labels, strict=True) if lab is True])
        neg = np.array([s for s, lab in zip(scores, labels, strict=True) if lab is False])
        if pos.size and neg.size:
            typer.echo(f"labels: {pos.size} memorized, {neg.size} clean; AUC {auc(pos, neg):.4f}; "
                       f"TPR at {fpr:g} FPR {tpr_at_fpr(pos, neg, fpr):.4f}")
        if clean_scores is not None:
            typer.echo(f"vs {calibrate}: AUC {auc(scores, clean_scores):.4f}; TPR at {fpr:g} FPR "
                       f"{tpr_at_fpr(scores, clean_scores, fpr):.4f} (prompts as positives)")
        if out is not None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            from memaudit.paths import atomic_write

            table = pa.table({
                "prompt": [r.text for r in records],
                "source": [r.source for r in records],
                "label": [r.label for r in records],
                "score": pa.array(scores, pa.float64()),
                "score_name": [sc.name] * len(records),
                "flagged": pa.array(flags.tolist(), pa.bool_()),
                "threshold": pa.array([thr] * len(records), pa.float64()),
                "steps": pa.array([steps] * len(records), pa.int32()),
                "seeds": pa.array([seeds] * len(records), pa.int32()),
            })
            with atomic_write(out, "screen table") as tmp:
                pq.write_table(table, tmp)
            typer.echo(terminal_text(f"wrote {out}"), err=True)
