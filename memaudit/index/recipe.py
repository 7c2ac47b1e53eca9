"""Index recipes: `indexes/NAME.toml` holds the arguments of `build_index`.

```toml
data = "data/train/*.parquet"    # file, directory or glob (relative to the working dir)
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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memaudit.common import UserError, read_toml

BUILD_KEYS = {"data", "source", "embedder", "out", "factory", "device", "batch_size",
              "image_col", "caption_col", "key_col", "shard_rows", "calibrate", "workers",
              "overwrite", "train_sample", "embedder_opts", "calibration", "faiss_params",
              "rerank"}
EMBEDDER_KEYS = {"weights", "weights_sha256", "preprocessing", "short_edge", "crop", "size",
                 "model", "pretrained", "model_config"}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe into `build_index` keyword arguments (`source`, `embedder`, `out`...)."""
    p = Path(path)
    data = read_toml(p, "recipe")
    unknown = set(data) - BUILD_KEYS - EMBEDDER_KEYS
    if unknown:
        raise UserError(f"{p}: unknown keys {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    opts = dict(data.get("embedder_opts", {}))
    for k, v in data.items():
        if k in EMBEDDER_KEYS:
            opts[k] = v
        elif k in ("data", "source"):
            out["source"] = v
        elif k == "calibration":
            out["calibration_opts"] = dict(v)
        elif k != "embedder_opts":
            out[k] = v
    if opts:
        out["embedder_opts"] = opts
    for required in ("source", "embedder"):
        if required not in out:
            raise UserError(f"{p}: missing key {'data' if required == 'source' else required!r}")
    if "out" not in out:
        out["out"] = str(p.with_suffix(""))
    return out
