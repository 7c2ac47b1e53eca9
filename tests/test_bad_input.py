"""Bad input a user can cause, across every command (issue 11): each case asserts the exit
code, one `error:` line without a traceback, and that nothing was written or half-written
(every file in the shared workspace and in the case's own folder byte-identical, nothing
added: no published index, no stuck run, no partial output).

The cases run through `memaudit.cli.main`, the console entry point, in this process (one
process per case would spend most of the suite importing torch); test_cli.py checks the
same contract through `python -m memaudit`. The canary commands are tested in
test_canary.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from audit_fixtures import copying_audit, make_tiny_canary
from index_helpers import digits_parquet, write_parquet
from PIL import Image

from memaudit.cli import main

NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def ws(tmp_path_factory, pipe_dir) -> Path:
    """The shared workspace: training data, an index, a model, prompt lists, an audit
    database, and broken or foreign versions of each."""
    w = tmp_path_factory.mktemp("ws")
    data = w / "data"
    digits_parquet(data / "train.parquet", n=20)
    from memaudit.index import build_index

    build_index(data / "train.parquet", "pixels", w / "idx", calibrate=False)
    make_tiny_canary(w / "canary")
    (w / "p.txt").write_text("a photo of a cat\nthe digit 3\n")
    (w / "empty.txt").write_text("\n# only a comment\n")
    (w / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (w / "nocol.csv").write_text("id,url\n1,http://x\n")
    (w / "notes.txt").write_text("my notes, not an output\n")
    (w / "folder").mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(w / "img.png")
    (w / "fake.png").write_bytes(b"not a png at all")
    raw = (data / "train.parquet").read_bytes()
    (w / "truncated.parquet").write_bytes(raw[: len(raw) // 2])
    write_parquet(w / "corrupt.parquet", [b"", b"\x89PNG broken"], ["a", "b"])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"png": pa.array([1, 2], pa.int64()), "caption": ["a", "b"]}),
                   w / "inttype.parquet")
    for name, manifest in (("idx-empty-manifest", {}), ("idx-list-manifest", [1, 2])):
        shutil.copytree(w / "idx", w / name)
        (w / name / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(w / "idx", w / "idx-truncated-items")
    items = (w / "idx" / "items.parquet").read_bytes()
    (w / "idx-truncated-items" / "items.parquet").write_bytes(items[: len(items) // 3])
    shutil.copytree(w / "idx", w / "idx-sscd")  # a shared index naming "their" TorchScript
    man = json.loads((w / "idx" / "manifest.json").read_text())
    man["embedder"] = {"name": "sscd", "config": {"weights": "https://example.invalid/m.pt",
                                                  "weights_sha256": "ab" * 32}}
    (w / "idx-sscd" / "manifest.json").write_text(json.dumps(man))
    audit = copying_audit(w / "audit")  # a real audit database (with OUT/index inside)
    import duckdb

    con = duckdb.connect(str(w / "other.duckdb"))
    con.execute("CREATE TABLE sales (id INTEGER, amount DOUBLE)")
    con.close()
    con = duckdb.connect(str(w / "meta-only.duckdb"))
    con.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    con.close()
    con = duckdb.connect(str(w / "meta-other.duckdb"))
    con.execute("CREATE TABLE meta (a INTEGER)")
    con.close()
    assert audit == w / "audit" / "out" / "audit.duckdb"
    _issue18_inputs(w, pipe_dir)
    return w


def _snapshot(*roots: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            key = str(p)
            out[key] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _plan(ws: Path, tmp: Path, body: str, out: str | None = None) -> str:
    plan = tmp / "plan.toml"
    plan.write_text(f'out = {json.dumps(out or str(tmp / "out"))}\n'
                    f'model = {json.dumps(str(ws / "canary"))}\n'
                    + body + f'\n[[prompts]]\nfile = {json.dumps(str(ws / "p.txt"))}\n')
    return str(plan)


@dataclass
class Case:
    id: str
    argv: Callable[[Path, Path], list[str]]  # (workspace, case folder) -> arguments
    message: str
    code: int = 2
    needs_no_gpu: bool = False


DB = "audit/out/audit.duckdb"
GEN = ["generate", "--model", "{ws}/canary", "--prompts", "{ws}/p.txt", "--steps", "1"]

CASES = [
    # --- index build -----------------------------------------------------------------
    Case("build-missing-source", lambda w, t: ["index", "build", f"{w}/nothing.parquet",
         "--embedder", "pixels", "--out", f"{t}/i"], "training set not found"),
    Case("build-out-is-the-data", lambda w, t: ["index", "build", f"{w}/data", "--embedder",
         "pixels", "--out", f"{w}/data", "--overwrite"], "is one of this command's inputs"),
    Case("build-out-holds-the-data", lambda w, t: ["index", "build", f"{w}/data/train.parquet",
         "--embedder", "pixels", "--out", f"{w}", "--overwrite"], "holds the input"),
    Case("build-out-inside-the-data", lambda w, t: ["index", "build", f"{w}/data",
         "--embedder", "pixels", "--out", f"{w}/data/idx"], "inside the input folder"),
    Case("build-overwrite-a-foreign-folder", lambda w, t: ["index", "build",
         f"{w}/data/train.parquet", "--embedder", "pixels", "--out", f"{w}/folder",
         "--overwrite"], "is not a memaudit index folder"),
    Case("build-out-exists", lambda w, t: ["index", "build", f"{w}/data/train.parquet",
         "--embedder", "pixels", "--out", f"{w}/idx"], "already exists"),
    Case("build-all-rows-corrupt", lambda w, t: ["index", "build", f"{w}/corrupt.parquet",
         "--embedder", "pixels", "--out", f"{t}/i"], "no usable image"),
    Case("build-truncated-parquet", lambda w, t: ["index", "build", f"{w}/truncated.parquet",
         "--embedder", "pixels", "--out", f"{t}/i"], "cannot read Parquet file"),
    Case("build-wrong-column-type", lambda w, t: ["index", "build", f"{w}/inttype.parquet",
         "--embedder", "pixels", "--out", f"{t}/i"], "expected encoded bytes"),
    Case("build-unknown-embedder", lambda w, t: ["index", "build", f"{w}/data",
         "--embedder", "dino", "--out", f"{t}/i"], "unknown embedder 'dino'"),
    Case("build-sscd-without-weights", lambda w, t: ["index", "build", f"{w}/data",
         "--embedder", "sscd", "--out", f"{t}/i"], "needs --weights"),
    Case("build-batch-size-0", lambda w, t: ["index", "build", f"{w}/data", "--embedder",
         "pixels", "--out", f"{t}/i", "--batch-size", "0"], "must be positive"),
    Case("build-bad-factory", lambda w, t: ["index", "build", f"{w}/data", "--embedder",
         "pixels", "--out", f"{t}/i", "--factory", "NotAFactory"], "bad faiss factory"),
    Case("build-recipe-wrong-type", lambda w, t: ["index", "build", _recipe(w, t,
         'batch_size = "big"')], "batch_size must be a positive integer"),
    Case("build-cuda-without-gpu", lambda w, t: ["index", "build", f"{w}/data", "--embedder",
         "pixels", "--out", f"{t}/i", "--device", "cuda"], "CUDA is not available",
         needs_no_gpu=True),
    # --- index info / query / calibrate ------------------------------------------------
    Case("info-manifest-is-empty-object", lambda w, t: ["index", "info",
         f"{w}/idx-empty-manifest"], "is not a memaudit index manifest"),
    Case("info-manifest-is-a-list", lambda w, t: ["index", "info", f"{w}/idx-list-manifest"],
         "a JSON list, not an object"),
    Case("info-truncated-items", lambda w, t: ["index", "info", f"{w}/idx-truncated-items"],
         "cannot read"),
    Case("info-not-an-index", lambda w, t: ["index", "info", f"{w}/folder"],
         "is not a memaudit index"),
    Case("calibrate-fpr-2", lambda w, t: ["index", "calibrate", f"{w}/idx", "--fpr", "2"],
         "--fpr must be between 0 and 1"),
    Case("calibrate-sample-0", lambda w, t: ["index", "calibrate", f"{w}/idx", "--sample",
         "0"], "--sample must be at least 1"),
    Case("query-shared-index-needs-named-weights", lambda w, t: ["index", "query",
         f"{w}/idx-sscd", f"{w}/img.png"], "pass --weights PATH"),
    Case("query-missing-image", lambda w, t: ["index", "query", f"{w}/idx",
         f"{w}/none.png"], "image not found"),
    Case("query-not-an-image", lambda w, t: ["index", "query", f"{w}/idx", f"{w}/fake.png"],
         "cannot read image"),
    Case("query-k-0", lambda w, t: ["index", "query", f"{w}/idx", f"{w}/img.png", "--k", "0"],
         "--k must be at least 1"),
    # --- detect ------------------------------------------------------------------------
    Case("detect-out-is-a-folder", lambda w, t: ["detect", f"{w}/img.png", "--index",
         f"{w}/idx", "--out", f"{w}/folder"], "is a folder; give a file name"),
    Case("detect-out-is-a-foreign-file", lambda w, t: ["detect", f"{w}/img.png", "--index",
         f"{w}/idx", "--out", f"{w}/notes.txt"], "not a memaudit detect table"),
    Case("detect-out-is-an-input", lambda w, t: ["detect", f"{w}/img.png", "--index",
         f"{w}/idx", "--out", f"{w}/img.png"], "is one of this command's inputs"),
    Case("detect-missing-image", lambda w, t: ["detect", f"{w}/none.png", "--index",
         f"{w}/idx"], "no such file or directory"),
    Case("detect-unsupported-criterion", lambda w, t: ["detect", f"{w}/img.png", "--index",
         f"{w}/idx", "--criterion", "sscd"], "needs a different index"),
    Case("detect-batch-size-0", lambda w, t: ["detect", f"{w}/img.png", "--index", f"{w}/idx",
         "--batch-size", "0"], "--batch-size must be at least 1"),
    Case("detect-corrupt-image", lambda w, t: ["detect", f"{w}/fake.png", "--index",
         f"{w}/idx"], "cannot read image"),
    Case("detect-bad-manifest", lambda w, t: ["detect", f"{w}/img.png", "--index",
         f"{w}/idx-list-manifest"], "is not a memaudit index manifest"),
    Case("detect-cuda-without-gpu", lambda w, t: ["detect", f"{w}/img.png", "--index",
         f"{w}/idx", "--device", "cuda"], "CUDA is not available", needs_no_gpu=True),
    # --- generate ----------------------------------------------------------------------
    Case("generate-out-is-a-file", lambda w, t: _fmt(GEN, w) + ["--out", f"{w}/notes.txt"],
         "exists and is a file"),
    Case("generate-empty-prompt-file", lambda w, t: ["generate", "--model", f"{w}/canary",
         "--prompts", f"{w}/empty.txt", "--out", f"{t}/o"], "no prompts found"),
    Case("generate-non-utf8-prompts", lambda w, t: ["generate", "--model", f"{w}/canary",
         "--prompts", f"{w}/latin1.txt", "--out", f"{t}/o"], "not UTF-8"),
    Case("generate-amg-guided-by-l2-tiled", lambda w, t: _fmt(GEN, w) + ["--out", f"{t}/o",
         "--method", "amg", "--index", f"{w}/idx", "--criterion", "l2-tiled"],
         "cannot guide amg"),
    Case("generate-amg-without-index", lambda w, t: _fmt(GEN, w) + ["--out", f"{t}/o",
         "--method", "amg"], "needs a copy criterion"),
    Case("generate-seeds-0", lambda w, t: _fmt(GEN, w) + ["--out", f"{t}/o", "--seeds", "0"],
         "no seeds"),
    Case("generate-steps-0", lambda w, t: ["generate", "--model", f"{w}/canary", "--prompts",
         f"{w}/p.txt", "--out", f"{t}/o", "--steps", "0"], "steps must be at least 1"),
    Case("generate-cuda-without-gpu", lambda w, t: _fmt(GEN, w) + ["--out", f"{t}/o",
         "--device", "cuda"], "CUDA is not available", needs_no_gpu=True),
    # --- screen ------------------------------------------------------------------------
    Case("screen-out-is-a-foreign-file", lambda w, t: ["screen", "--model", f"{w}/canary",
         "--prompts", f"{w}/p.txt", "--out", f"{w}/notes.txt"], "not a memaudit screen table"),
    Case("screen-out-is-the-prompts", lambda w, t: ["screen", "--model", f"{w}/canary",
         "--prompts", f"{w}/p.txt", "--out", f"{w}/p.txt"], "is one of this command's inputs"),
    Case("screen-fpr-2", lambda w, t: ["screen", "--model", f"{w}/canary", "--prompts",
         f"{w}/p.txt", "--calibrate", f"{w}/p.txt", "--fpr", "2"], "--fpr must be in [0, 1)"),
    Case("screen-no-prompt-column", lambda w, t: ["screen", "--model", f"{w}/canary",
         "--prompts", f"{w}/nocol.csv"], "no prompt column"),
    Case("screen-steps-0", lambda w, t: ["screen", "--model", f"{w}/canary", "--prompts",
         f"{w}/p.txt", "--steps", "0"], "--steps must be >= 1"),
    # --- audit -------------------------------------------------------------------------
    Case("audit-steps-0", lambda w, t: ["audit", _plan(w, t, f'index = "{w}/idx"\nsteps = 0')],
         "'steps' must be an integer >= 1"),
    Case("audit-unknown-scheduler", lambda w, t: ["audit", _plan(w, t, f'index = "{w}/idx"\n'
         'scheduler = "heun"')], "unknown scheduler 'heun'"),
    Case("audit-bad-toml", lambda w, t: ["audit", _plan(w, t, "steps = [")], "invalid TOML"),
    Case("audit-index-table-bad-size", lambda w, t: ["audit", _plan(w, t, "[index]\n"
         f'source = "{w}/data"\nsize = "big"')], "bad pixel size"),
    Case("audit-out-is-a-file", lambda w, t: ["audit", _plan(w, t, f'index = "{w}/idx"',
         out=f"{w}/notes.txt")], "exists and is a file"),
    Case("audit-index-not-an-index", lambda w, t: ["audit", _plan(w, t,
         f'index = "{w}/folder"')], "is not a memaudit index"),
    Case("audit-out-holds-a-foreign-duckdb", lambda w, t: ["audit", _plan(w, t,
         f'index = "{w}/idx"', out=_foreign_out(w, t))], "not a memaudit audit database"),
    Case("audit-cuda-without-gpu", lambda w, t: ["audit", _plan(w, t, f'index = "{w}/idx"\n'
         'device = "cuda"')], "CUDA is not available", needs_no_gpu=True),
    # --- report ------------------------------------------------------------------------
    Case("report-out-is-the-database", lambda w, t: ["report", f"{w}/{DB}", "--out",
         f"{w}/{DB}"], "is one of this command's inputs"),
    Case("report-out-is-a-foreign-file", lambda w, t: ["report", f"{w}/{DB}", "--out",
         f"{w}/notes.txt"], "not a memaudit report"),
    Case("report-out-in-proc", lambda w, t: ["report", f"{w}/{DB}", "--out", "/proc/x.html"],
         "the folder /proc does not accept new files"),
    Case("report-foreign-duckdb", lambda w, t: ["report", f"{w}/other.duckdb", "--out",
         f"{t}/r.html"], "not a memaudit audit database"),
    Case("report-not-a-database", lambda w, t: ["report", f"{w}/notes.txt", "--out",
         f"{t}/r.html"], "cannot open audit database"),
    Case("report-unknown-run", lambda w, t: ["report", f"{w}/{DB}", "--out", f"{t}/r.html",
         "--run", "99"], "no run 99"),
    # --- gate --------------------------------------------------------------------------
    Case("gate-meta-only-duckdb", lambda w, t: ["gate", f"{w}/meta-only.duckdb"],
         "not a memaudit audit database"),
    Case("gate-meta-of-other-shape", lambda w, t: ["gate", f"{w}/meta-other.duckdb"],
         "not a memaudit audit database"),
    Case("gate-junit-is-the-database", lambda w, t: ["gate", f"{w}/{DB}", "--junit",
         f"{w}/{DB}"], "is one of this command's inputs"),
    Case("gate-junit-is-a-folder", lambda w, t: ["gate", f"{w}/{DB}", "--junit",
         f"{w}/folder"], "is a folder"),
    Case("gate-unknown-threshold", lambda w, t: ["gate", f"{w}/{DB}", "--threshold", "loose"],
         "--threshold must be one of"),
    Case("gate-missing-database", lambda w, t: ["gate", f"{t}/none.duckdb"], "not found"),
    Case("gate-screen-empty-prompts", lambda w, t: ["gate", "--screen", "--model",
         f"{w}/canary", "--prompts", f"{w}/empty.txt", "--max-screen-score", "1"],
         "no prompts found"),
    # --- demo --------------------------------------------------------------------------
    Case("demo-out-is-a-file", lambda w, t: ["demo", "--out", f"{w}/notes.txt"],
         "exists and is a file"),
]


def _fmt(args: list[str], w: Path) -> list[str]:
    return [a.replace("{ws}", str(w)) for a in args]


def _recipe(w: Path, t: Path, line: str) -> str:
    r = t / "r.toml"
    r.write_text(f'data = "{w}/data"\nembedder = "pixels"\nout = "{t}/i"\n{line}\n')
    return str(r)


def _foreign_out(w: Path, t: Path) -> str:
    out = t / "out"
    out.mkdir()
    shutil.copy(w / "other.duckdb", out / "audit.duckdb")
    return str(out)


def _crafted(w: Path, t: Path, kind: str) -> str:
    """A copy of the workspace's audit database altered as an attacker would
    (audit_fixtures.crafted_db), its target a file of the case's own folder."""
    from audit_fixtures import crafted_db

    (t / "secret.env").write_text("CI_TOKEN=s3cr3t\n")
    return str(crafted_db(w / DB, t / "db", kind, t / "secret.env"))


def _crafted_out(w: Path, t: Path, kind: str) -> str:
    _crafted(w, t, kind)
    return str(t / "db")


def _changed_copy(w: Path, t: Path) -> str:
    """The workspace's finished audit moved to the case's folder (its plan and database
    rewritten to the new place, as if it had run there), then a line appended to a list."""
    import duckdb

    old, new = str(w / "audit"), str(t / "audit")
    shutil.copytree(old, new, symlinks=True)
    plan = t / "audit" / "plan.toml"
    plan.write_text(plan.read_text().replace(old, new))
    con = duckdb.connect(str(t / "audit" / "out" / "audit.duckdb"))
    con.execute("UPDATE runs SET plan_json = replace(plan_json, ?, ?), "
                "index_path = replace(index_path, ?, ?)", [old, new, old, new])
    con.close()
    with open(t / "audit" / "gen.txt", "a") as f:
        f.write("one more generic prompt\n")
    return str(plan)


# issue 18: audit databases someone else made (tests/test_untrusted_db.py: nothing leaks)
CASES += [
    Case("report-db-view-over-read-text", lambda w, t: ["report", _crafted(
         w, t, "view-over-read-text"), "--out", f"{t}/r.html"], "extra view prompts"),
    Case("report-db-stored-macro", lambda w, t: ["report", _crafted(w, t, "stored-macro"),
         "--out", f"{t}/r.html"], "stored macro arg_max"),
    Case("report-db-extra-column", lambda w, t: ["report", _crafted(w, t, "extra-column"),
         "--out", f"{t}/r.html"], "extra column runs.note"),
    Case("report-db-plan-json-not-json", lambda w, t: ["report", _crafted(
         w, t, "plan-json-not-json"), "--out", f"{t}/r.html"],
         "runs.plan_json of run 1 is not a JSON object"),
    Case("report-db-view-raises", lambda w, t: ["report", _crafted(w, t, "view-raises"),
         "--out", f"{t}/r.html"], "view method_summary differs from memaudit's"),
    Case("gate-db-view-over-read-text", lambda w, t: ["gate", _crafted(
         w, t, "view-over-read-text"), "--junit", f"{t}/g.xml"], "extra view prompts"),
    Case("gate-db-stored-macro", lambda w, t: ["gate", _crafted(w, t, "stored-macro"),
         "--junit", f"{t}/g.xml"], "stored macro arg_max"),
    Case("gate-db-extra-table", lambda w, t: ["gate", _crafted(w, t, "extra-table"),
         "--junit", f"{t}/g.xml"], "extra table notes"),
    Case("gate-db-view-raises", lambda w, t: ["gate", _crafted(w, t, "view-raises"),
         "--max-quality-loss", "0.5"], "view method_summary differs from memaudit's"),
    Case("gate-db-plan-json-not-json", lambda w, t: ["gate", _crafted(
         w, t, "plan-json-not-json")], "runs.plan_json of run 1 is not a JSON object"),
    Case("report-index-of-other-data", lambda w, t: ["report", f"{w}/{DB}", "--out",
         f"{t}/r.html", "--index", f"{w}/idx"], "is not the run's index (content hash"),
    Case("report-source-not-found", lambda w, t: ["report", f"{w}/{DB}", "--out",
         f"{t}/r.html", "--source", f"{t}/none.parquet"], "--source"),
    Case("report-out-is-a-named-source", lambda w, t: ["report", f"{w}/{DB}", "--out",
         f"{w}/data/train.parquet", "--source", f"{w}/data", "--overwrite"],
         "is inside the input folder"),
    Case("audit-prompts-changed-since-a-finished-run", lambda w, t: ["audit", _changed_copy(
         w, t)], "prompt list gen.txt changed since run 1"),
    Case("audit-out-holds-a-crafted-duckdb", lambda w, t: ["audit", _plan(
         w, t, f'index = "{w}/idx"', out=_crafted_out(w, t, "stored-macro"))],
         "stored macro arg_max"),
]


# --- issue 18: NaN, inputs an --overwrite must not touch, writers, Ray, exit codes -------
def _issue18_inputs(w: Path, pipe_dir: Path) -> None:
    """Inputs of the issue-18 cases: a LoRA (real, then with NaN weights, wrong shapes,
    empty), canaries with NaN weights, a NaN scale or terabyte sizes, hostile prompt lists,
    damaged manifests, item lists and databases."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    (w / "sd").symlink_to(pipe_dir)
    torch.manual_seed(7)
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                     target_modules=["to_q", "to_k"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(w / "lora", unet_lora_layers=layers)
    state = load_file(str(w / "lora" / "pytorch_lora_weights.safetensors"))
    nan = {k: v.clone() for k, v in state.items()}
    nan[sorted(nan)[0]][0, 0] = float("nan")
    save_file(nan, str(w / "lora-nan.safetensors"))
    save_file({k: torch.zeros(v.shape[0], v.shape[1] + 3) if "down" in k else v
               for k, v in state.items()}, str(w / "lora-shape.safetensors"))
    save_file({}, str(w / "lora-empty.safetensors"))  # a valid file without a tensor
    info = json.loads((w / "canary" / "canary.json").read_text())
    for name in ("canary-inf", "canary-nan-scale", "canary-huge", "canary-res"):
        shutil.copytree(w / "canary", w / name)
    cs = load_file(str(w / "canary-inf" / "canary.safetensors"))
    first = sorted(cs)[0]
    cs[first] = cs[first].clone()
    cs[first].view(-1)[0] = float("inf")
    save_file(cs, str(w / "canary-inf" / "canary.safetensors"))
    edits = {"canary-nan-scale": lambda j: j.update(default_guidance_scale=float("nan")),
             "canary-huge": lambda j: j["config"].update(block_out_channels=[200_000] * 2),
             "canary-res": lambda j: j["config"].update(resolution=10**7)}
    for name, edit in edits.items():
        j = json.loads(json.dumps(info))
        edit(j)
        (w / name / "canary.json").write_text(json.dumps(j))
    (w / "nested.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (w / "nested-record.jsonl").write_text('{"caption": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    (w / "null.jsonl").write_text('{"caption": "a cat"}\n{"caption": null}\n')
    (w / "bigfield.csv").write_text('caption\n"' + "x" * 140_000 + '"\n')
    (w / "bidi.txt").write_text("a cat \u202egnp.exe\x1b[2J\n")
    (w / "binary.md").write_bytes(bytes(range(256)) * 4)
    import pickle

    class _Opens:  # unpickling this would create ws/unpickled: the snapshot would show it
        def __reduce__(self):
            return (open, (str(w / "unpickled"), "w"))

    (w / "lora.bin").write_bytes(pickle.dumps(_Opens()))
    (w / "sscd.pt").write_bytes(b"my TorchScript weights\n")
    man = json.loads((w / "idx" / "manifest.json").read_text())
    for name, key, value in (("idx-cal-text", "calibration", "1% FPR"),
                             ("idx-rows-text", "rows", "twenty")):
        shutil.copytree(w / "idx", w / name)
        (w / name / "manifest.json").write_text(json.dumps({**man, key: value}))
    shutil.copytree(w / "idx", w / "idx-short-items")  # valid Parquet, five rows left
    items = pq.read_table(w / "idx" / "items.parquet")
    pq.write_table(items.slice(0, 5), w / "idx-short-items" / "items.parquet")
    shutil.copytree(w / "idx", w / "idx-text-groups")
    gcol = items.column_names.index("group_id")
    pq.write_table(items.set_column(gcol, "group_id", pa.array(
        [str(g) for g in items.column("group_id").to_pylist()])),
        w / "idx-text-groups" / "items.parquet")
    for name, sql in (("bad-plan-json", "UPDATE runs SET plan_json = 'not json {'"),
                      ("raising-view", "CREATE OR REPLACE VIEW method_summary AS SELECT "
                       "error('boom') AS run_id")):
        shutil.copy(w / DB, w / f"{name}.duckdb")
        con = duckdb.connect(str(w / f"{name}.duckdb"))
        con.execute(sql)
        con.close()


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then closed)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _hard_link(w: Path, t: Path) -> str:
    link = t / "mine.parquet"
    import os

    os.link(w / "idx" / "items.parquet", link)
    return str(link)


def _foreign(t: Path, *names: str) -> Path:
    """A folder holding files memaudit did not write, under `names`."""
    d = t / "d"
    d.mkdir()
    for n in names:
        (d / n).write_text("mine, not memaudit's\n")
    return d


SD = ["generate", "--model", "{ws}/sd", "--prompts", "{ws}/p.txt", "--steps", "1"]


def _gen(w: Path, t: Path, prompts: str) -> list[str]:
    return ["generate", "--model", f"{w}/canary", "--prompts", f"{w}/{prompts}", "--out",
            f"{t}/o", "--steps", "1"]
AUDIT_IDX = "audit/out/index"

CASES_18 = [
    # --- defect 3: every float finite and in range, at parse time (CLI and plan alike) ---
    Case("generate-guidance-scale-inf", lambda w, t: _fmt(GEN, w) + ["--out", f"{t}/o",
         "--guidance-scale", "inf"], "--guidance-scale must be a finite number, got inf"),
    Case("generate-guidance-scale-nan", lambda w, t: _fmt(GEN, w) + ["--out", f"{t}/o",
         "--guidance-scale", "nan"], "'--guidance-scale'"),
    Case("generate-guidance-scale-negative", lambda w, t: _fmt(GEN, w) + ["--out", f"{t}/o",
         "--guidance-scale", "-2"], "greater than or equal to 0"),
    Case("generate-lora-scale-nan", lambda w, t: _fmt(GEN, w) + ["--out", f"{t}/o", "--lora",
         f"{w}/lora:nan"], "must be a finite number, got nan"),
    Case("generate-lora-scale-inf", lambda w, t: _fmt(GEN, w) + ["--out", f"{t}/o", "--lora",
         f"{w}/lora:-inf"], "must be a finite number, got -inf"),
    Case("generate-param-nan", lambda w, t: _fmt(GEN, w) + ["--out", f"{t}/o", "--method",
         "amg", "--param", "amg.c3=nan"], "parameter amg.c3 must be a finite number"),
    Case("generate-lora-nan-weights", lambda w, t: _fmt(SD, w) + ["--out", f"{t}/o", "--lora",
         f"{w}/lora-nan.safetensors"], "hold NaN or infinite values"),
    Case("generate-canary-inf-weights", lambda w, t: ["generate", "--model", f"{w}/canary-inf",
         "--prompts", f"{w}/p.txt", "--out", f"{t}/o"], "hold NaN or infinite values"),
    Case("generate-canary-nan-scale", lambda w, t: ["generate", "--model",
         f"{w}/canary-nan-scale", "--prompts", f"{w}/p.txt", "--out", f"{t}/o"],
         "default_guidance_scale must be a finite number"),
    Case("screen-param-nan", lambda w, t: ["screen", "--model", f"{w}/canary", "--prompts",
         f"{w}/p.txt", "--score", "anisotropy", "--param", "g2=nan"],
         "--param g2 must be a finite number"),
    Case("screen-threshold-inf", lambda w, t: ["screen", "--model", f"{w}/canary", "--prompts",
         f"{w}/p.txt", "--threshold", "inf"], "--threshold must be a finite number"),
    Case("gate-max-screen-score-nan", lambda w, t: ["gate", "--screen", "--model",
         f"{w}/canary", "--prompts", f"{w}/p.txt", "--max-screen-score", "nan"],
         "--max-screen-score must be a finite number, got nan"),
    Case("gate-max-copy-rate-2", lambda w, t: ["gate", f"{w}/{DB}", "--max-copy-rate", "2"],
         "less than or equal to 1"),
    Case("calibrate-fpr-nan", lambda w, t: ["index", "calibrate", f"{w}/idx", "--fpr", "nan"],
         "--fpr must be a finite number"),
    Case("audit-guidance-scale-inf", lambda w, t: ["audit", _plan(w, t, f'index = "{w}/idx"\n'
         "guidance_scale = inf")], "guidance_scale must be a finite number, got inf"),
    Case("audit-screen-params-nan", lambda w, t: ["audit", _plan(w, t, f'index = "{w}/idx"\n'
         '[screen]\nscore = "anisotropy"\nthreshold = 1.0\nparams = { g2 = nan }')],
         "screen.params.g2 must be a finite number"),
    Case("audit-method-params-nan", lambda w, t: ["audit", _plan(w, t, f'index = "{w}/idx"\n'
         'methods = ["cfg", "amg"]\n[params.amg]\nc3 = nan')],
         "params.amg.c3 must be a finite number"),
    Case("audit-lora-scale-nan", lambda w, t: ["audit", _plan(w, t, f'index = "{w}/idx"\n'
         f'lora = "{w}/lora:nan"')], "must be a finite number, got nan"),
    Case("canary-evaluate-scales-nan", lambda w, t: ["canary", "evaluate", "--out", f"{t}/e",
         "--scales", "1,nan"], "--scales must be a finite number, got nan"),
    Case("canary-train-lr-inf", lambda w, t: ["canary", "train", f"{w}/data", "--out",
         f"{t}/m", "--lr", "inf"], "--lr must be a finite number, got inf"),
    # --- defect 4: --overwrite never writes into an input (index folders included) -------
    Case("detect-overwrite-into-the-index", lambda w, t: ["detect", f"{w}/img.png", "--index",
         f"{w}/idx", "--out", f"{w}/idx/items.parquet", "--overwrite"],
         "is inside the input folder"),
    Case("detect-overwrite-a-hard-link-into-the-index", lambda w, t: ["detect",
         f"{w}/img.png", "--index", f"{w}/idx", "--out", _hard_link(w, t), "--overwrite"],
         "is inside the input folder"),
    Case("detect-overwrite-the-weights", lambda w, t: ["detect", f"{w}/img.png", "--index",
         f"{w}/idx", "--weights", f"{w}/sscd.pt", "--out", f"{w}/sscd.pt", "--overwrite"],
         "is one of this command's inputs"),
    Case("report-overwrite-into-the-index", lambda w, t: ["report", f"{w}/{DB}", "--index",
         f"{w}/idx", "--out", f"{w}/idx/manifest.json", "--overwrite"],
         "is inside the input folder"),
    Case("report-overwrite-into-the-run-index", lambda w, t: ["report", f"{w}/{DB}", "--out",
         f"{w}/{AUDIT_IDX}/manifest.json", "--overwrite"], "is inside the input folder"),
    Case("audit-out-inside-the-lora-folder", lambda w, t: ["audit", _plan(
         w, t, f'index = "{w}/idx"\nlora = "{w}/lora"', out=f"{w}/lora/out")],
         "is inside the input folder"),
    # --- defect 5: canary writers follow the rule of every writer ----------------------
    Case("canary-data-foreign-files", lambda w, t: ["canary", "data", "--out",
         str(_foreign(t, "train.parquet", "prompts.csv"))],
         "is not canary data memaudit wrote; use --overwrite"),
    Case("canary-evaluate-foreign-summary", lambda w, t: ["canary", "evaluate", "--out",
         str(_foreign(t, "summary.json"))], "not a memaudit canary evaluation summary"),
    Case("canary-data-foreign-prompts-only", lambda w, t: ["canary", "data", "--out",
         str(_foreign(t, "prompts.csv"))], "is not canary data memaudit wrote; use --overwrite"),
    Case("canary-evaluate-foreign-per-image", lambda w, t: ["canary", "evaluate", "--out",
         str(_foreign(t, "per_image.csv"))], "not a memaudit canary evaluation table"),
    Case("canary-evaluate-foreign-labels", lambda w, t: ["canary", "evaluate", "--out",
         str(_foreign(t, "labels.json"))], "not a memaudit canary behaviour labels"),
    Case("canary-evaluate-foreign-grid", lambda w, t: ["canary", "evaluate", "--out",
         f"{t}/e", "--grid", f"{w}/img.png"], "not a memaudit canary grid"),
    Case("canary-evaluate-grid-into-the-index", lambda w, t: ["canary", "evaluate", "--out",
         f"{t}/e", "--index", f"{w}/idx", "--grid", f"{w}/idx/g.png"],
         "is inside the input folder"),
    # --- defect 8: a Ray address with nothing listening: one line, at once -------------
    Case("build-ray-nothing-listening", lambda w, t: ["index", "build", f"{w}/data",
         "--embedder", "pixels", "--out", f"{t}/i", "--engine", "ray", "--address",
         f"127.0.0.1:{_closed_port()}"], "cannot join Ray at 127.0.0.1:"),
    Case("audit-ray-nothing-listening", lambda w, t: ["audit", _plan(w, t,
         f'index = "{w}/idx"'), "--engine", "ray", "--address",
         f"127.0.0.1:{_closed_port()}"], "cannot join Ray at 127.0.0.1:"),
    # --- defect 9: input errors that were exit 3 -----------------------------------------
    Case("generate-empty-lora", lambda w, t: _fmt(SD, w) + ["--out", f"{t}/o", "--lora",
         f"{w}/lora-empty.safetensors"], "holds no tensors"),
    Case("generate-lora-pickled-bin", lambda w, t: _fmt(SD, w) + ["--out", f"{t}/o", "--lora",
         f"{w}/lora.bin"], "only .safetensors files are read"),
    Case("generate-resolution-huge", lambda w, t: _fmt(SD, w) + ["--out", f"{t}/o",
         "--resolution", "1000000"], "resolution 1000000 is over"),
    Case("screen-batch-size-0", lambda w, t: ["screen", "--model", f"{w}/canary", "--prompts",
         f"{w}/p.txt", "--batch-size", "0"], "--batch-size must be at least 1"),
    Case("build-factory-idmap", lambda w, t: ["index", "build", f"{w}/data", "--embedder",
         "pixels", "--out", f"{t}/i", "--factory", "IDMap,Flat"], "drop the IDMap prefix"),
    Case("report-plan-json-not-json", lambda w, t: ["report", f"{w}/bad-plan-json.duckdb",
         "--out", f"{t}/r.html"], "plan_json of run 1 is not a JSON object"),
    Case("gate-plan-json-not-json", lambda w, t: ["gate", f"{w}/bad-plan-json.duckdb"],
         "plan_json of run 1 is not a JSON object"),
    Case("report-view-raises", lambda w, t: ["report", f"{w}/raising-view.duckdb", "--out",
         f"{t}/r.html"], "raising-view.duckdb"),
    Case("info-calibration-is-text", lambda w, t: ["index", "info", f"{w}/idx-cal-text"],
         "calibration is a JSON str"),
    Case("query-rows-is-text", lambda w, t: ["index", "query", f"{w}/idx-rows-text",
         f"{w}/img.png"], "rows is a JSON str"),
    Case("query-truncated-item-list", lambda w, t: ["index", "query", f"{w}/idx-short-items",
         f"{w}/img.png"], "holds 5 rows, the manifest says 20"),
    Case("detect-item-list-of-text-groups", lambda w, t: ["detect", f"{w}/img.png", "--index",
         f"{w}/idx-text-groups"], "column group_id is string"),
    Case("generate-deeply-nested-json", lambda w, t: _gen(w, t, "nested.jsonl"),
         "nested too deeply"),
    Case("generate-deeply-nested-jsonl-record", lambda w, t: _gen(w, t, "nested-record.jsonl"),
         "line 1 is JSON nested too deeply"),
    Case("generate-csv-field-over-the-limit", lambda w, t: _gen(w, t, "bigfield.csv"),
         "field larger than field limit"),
    Case("canary-evaluate-grid-not-png", lambda w, t: ["canary", "evaluate", "--out", f"{t}/e",
         "--grid", f"{t}/x.parquet"], "must be a .png file"),
    Case("canary-basin-doc-binary", lambda w, t: ["canary", "basin", "--out", f"{t}/b",
         "--doc", f"{w}/binary.md"], "is not UTF-8 text"),
    Case("generate-canary-terabytes", lambda w, t: ["generate", "--model", f"{w}/canary-huge",
         "--prompts", f"{w}/p.txt", "--out", f"{t}/o"], "config.block_out_channels must be"),
    Case("generate-canary-resolution-terabytes", lambda w, t: ["generate", "--model",
         f"{w}/canary-res", "--prompts", f"{w}/p.txt", "--out", f"{t}/o"],
         "config.resolution must be <= 4096"),
    # --- minor ---------------------------------------------------------------------------
    Case("generate-unknown-option", lambda w, t: _fmt(GEN, w) + ["--out", f"{t}/o", "--sed",
         "1"], "No such option: --sed"),
    Case("generate-lora-wrong-shapes", lambda w, t: _fmt(SD, w) + ["--out", f"{t}/o", "--lora",
         f"{w}/lora-shape.safetensors"], "cannot load LoRA"),
    Case("generate-resolution-0", lambda w, t: _fmt(SD, w) + ["--out", f"{t}/o",
         "--resolution", "0"], "resolution 0 must be a positive multiple"),
    Case("generate-resolution-on-the-canary", lambda w, t: _fmt(GEN, w) + ["--out", f"{t}/o",
         "--resolution", "64"], "samples at its trained 16x16 only"),
    Case("generate-jsonl-null-prompt", lambda w, t: _gen(w, t, "null.jsonl"),
         "record 2: the prompt ('caption') is null"),
    Case("build-rerank-absurd", lambda w, t: ["index", "build", f"{w}/data", "--embedder",
         "pixels", "--out", f"{t}/i", "--factory", "PQ4", "--rerank", "1000000000000"],
         "--rerank must be at least 1 and at most"),
    Case("build-rerank-on-flat", lambda w, t: ["index", "build", f"{w}/data", "--embedder",
         "pixels", "--out", f"{t}/i", "--rerank", "50"], "applies to compressed factories"),
]
CASES += CASES_18  # after the kinds above (issue 11)


def test_at_least_forty_cases_cover_every_command():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.id.split("-")[0] for c in CASES} == {
        "build", "info", "calibrate", "query", "detect", "generate", "screen", "audit",
        "report", "gate", "demo", "canary"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(ws, tmp_path, capsys, case):
    if case.needs_no_gpu and not NO_GPU:
        pytest.skip("a GPU is present")
    argv = case.argv(ws, tmp_path)  # may write the case's own inputs (plan, recipe)
    before = _snapshot(ws, tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == case.code, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: ") and case.message in lines[0], lines[0]
    assert _snapshot(ws, tmp_path) == before  # nothing written, nothing half-written


def test_entry_point_subprocess_one_line(ws, tmp_path):
    """The same contract through `python -m memaudit` (what CI runs)."""
    import subprocess
    import sys

    before = _snapshot(ws)
    p = subprocess.run([sys.executable, "-m", "memaudit", "report", str(ws / DB), "--out",
                        str(ws / DB)], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert _snapshot(ws) == before


def test_nothing_is_stuck_after_bad_input(ws):
    """No failed attempt above left a run row, a .partial build or an index behind."""
    from memaudit.store import AuditStore

    with AuditStore(ws / DB, read_only=True) as s:
        assert [r["status"] for r in s.query("SELECT status FROM runs")] == ["finished"]
    assert not list(ws.rglob("*.partial")) and not list(ws.rglob("*.tmp*"))
    assert sorted(p.name for p in (ws / "data").iterdir()) == ["train.parquet"]



def test_a_lora_of_wrong_shapes_is_one_line_without_library_logging(ws, tmp_path):
    """issue 18: diffusers logged one line per mismatched tensor before memaudit's error
    (through logging handlers, so this runs the entry point in a subprocess)."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "memaudit", "generate", "--model", str(ws / "sd"),
                        "--prompts", str(ws / "p.txt"), "--steps", "1", "--out",
                        str(tmp_path / "o"), "--lora", str(ws / "lora-shape.safetensors")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("error: cannot load LoRA ") and not (tmp_path / "o").exists()


def _commands() -> dict[str, Callable]:
    """Every registered command's callback by its command line ("index calibrate")."""
    from memaudit.cli import app

    groups = [("", app)] + [(g.name + " ", g.typer_instance) for g in app.registered_groups]
    return {prefix + (c.name or c.callback.__name__): c.callback
            for prefix, group in groups for c in group.registered_commands}


def _float_options() -> list[tuple[str, str, str, bool]]:
    """(command, parameter, option, is a list) for every float option of every command."""
    import inspect

    from memaudit.cli import _option_name

    return [(name, p.name, _option_name(p), "list" in str(p.annotation))
            for name, callback in _commands().items()
            for p in inspect.signature(callback).parameters.values()
            if "float" in str(p.annotation)]


def test_every_float_option_of_every_command_refuses_nan_and_inf():
    """issue 18 defect 3: every float a user gives is checked finite at parse time, whatever
    the command (the check wraps every registered command, so an option added later is
    covered too: this finds them by their annotation)."""
    from memaudit.common import UserError

    commands, options = _commands(), _float_options()
    assert {("generate", "--guidance-scale"), ("gate", "--max-screen-score"),
            ("index calibrate", "--fpr"), ("canary train", "--lr")} <= {
        (c, o) for c, _, o, _ in options} and len(options) >= 15
    assert all(hasattr(cb, "__wrapped__") for cb in commands.values())  # all are checked
    for command, param, option, is_list in options:
        for bad in (float("nan"), float("inf"), float("-inf")):
            value = [0.5, bad] if is_list else bad
            with pytest.raises(UserError, match=f"{option} must be a finite number"):
                commands[command](**{param: value})  # refused before the command's body
