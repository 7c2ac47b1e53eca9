"""Small real inputs for the audit, report and gate tests (no downloads, a few seconds).

- `make_training_parquet`: a tiny img2dataset-style training set (16x16 grey PNGs), item 0
  planted 4 times under an untrusted caption containing `<script>`.
- `make_tiny_canary`: a randomly initialised, very small canary model folder
  (canary.json + canary.safetensors) loadable with `load_model(path)`.
- `copying_sample`: a stand-in for `memaudit.sampler.sample` that returns the planted training
  image for prompts containing "planted" (a known copy) and noise otherwise, so the report
  and gate see real copies through the real index and criteria.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

PLANTED_CAPTION = "<script>alert(1)</script> planted"


def planted_image(res: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    a = (rng.random((4, 4)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(a).resize((res, res), Image.NEAREST))


def make_training_parquet(path: Path, n: int = 24, res: int = 16) -> Path:
    rng = np.random.default_rng(0)
    keys, caps, pngs = [], [], []
    for i in range(n):
        a = (rng.random((4, 4)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).resize((res, res), Image.NEAREST).save(buf, format="PNG")
        for c in range(4 if i == 0 else 1):
            keys.append(f"item{i}-{c}")
            pngs.append(buf.getvalue())
            caps.append(PLANTED_CAPTION if i == 0 else f"generic item {i}")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": keys, "caption": caps, "png": pngs}), path)
    return path


def make_tiny_canary(out: Path) -> Path:
    from memaudit.canary.model import CanaryConfig, CanaryNet, save_canary

    torch.manual_seed(0)
    cfg = CanaryConfig(resolution=16, block_out_channels=(8, 8), layers_per_block=1,
                       cross_attention_dim=16, attention_head_dim=4)
    save_canary(CanaryNet(cfg), out, {"default_guidance_scale": 2.0, "default_steps": 3})
    return out


@dataclass
class _Out:
    images: torch.Tensor
    trace: list
    unet_rows: float
    forwards: int
    wall_seconds: float
    prompts: list


def copying_sample(model, prompts, seeds, guidance, steps=3, guidance_scale=2.0,
                   scheduler="ddim", criterion=None, **_):
    """Planted prompts under `cfg` reproduce training item 0; everything else is noise."""
    planted = torch.from_numpy(planted_image().copy()).float().div(255).expand(3, -1, -1)
    imgs = []
    for p, s in zip(prompts, seeds, strict=True):
        if "planted" in p and getattr(guidance, "name", "") == "cfg":
            imgs.append(planted.clone())
        else:
            g = torch.Generator().manual_seed(1000 + int(s) + len(p))
            imgs.append(torch.rand(1, 16, 16, generator=g).expand(3, -1, -1).clone())
    b = len(prompts)
    trace = [{"t": 999 - 333 * j, "u": 1 - j / steps, "guidance_norm": [0.5] * b}
             for j in range(steps)]
    return _Out(torch.stack(imgs), trace, 2.0 * steps, steps, 0.01, list(prompts))


def write_plan(tmp: Path, index_src: Path, model: str, methods=("cfg", "static"),
               seeds=(0, 1), screen: bool = True, extra: str = "",
               criteria=("nl2", "l2-tiled"), batch_size: int = 4) -> Path:
    (tmp / "trig.txt").write_text(f"{PLANTED_CAPTION}\nanother planted one\n")
    (tmp / "gen.txt").write_text("a generic item\nsomething else\n")
    screen_toml = '[screen]\nsteps = 1\nseeds = 2\nclean_label = "generic"\n' if screen else ""
    plan = tmp / "plan.toml"
    import json

    plan.write_text(f"""
out = "out"
model = {json.dumps(model)}
criteria = {json.dumps(list(criteria))}
methods = {json.dumps(list(methods))}
seeds = {json.dumps(list(seeds))}
steps = 3
batch_size = {batch_size}
alignment = "none"
{extra}
[index]
source = {json.dumps(str(index_src))}
embedder = "pixels"
[[prompts]]
file = "trig.txt"
label = "trigger"
[[prompts]]
file = "gen.txt"
label = "generic"
{screen_toml}
""")
    return plan


def copying_audit(tmp: Path) -> Path:
    """A real index and real criteria over `copying_sample` outputs -> the audit DB path."""
    from memaudit.audit import default_components, load_plan, run_audit

    src = make_training_parquet(tmp / "train.parquet")
    canary = make_tiny_canary(tmp / "canary")
    comp = default_components()
    comp.sample = copying_sample
    # nl2 only: on 24 items the calibrated l2-tiled cut (1% FPR) also flags noise
    plan = write_plan(tmp, src, str(canary), criteria=("nl2",))
    res = run_audit(load_plan(plan), components=comp,
                    device="cpu")
    return res.db_path


def crafted_db(audit_db: Path, folder: Path, kind: str, secret: Path) -> Path:
    """A copy of a real audit database, altered as `kind` says with DuckDB itself (as an
    attacker would): tests/test_untrusted_db.py lists the kinds."""
    import shutil

    import duckdb

    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "audit.duckdb"
    shutil.copy(audit_db, db)
    s = str(secret).replace("'", "''")
    con = duckdb.connect(str(db))
    if kind == "view-over-read-text":  # every prompt the gate and report print gets the file
        con.execute("ALTER TABLE prompts RENAME TO prompts_data")
        con.execute("CREATE VIEW prompts AS SELECT id, text || (SELECT content FROM "
                    f"read_text('{s}')) AS text, sources_json, label FROM prompts_data")
    elif kind == "stored-macro":  # shadows the built-in aggregate the gate's query calls
        con.execute(f"CREATE MACRO arg_max(a, b) AS (SELECT content FROM read_text('{s}'))")
    elif kind == "view-over-glob":  # memaudit's own view redefined to list a folder
        d = str(secret.parent).replace("'", "''")
        con.execute("CREATE OR REPLACE VIEW method_summary AS SELECT file AS method FROM "
                    f"glob('{d}/*')")
    elif kind == "extra-table":
        con.execute(f"CREATE TABLE notes AS SELECT content FROM read_text('{s}')")
    elif kind == "extra-column":
        con.execute("ALTER TABLE runs ADD COLUMN note TEXT")
    elif kind == "view-raises":
        con.execute("CREATE OR REPLACE VIEW method_summary AS SELECT * FROM "
                    "(SELECT error('crafted failure') AS x)")
    elif kind == "plan-json-not-json":
        con.execute("UPDATE runs SET plan_json = '{\"methods\": [not json'")
    else:
        raise ValueError(kind)
    con.close()
    return db
