"""Small things every stage shares: user errors, device choice, progress bars, hashing."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


#: Exit codes of every command (docs/report.md "Exit codes"): 0 pass / done, 1 the gate
#: failed (a copy rate or screening score over its limit), 2 a usage or input error,
#: 3 the audit is incomplete or memaudit itself failed (an unexpected exception).
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3


class UserError(Exception):
    """An error the user caused (bad path, missing column, unknown method...).

    The CLI prints its message on one line and exits with `exit_code`; never a traceback.
    """

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def resolve_device(device: str | None = None) -> str:
    """`None`/"auto" -> "cuda" when available, else "cpu"; anything else is checked."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available here")
    try:
        torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown device {device!r}") from e
    return device


_QUIET = os.environ.get("MEMAUDIT_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    """Silence progress bars (`--quiet`)."""
    global _QUIET
    _QUIET = quiet


@contextmanager
def progress_bar(description: str, total: int | None = None, unit: str = "rows"):
    """A rich progress bar on stderr (rate and ETA); yields `advance(n)`. Silent when quiet."""
    if _QUIET or (not sys.stderr.isatty() and os.environ.get("MEMAUDIT_PROGRESS") != "1"):
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True)) as prog:
        task = prog.add_task(description, total=total, rate="")

        def advance(n: int = 1) -> None:
            prog.advance(task, n)
            speed = prog.tasks[0].speed
            if speed:
                prog.update(task, rate=f"{speed:.1f} {unit}/s")

        yield advance


def track(items: Iterable[T], description: str, total: int | None = None,
          unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar."""
    with progress_bar(description, total=total, unit=unit) as advance:
        for item in items:
            yield item
            advance(1)


def read_toml(path: str | Path, what: str = "file") -> dict:
    """A TOML file as a dict; a missing file or bad TOML is a one-line `UserError`."""
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{what} {p}: invalid TOML ({e})") from e


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def package_versions(names: Iterable[str] = ("memaudit", "torch", "diffusers", "faiss-cpu",
                                             "numpy", "pyarrow", "duckdb", "transformers",
                                             "open_clip_torch")) -> dict[str, str]:
    """Installed versions of the packages that decide a result, plus Python's."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def make_params(params_cls: type, params: dict, owner: str) -> object:
    """`params_cls(**params)` for a Params dataclass; unknown names are a one-line
    `UserError` naming `owner` (e.g. "method 'amg'") and the known names."""
    from dataclasses import fields

    known = {f.name for f in fields(params_cls)}
    unknown = set(params) - known
    if unknown:
        raise UserError(f"unknown parameter(s) {', '.join(sorted(unknown))} for {owner}; "
                        f"known: {', '.join(sorted(known)) or '(none)'}")
    return params_cls(**params)

