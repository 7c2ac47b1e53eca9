"""Index recipes: `indexes/NAME.toml` holds the arguments of `build_index`.

```toml
data = "data/train/*.parquet"    # a training set in any layout (docs/index-format.md "Input"):
                                 # file, directory or glob (relative to the working dir)
embedder = "sscd"
out = "indexes/train-sscd"
factory = "Flat"
batch_size = 64
[embedder_opts]
weights = "weights/sscd_disc_mixup.torchscript.pt"
preprocessing = "official"
```
Top-level embedder options (`weights`, `preprocessing`, `size`, `model`, `pretrained`,
`model_config`) are accepted too and merged into `embedder_opts`.

`index_options` is the one reader of such a table: a recipe file and an audit plan's
`[index]` table (where paths are relative to the plan and `path` names the folder) go
through it, so a key means the same thing, with the same type check, in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memaudit.common import UserError, read_toml

BUILD_KEYS = {"data", "source", "embedder", "out", "path", "factory", "device", "batch_size",
              "image_col", "caption_col", "key_col", "shard_rows", "calibrate", "workers",
              "overwrite", "train_sample", "embedder_opts", "calibration", "faiss_params",
              "rerank", "layout", "instance_prompt", "class_prompt"}
EMBEDDER_KEYS = {"weights", "weights_sha256", "preprocessing", "short_edge", "crop", "size",
                 "model", "pretrained", "model_config"}
#: keys a plan's [index] table may not set (the plan sets them, or builds only once)
PLAN_EXCLUDED = {"device", "overwrite"}

_STR = ("a string", lambda v: isinstance(v, str) and v != "")
_POS_INT = ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
            and v >= 1)
_INT = ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
_BOOL = ("true or false", lambda v: isinstance(v, bool))
_NUM = ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool))
_SIZE = ("N, \"HxW\" or [H, W]", lambda v: (isinstance(v, int) and not isinstance(v, bool)
                                             and v >= 1) or isinstance(v, str)
         or (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x >= 1
                                                          for x in v)))
TYPES: dict[str, tuple[str, Any]] = {
    "data": _STR, "source": _STR, "embedder": _STR, "out": _STR, "path": _STR,
    "factory": _STR, "device": _STR, "image_col": _STR, "caption_col": _STR,
    "key_col": _STR, "batch_size": _POS_INT, "shard_rows": _POS_INT, "workers": _POS_INT,
    "train_sample": _POS_INT, "calibrate": _BOOL, "overwrite": _BOOL,
    "faiss_params": _STR, "rerank": _POS_INT, "layout": _STR, "instance_prompt": _STR,
    "class_prompt": _STR,
    "weights": _STR, "weights_sha256": _STR, "preprocessing": _STR, "short_edge": _POS_INT,
    "crop": _POS_INT, "size": _SIZE, "model": _STR, "pretrained": _STR, "model_config": _STR,
}
CALIBRATION_TYPES: dict[str, tuple[str, Any]] = {
    "sample": _POS_INT, "seed": _INT, "k": _POS_INT, "grid": _POS_INT, "alpha": _NUM,
    "fprs": ("a list of numbers in (0, 1)", lambda v: isinstance(v, list) and v and all(
        isinstance(f, int | float) and not isinstance(f, bool) and 0 < f < 1 for f in v)),
    "criteria": ("a list of criterion names", lambda v: isinstance(v, list)
                 and all(isinstance(c, str) for c in v)),
}


def _check(where: str, key: str, value: Any, types: dict[str, tuple[str, Any]]) -> None:
    what, ok = types[key]
    if not ok(value):
        raise UserError(f"{where}: {key} must be {what}, got {value!r}")


def _path(base: Path | None, value: str) -> str:
    if "://" in value or base is None:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def index_options(table: Any, where: str, base: Path | None = None,
                  plan: bool = False) -> dict[str, Any]:
    """A recipe / plan [index] table -> `build_index` keyword arguments, every key and type
    checked (one-line `UserError`s naming `where` and the key). `base`: folder relative paths
    are taken from (None: the working dir). `plan`: `device` and `overwrite` are not allowed
    and `embedder` defaults to pixels, `factory` to Flat."""
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table of build options")
    allowed = BUILD_KEYS | EMBEDDER_KEYS
    if plan:
        allowed = allowed - PLAN_EXCLUDED
    unknown = set(table) - allowed
    if unknown:
        raise UserError(f"{where}: unknown keys {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(sorted(allowed))}")
    opts_table = table.get("embedder_opts", {})
    if not isinstance(opts_table, dict):
        raise UserError(f"{where}: [embedder_opts] must be a table")
    bad = set(opts_table) - EMBEDDER_KEYS
    if bad:
        raise UserError(f"{where}: unknown embedder_opts {', '.join(sorted(bad))}; known: "
                        f"{', '.join(sorted(EMBEDDER_KEYS))}")
    out: dict[str, Any] = {}
    opts: dict[str, Any] = {}
    for k, v in [*opts_table.items(), *table.items()]:
        if k == "embedder_opts":
            continue
        if k == "calibration":
            if not isinstance(v, dict):
                raise UserError(f"{where}: [calibration] must be a table")
            badc = set(v) - set(CALIBRATION_TYPES)
            if badc:
                raise UserError(f"{where}: unknown calibration keys {', '.join(sorted(badc))}")
            for ck, cv in v.items():
                _check(where, ck, cv, CALIBRATION_TYPES)
            out["calibration_opts"] = dict(v)
            continue
        _check(where, k, v, TYPES)
        if k == "size":
            from memaudit.embedders.pixels import parse_size

            try:
                parse_size(v)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
        if k in ("weights", "model_config"):
            v = _path(base, v)
        elif k == "pretrained" and base is not None and (base / v).is_file():
            v = _path(base, v)
        if k in EMBEDDER_KEYS:
            opts[k] = v
        elif k in ("data", "source"):
            if "source" in out:
                raise UserError(f"{where}: give one of data / source")
            out["source"] = _path(base, v)
        elif k in ("out", "path"):
            if "out" in out:
                raise UserError(f"{where}: give one of out / path")
            out["out"] = _path(base, v)
        else:
            out[k] = v
    if opts:
        out["embedder_opts"] = opts
    if plan:
        out.setdefault("embedder", "pixels")
        out.setdefault("factory", "Flat")
    if "source" not in out:
        raise UserError(f"{where}: missing key 'data' (the training set)")
    if "embedder" not in out:
        raise UserError(f"{where}: missing key 'embedder'")
    from memaudit.embedders import EMBEDDERS

    if out["embedder"] not in EMBEDDERS:
        raise UserError(f"{where}: unknown embedder {out['embedder']!r}; choose one of "
                        f"{', '.join(EMBEDDERS)}")
    return out


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe into `build_index` keyword arguments (`source`, `embedder`, `out`...)."""
    p = Path(path)
    out = index_options(read_toml(p, "recipe"), str(p))
    if "out" not in out:
        out["out"] = str(p.with_suffix(""))
    return out
