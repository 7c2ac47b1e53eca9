"""Memory limits: `--memory-limit` (index build, audit) and a plan's `memory_limit` (issue 20).

A limit is a size ("4GB", "512MiB", "2.5G", or bytes as an integer) that caps the peak RSS
of one process, stage by stage: what the process already holds (Python, torch, faiss, about
0.8 GB) plus what a stage may add, its budget: an index build's grouping (DuckDB's
`memory_limit`, spilling to disk), its IVF training sample, the blocks in which it fills the
index, one shard of embeddings (checked before the build starts; on Ray it is each actor's
share); in an audit, the audit database connection (DuckDB) and an index it builds. Without
a limit the budgets come from half of this machine's RAM. The split is `stage_budgets`;
measured peaks: docs/scaling.md and docs/benchmarks.md ("Scale").
"""

from __future__ import annotations

import os
import re

from memaudit.common import UserError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}
#: the smallest limit accepted, and the least a stage is given above what a process uses
MIN_LIMIT = 256 * 1024**2
MIN_STAGE = 128 * 1024**2


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


def stage_budgets(limit: int | None, used: int | None = None) -> dict[str, int]:
    """How one process splits what its limit leaves above what it already uses (`used`,
    default: its RSS now: Python, torch, faiss, pyarrow, DuckDB loaded, ~0.8 GB) among an
    index build's stages; each stage runs alone, so each may take most of it:

    - `grouping`: DuckDB's memory_limit (60%; it spills to disk beyond it);
    - `train`: the IVF training sample's vectors (25%);
    - `fill_block`: the compressed codes of one block of the index before it is written
      and merged into the on-disk inverted lists (25%);
    - `shard`: one shard's embeddings and pending tensors on a worker (50%).

    An explicit limit that leaves less than 128 MiB is a one-line `UserError`.
    """
    total = effective_limit(limit)
    used = (rss_bytes("VmRSS") or 0) if used is None else int(used)
    avail = total - used
    if limit is not None and avail < MIN_STAGE:
        raise UserError(f"--memory-limit {format_bytes(total)} leaves "
                        f"{format_bytes(max(0, avail))} above the {format_bytes(used)} this "
                        f"process already uses; raise it")
    avail = max(avail, MIN_STAGE)
    return {"limit": total, "available": avail, "grouping": avail * 6 // 10,
            "train": avail // 4, "fill_block": max(8 * 1024**2, avail // 4),
            "shard": avail // 2}


def format_bytes(n: float) -> str:
    """1536 -> "1.5 KiB" (binary units, for messages)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# -- measuring (benchmarks and the build's own log) ----------------------------------------
#: the stages of the last index build in this process: name, seconds, peak RSS in bytes
last_stages: list[dict[str, float | str]] = []
#: the stage running now ("" between stages): lets a sampler attribute what it reads
current_stage: list[str] = [""]


def rss_bytes(field: str = "VmRSS") -> int | None:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM, RssAnon...),
    in bytes; None where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset this process' peak RSS (VmHWM) to its current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class stage:  # noqa: N801 - used as a context manager, like a function
    """`with stage("grouping"):` appends {stage, seconds, peak_rss} to `last_stages`: the
    peak RSS reached inside the block (VmHWM reset on entry)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> stage:
        import time

        self._reset = reset_peak()
        self._t0 = time.perf_counter()
        current_stage[0] = self.name
        return self

    def __exit__(self, *exc) -> None:
        import time

        current_stage[0] = ""
        last_stages.append({"stage": self.name,
                            "seconds": round(time.perf_counter() - self._t0, 2),
                            "peak_rss": rss_bytes("VmHWM") if self._reset else None})
