"""Memory limits: `--memory-limit` (index build, audit) and a plan's `memory_limit` (issue 20).

A limit is a size ("4GB", "512MiB", "2.5G", or bytes as an integer) that caps the peak of
each stage in one process: an index build's grouping (DuckDB's `memory_limit`, spilling to
disk), its IVF training sample, the blocks in which it fills the index, one shard of
embeddings; an audit actor's item cache and the audit database connection. Without a limit
the stages take half of this machine's RAM as their budget. How the budget is split is
`stage_budgets`; the measured peaks are in docs/scaling.md and docs/benchmarks.md.
"""

from __future__ import annotations

import os
import re

from memaudit.common import UserError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}
#: below this a build cannot run its stages (DuckDB alone needs a few blocks per thread)
MIN_LIMIT = 256 * 1024**2


def parse_memory(value: str | int | float | None, what: str = "--memory-limit") -> int | None:
    """"4GB" (decimal units), "4GiB" (binary), "512M", or a number of bytes -> bytes; None
    stays None. Anything else, or less than 256 MiB, is a one-line `UserError`."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise UserError(f"{what} must be a size such as \"4GB\", got {value!r}")
    if isinstance(value, int | float):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise UserError(f"{what} must be a size such as \"4GB\" or \"512MiB\", "
                            f"got {value!r}")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n < MIN_LIMIT:
        raise UserError(f"{what} {value!r} is below the minimum of 256 MiB")
    return int(n)


def machine_memory() -> int:
    """Physical memory of this machine in bytes."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 1024**3


def effective_limit(limit: int | None) -> int:
    """The limit itself, or half of this machine's RAM when none is set."""
    return int(limit) if limit else machine_memory() // 2


def stage_budgets(limit: int | None) -> dict[str, int]:
    """How one process splits its limit among an index build's finalisation stages (each
    runs alone, so each may use most of it; the rest covers Python, pyarrow and faiss):

    - `grouping`: DuckDB's memory_limit (half; it spills to disk beyond it);
    - `train`: the IVF training sample's vectors (a quarter);
    - `fill_block`: the compressed codes of one block of the index before it is written
      and merged into the on-disk inverted lists (a quarter);
    - `shard`: one shard's embeddings and pending tensors on a worker (half).
    """
    total = effective_limit(limit)
    return {"limit": total, "grouping": max(MIN_LIMIT // 2, total // 2),
            "train": total // 4, "fill_block": max(16 * 1024**2, total // 4),
            "shard": total // 2}


def format_bytes(n: float) -> str:
    """1536 -> "1.5 KiB" (binary units, for messages)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
