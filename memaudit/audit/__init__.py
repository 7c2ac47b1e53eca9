"""`memaudit audit PLAN.toml`: one plan file -> generate, detect, screen -> OUT/audit.duckdb.

The plan (TOML; relative paths are relative to the plan file)::

    out = "audit-out"                 # OUT: audit.duckdb and images/ go here
    model = "canary"                  # load_model spec
    index = "indexes/canary-pixels"   # an index folder, or an [index] table to build one:
    # [index]                         # (any index-recipe key; memaudit.index.recipe)
    # source = "canary-data/train.parquet"; embedder = "pixels"; factory = "Flat"
    # path = "index"                  # where to build it (default OUT/index)
    # size = 16                       # pixels: default the model's output size
    weights = "sscd.torchscript.pt"   # sscd index only: the TorchScript file you name
    criteria = ["nl2"]
    methods = ["cfg", "static", "amg:spe,dup"]
    seeds = [0, 1]
    steps = 20                        # default: the model's
    guidance_scale = 2.0              # default: the model's
    scheduler = "ddim"                # default: the model's (ddim; euler for SD3/FLUX)
    lora = ["style.safetensors:0.8"]  # optional LoRA fine-tunes, PATH[:SCALE]
    dtype = "fp16"                    # optional: fp32 / fp16 / bf16 (default: the family's)
    memory_limit = "8GB"              # optional: caps the audit database's cache, an index build
    batch_size = 16                   # prompts x seeds per unit of work
    alignment = "auto"                # auto | digits | none
    [params.amg]                      # method parameters (or "amg.c3" = 50 under [params])
    c3 = 50
    [[prompts]]
    file = "triggers_64x.txt"
    label = "trigger"                 # optional; overrides labels read from the file
    [screen]                          # optional: pre-generation screening (METHODS 2)
    score = "wen"                     # a registered score (memaudit.screen), + params
    steps = 1
    seeds = 4
    threshold = 12.0                  # or calibrate from the prompts labelled clean_label:
    clean_label = "generic"
    fpr = 0.01
    [quality]                         # on by default: KID / FD per method against a training
    features = "auto"                 # sample, CLIP score per generation (memaudit.audit.quality)
    reference = 500

Resumable (DESIGN.md "The data flow"): the work is cut into units (one method x one batch of
(prompt, seed) pairs, one screening unit, one quality unit per method); a unit's images are
written first (fixed names, atomic renames), then all its rows and its `units` row are
committed in one transaction. A rerun skips committed units, so a kill at any point loses or
duplicates nothing. The whole plan is validated before anything is written. A run an error
ends is marked failed; the same plan resumes it, a changed plan starts a new run beside a
failed or killed one; a plan that differs from a finished run is refused, naming the
difference, unless `new_run=True`.
"""

from __future__ import annotations

from memaudit.audit.components import Components, default_components, make_method
from memaudit.audit.plan import (
    Plan,
    PromptList,
    ScreenSpec,
    load_plan,
    normalise_params,
    plan_from_dict,
)
from memaudit.audit.resume import plan_difference
from memaudit.audit.runner import (
    KILL_BEFORE_COMMIT_ENV,
    KILL_ENV,
    AuditResult,
    default_threads,
    index_hash,
    run_audit,
    set_threads,
)

__all__ = ["KILL_BEFORE_COMMIT_ENV", "KILL_ENV", "AuditResult", "Components", "Plan",
           "PromptList", "ScreenSpec", "default_components", "default_threads", "index_hash",
           "load_plan", "make_method", "normalise_params", "plan_difference", "plan_from_dict",
           "run_audit", "set_threads"]
