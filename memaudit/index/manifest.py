"""The files of an index directory and their checks: file names, the manifest (read and
validated: an untrusted file), the item list against index.faiss, the content hash, atomic
writes and publishing a finished build (docs/index-format.md "Directory layout").
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from memaudit.common import UserError
from memaudit.index.items import ItemReader

INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.parquet"
MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.npy"


#: The most candidates an index re-ranks with its exact vectors (`--rerank`).
MAX_RERANK = 10_000


def is_lossy_factory(factory: str | None) -> bool:
    """True when a faiss factory stores compressed vectors (PQ, SQ, LSH...): distances are
    then to reconstructions. Flat storage (`Flat`, `IVFn,Flat`, `HNSWm,Flat`, a `RFlat`
    refinement) is exact."""
    f = str(factory or "Flat").replace(" ", "").upper()
    return not f.endswith("FLAT")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """DIR/manifest.json, checked to be a memaudit index manifest (an object with `format`
    "memaudit-index", an `embedder` object with a `name`, a positive integer `dim`, and
    `metric` "ip" or "l2"); anything else is a one-line `UserError`."""
    p = Path(path)
    f = p / MANIFEST_FILE if p.is_dir() else p
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: invalid JSON ({e})") from e
    except OSError as e:
        raise UserError(f"cannot read {f}: {e.strerror}") from e
    problem = None
    if not isinstance(m, dict):
        problem = f"a JSON {type(m).__name__}, not an object"
    elif m.get("format") != "memaudit-index":
        problem = "no \"format\": \"memaudit-index\""
    elif not isinstance(m.get("embedder"), dict) or not isinstance(
            m["embedder"].get("name"), str) or not isinstance(
            m["embedder"].get("config", {}), dict):
        problem = "no embedder {\"name\", \"config\"}"
    elif not isinstance(m.get("dim"), int) or isinstance(m["dim"], bool) or m["dim"] < 1:
        problem = "no positive integer dim"
    elif m.get("metric") not in ("ip", "l2"):
        problem = "metric is not \"ip\" or \"l2\""
    else:
        problem = _field_problem(m)
    if problem:
        raise UserError(f"{f} is not a memaudit index manifest ({problem})")
    return m


#: Optional manifest fields memaudit reads, and their JSON types (null: absent).
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "format_version": int, "factory": str, "rows": int, "groups": int, "input_rows": int,
    "shard_rows": int, "content_hash": str, "faiss_params": str, "preprocessing": str,
    "dedup": str, "created": str, "calibration": dict, "skipped": dict, "source": dict,
    "exact_vectors": dict, "build_seconds": (int, float)}


def _field_problem(m: dict[str, Any]) -> str | None:
    """What is wrongly typed in a manifest's optional fields (None when nothing)."""
    from memaudit.common import check_finite_tree

    for key, kind in _FIELD_TYPES.items():
        v = m.get(key)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool)):
            return f"{key} is a JSON {type(v).__name__}"
    for name, entry in (m.get("calibration") or {}).items():
        fpr = entry.get("fpr") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(fpr, dict | None) or any(
                not isinstance(x, int | float) or isinstance(x, bool)
                for x in (fpr or {}).values()):
            return f"calibration.{name} is not {{\"fpr\": {{RATE: THRESHOLD}}}}"
    try:
        check_finite_tree(m, "")
    except UserError as e:
        return str(e)
    return None


def _check_items(f: Path, items: ItemReader, manifest: dict[str, Any], ngroups: int) -> None:
    """items.parquet agrees with index.faiss and the manifest: integer row ids equal to their
    positions (`ItemReader` finds rows by position), integer group ids inside index.faiss's
    groups, a boolean is_representative, no nulls, one representative per group, the row
    count the manifest records (a truncated or foreign item list is one line, not a crash
    later). Read one row group at a time: memory is a bit per group, whatever the rows."""
    for col, ok in (("row_id", pa.types.is_integer), ("group_id", pa.types.is_integer),
                    ("is_representative", pa.types.is_boolean)):
        if not ok(items.schema.field(col).type):
            raise UserError(f"{f}: column {col} is {items.schema.field(col).type} "
                            "(not a memaudit item list)")
    rows = manifest.get("rows")
    if isinstance(rows, int) and rows != items.num_rows:
        raise UserError(f"{f} holds {items.num_rows} rows, the manifest says {rows} "
                        "(truncated or replaced)")
    seen = np.zeros(ngroups, dtype=bool)
    reps = 0
    for start, t in items.row_groups(["row_id", "group_id", "is_representative"]):
        for col in t.column_names:
            if t.column(col).null_count:
                raise UserError(f"{f}: column {col} has nulls (not a memaudit item list)")
        if not np.array_equal(t.column("row_id").to_numpy(),
                              np.arange(start, start + t.num_rows)):
            raise UserError(f"{f}: row_id is not each row's position from row {start} on "
                            "(not a memaudit item list)")
        gid = t.column("group_id").to_numpy()
        if len(gid) and (gid.min() < 0 or gid.max() >= ngroups):
            raise UserError(f"{f.parent}: items.parquet names groups outside index.faiss "
                            f"(0..{ngroups - 1})")
        g = gid[t.column("is_representative").to_numpy(zero_copy_only=False)]
        reps += len(g)
        seen[g] = True
    if reps != ngroups or int(seen.sum()) != ngroups:
        raise UserError(f"{f}: {int(seen.sum())} of index.faiss's {ngroups} groups have a "
                        f"representative item ({reps} representatives: truncated or replaced)")


def is_index_dir(path: str | Path) -> bool:
    """True when `path` is a folder holding a memaudit index manifest."""
    try:
        read_manifest(Path(path) / MANIFEST_FILE)
    except UserError:
        return False
    return Path(path).is_dir()


def index_hash(manifest: dict[str, Any] | None, index_dir: str | Path | None) -> str | None:
    """The identity an audit run records for its index: the manifest's content hash (over
    every input row's key, caption and image bytes), else the SHA-256 of manifest.json."""
    man = manifest or {}
    for k in ("content_hash", "hash", "sha256"):
        if man.get(k):
            return str(man[k])
    f = Path(index_dir) / MANIFEST_FILE if index_dir else None
    if f is not None and f.is_file():
        import hashlib

        return hashlib.sha256(f.read_bytes()).hexdigest()
    return None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def publish_dir(staging: Path, out: Path) -> Path:
    """Move a finished staging folder to its final name atomically; an existing `out` is
    swapped aside first and deleted after, so `out` is never half-written."""
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)
    return out
