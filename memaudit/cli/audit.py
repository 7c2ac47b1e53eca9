"""CLI: `memaudit audit PLAN.toml`, `report DB`, `gate DB | gate --screen`, `demo`.

Thin layer over memaudit.audit, memaudit.report, memaudit.gate and memaudit.demo.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from memaudit.common import UserError


def _log(msg: str) -> None:
    from memaudit.text import terminal_text

    print(terminal_text(msg, one_line=False), file=sys.stderr)


def audit_cmd(
    plan: Path = typer.Argument(None, help="The audit plan (TOML); see docs/database.md. "
                                "With --init: the plan to write \\[plan.toml]."),
    new_run: bool = typer.Option(False, "--new-run",
                                 help="Start a new run even though the plan changed."),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
    threads: int = typer.Option(None, min=1, help="Torch CPU threads (default: torch's)."),
    clip_model: str = typer.Option(None, "--clip-model", help="CLIP score per generation with "
                                   "this open_clip model (sets \\[quality] clip_model)."),
    clip_pretrained: Path = typer.Option(None, "--clip-pretrained",
                                         help="Its local checkpoint file (never downloaded)."),
    inception: Path = typer.Option(None, "--inception", help="FID's Inception-v3 weights file: "
                                   "KID / FD in Inception features (sets \\[quality] inception)."),
    engine: str = typer.Option("local", "--engine",
                               help="Where units run: local, or ray (memaudit\\[ray])."),
    address: str = typer.Option(None, "--address", help="ray: auto or HOST:PORT of a running "
                                "cluster (default: a local instance)."),
    actors: int = typer.Option(None, "--actors", help="ray: model replicas (default: one "
                               "per GPU, else one per CPU)."),
    init: tuple[str, str] | None = typer.Option(
        None, "--init", metavar="MODEL DATA", help="Write a commented plan for MODEL and the "
        "training set DATA (any layout) instead of running one."),
    layout: str = typer.Option(None, "--layout", help="With --init: DATA's layout \\[detected]."),
    caption_col: str = typer.Option(None, "--caption-col", "--caption-column",
                                    help="With --init: DATA's caption column."),
    instance_prompt: str = typer.Option(None, "--instance-prompt",
                                        help="With --init: DreamBooth instance prompt."),
    class_prompt: str = typer.Option(None, "--class-prompt",
                                     help="With --init: DreamBooth class prompt."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="With --init: replace an existing plan."),
    memory_limit: str = typer.Option(None, "--memory-limit", help="Peak memory per process, "
                                     "e.g. 4GB (overrides the plan's memory_limit)."),
) -> None:
    """Run (or resume) a whole audit: generate, detect, screen, quality -> OUT/audit.duckdb.
    `--init MODEL DATA` writes a plan to start from instead."""
    from memaudit.audit import load_plan, run_audit, set_threads

    if init is not None:
        from memaudit.audit.init import init_plan

        res = init_plan(init[0], init[1], plan or Path("plan.toml"), overwrite=overwrite,
                        command="memaudit audit --init "
                        + shlex.join([*init, *([str(plan)] if plan else [])]),
                        layout=layout, caption_col=caption_col,
                        instance_prompt=instance_prompt, class_prompt=class_prompt)
        for f in res["lists"]:
            print(f"prompts: {f}")
        print(f"training set: {res['layout']['layout']}, {res['rows']} rows")
        print(f"plan: {res['plan']} (run it: memaudit audit {res['plan']})")
        return
    if plan is None:
        raise UserError("give the audit plan (or --init MODEL DATA to write one)")
    if threads is not None:
        set_threads(threads)
    p = load_plan(plan)
    if memory_limit is not None:
        from memaudit.engine.memory import parse_memory

        parse_memory(memory_limit)
        p.memory_limit = memory_limit
    overrides = {"clip_model": clip_model, "clip_pretrained": clip_pretrained,
                 "inception": inception}
    if any(v is not None for v in overrides.values()):
        if p.quality is None:
            raise UserError("the plan has quality = false; --clip-model / --inception need it")
        for k, v in overrides.items():
            if v is not None:
                setattr(p.quality, k, str(v.resolve()) if isinstance(v, Path) else v)
        if bool(p.quality.clip_model) != bool(p.quality.clip_pretrained):
            raise UserError("--clip-model and --clip-pretrained (a local checkpoint) go together")
    res = run_audit(p, new_run=new_run, device=device, log=_log, engine=engine,
                    address=address, actors=actors)
    print(f"run {res.run_id}: {res.units_done} units done, {res.units_skipped} already done, "
          f"{res.seconds:.1f} s")
    print(f"database: {res.db_path}")


def report_cmd(
    db: Path = typer.Argument(..., help="An audit database (audit.duckdb)."),
    out: Path = typer.Option(None, "--out", help="HTML file (default: beside the database)."),
    pdf: bool = typer.Option(False, "--pdf", help="Also print a PDF with headless chromium."),
    run: int = typer.Option(None, help="Run id (default: the latest)."),
    max_flagged: int = typer.Option(200, help="At most this many flagged outputs (and as many "
                                    "per-prompt rows) shown."),
    index: Path = typer.Option(None, "--index", help="The run's training index, to show the "
                               "training images (default: the index the database names)."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace an existing file that is not a report."),
    source: list[Path] = typer.Option(None, "--source", help="Training data (any layout: "
                                      "file or folder) to read the training images from, "
                                      "besides files inside the index folder (repeatable)."),
    index_mismatch_ok: bool = typer.Option(False, "--index-mismatch-ok", help="Show the "
                                           "images of an index whose content hash is not "
                                           "the run's (the page says so)."),
) -> None:
    """Render the self-contained HTML report (and optionally a PDF)."""
    from memaudit.paths import check_output_file, is_memaudit_html, is_pdf
    from memaudit.report import render_pdf, write_report

    out = out or db.parent / "report.html"
    inputs = [db, index, *(source or [])]
    check_output_file(out, inputs, overwrite=overwrite, own=is_memaudit_html,
                      what="report")  # before the work; write_report checks again
    if pdf:
        check_output_file(out.with_suffix(".pdf"), inputs, overwrite=overwrite,
                          own=is_pdf, what="PDF")
    path = write_report(db, out, run_id=run, max_flagged=max_flagged, index=index,
                        overwrite=overwrite, sources=source or None,
                        index_mismatch_ok=index_mismatch_ok)
    print(f"report: {path}")
    if pdf:
        print(f"pdf: {render_pdf(path, path.with_suffix('.pdf'))}")


def gate_cmd(
    db: Path = typer.Argument(None, help="An audit database (omit with --screen)."),
    criterion: list[str] = typer.Option(None, "--criterion",
                                        help="Criterion to gate on (repeatable; default all)."),
    method: list[str] = typer.Option(None, "--method",
                                     help="Method to gate on (repeatable; default all)."),
    max_copy_rate: float = typer.Option(None, min=0.0, max=1.0,
                                        help="Fail above this copy rate (default 0.0 "
                                        "unless another limit is given)."),
    max_screen_score: float = typer.Option(None, help="Fail when a prompt screens above this."),
    max_quality_loss: float = typer.Option(
        None, min=0.0, help="Fail a method more than this fraction worse than cfg in quality or "
        "alignment (0.1: FD 10% above cfg's, or agreement / CLIP score 10% below)."),
    threshold: str = typer.Option("auto", help="Copy verdict: calibrated | fixed | auto "
                                  "(calibrated where the index has a calibration)."),
    junit: Path = typer.Option(None, "--junit", help="Write a JUnit XML file."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Let --junit replace a file that is not a JUnit file "
                                        "memaudit wrote."),
    run: int = typer.Option(None, help="Run id (default: the latest)."),
    screen: bool = typer.Option(False, "--screen",
                                help="Screening only, on --model and --prompts (no DB)."),
    model: str = typer.Option(None, help="With --screen: the model spec (e.g. canary)."),
    prompts: Path = typer.Option(None, help="With --screen: the prompt list."),
    calibrate: Path = typer.Option(None, help="With --screen: clean prompts to calibrate on."),
    fpr: float = typer.Option(0.01, min=0.0, max=1.0,
                              help="With --calibrate: false-positive rate."),
    score: str = typer.Option(None, help="With --screen: screening score (wen, anisotropy, "
                              "attention-entropy, update-norm; default: the default score)."),
    steps: int = typer.Option(1, help="With --screen: screening steps."),
    seeds: int = typer.Option(4, help="With --screen: seeds per prompt."),
    device: str = typer.Option(None, help="With --screen: cpu, cuda, ..."),
    threads: int = typer.Option(None, min=1, help="With --screen: torch CPU threads."),
) -> None:
    """CI gate: exit 0 pass, 1 fail, 2 usage or input error, 3 incomplete (an unfinished or
    failed run) or memaudit failed; prints the offending prompts."""
    from memaudit.gate import format_result, gate_db, gate_screen, write_junit
    from memaudit.paths import check_output_file, is_memaudit_junit

    if junit is not None:
        check_output_file(junit, [db, prompts, calibrate,
                                  model if model and Path(model).exists() else None],
                          overwrite=overwrite,
                          own=is_memaudit_junit, what="JUnit file")
    if screen:
        if threads is not None:
            from memaudit.audit import set_threads

            set_threads(threads)
        if db is not None or model is None or prompts is None:
            raise UserError("gate --screen takes --model M --prompts FILE (and no database)")
        res = gate_screen(model, prompts, max_screen_score=max_screen_score,
                          calibrate=calibrate, fpr=fpr, steps=steps, seeds=seeds,
                          device=device, score=score)
    else:
        if db is None:
            raise UserError("gate needs an audit database (or --screen --model --prompts)")
        if max_copy_rate is None and max_screen_score is None and max_quality_loss is None:
            max_copy_rate = 0.0
        res = gate_db(db, criteria=criterion or None, methods=method or None,
                      max_copy_rate=max_copy_rate, max_screen_score=max_screen_score,
                      threshold=threshold, run_id=run, max_quality_loss=max_quality_loss)
    print(format_result(res))
    if junit is not None:
        print(f"junit: {write_junit(res, junit)}")
    sys.exit(res.exit_code)  # click would swallow typer.Exit under standalone_mode=False


def demo_cmd(
    out: Path = typer.Option(Path("memaudit-demo"), "--out", help="Output folder."),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
    threads: int = typer.Option(None, min=1, help="Torch CPU threads (default: $OMP_NUM_THREADS, "
                                "else the CPU cores idle now, at least 1)."),
    model: str = typer.Option("canary", help="The canary model: 'canary' (shipped) or a "
                              "canary folder, e.g. one you trained with `canary train`."),
) -> None:
    """The whole chain on the shipped canary: data, index, audit, database, report."""
    from memaudit.demo import run_demo
    from memaudit.paths import check_output_dir

    check_output_dir(out, [model if Path(model).exists() else None], what="demo folder")
    summary = run_demo(out, device=device, threads=threads, model=model, log=_log)
    print(summary["text"])
    print(f"database: {summary['db']}")
    print(f"report: {summary['report']}")


def register(app: typer.Typer) -> None:
    app.command("audit")(audit_cmd)
    app.command("report")(report_cmd)
    app.command("gate")(gate_cmd)
    app.command("demo")(demo_cmd)
