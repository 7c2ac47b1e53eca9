"""Small things every stage shares: user errors, device choice, progress bars, hashing."""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
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


class NonFiniteError(UserError):
    """A generation, score or weight that is NaN or infinite: an error of the unit that made
    it (exit 3: the result is incomplete, never a pass and never a score)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_INCOMPLETE)


# --- numbers a user gives: one check for CLI options, plan/recipe fields and parameters -----
def user_number(value: object, name: str, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> float:
    """A number a user gave (command-line text, a TOML/JSON value): finite and within
    [lo, hi] (`lo_open` / `hi_open`: exclusive), else a one-line `UserError` naming `name`.
    Returns it as a float (an int with `integer`)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise UserError(f"{name} must be {kind}, got {text!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{name} must be a number, got {value!r}")
    if isinstance(value, int) and not integer:
        value = float(value) if abs(value) < 2 ** 1000 else math.inf
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if integer and value != int(value):
        raise UserError(f"{name} must be an integer, got {value!r}")
    for bound, is_open, below in ((lo, lo_open, True), (hi, hi_open, False)):
        if bound is None:
            continue
        bad = (value <= bound if is_open else value < bound) if below else \
            (value >= bound if is_open else value > bound)
        if bad:
            op = (">" if is_open else ">=") if below else ("<" if is_open else "<=")
            shown = f"{value:g}" if isinstance(value, float) else str(value)[:40]
            raise UserError(f"{name} must be {op} {bound:g}, got {shown}")
    return int(value) if integer else float(value)


def check_finite_tree(obj: object, where: str) -> object:
    """Every float in a parsed TOML/JSON document (nested tables and lists) is finite, else
    a one-line `UserError` naming its key path (TOML and Python's JSON read `nan`, `inf`)."""
    stack: list[tuple[object, str]] = [(obj, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, float):
            user_number(item, f"{where} {path}".strip())
        elif isinstance(item, dict):
            stack += [(v, f"{path}.{k}" if path else str(k)) for k, v in item.items()]
        elif isinstance(item, list | tuple):
            stack += [(v, f"{path}[{i}]") for i, v in enumerate(item)]
    return obj


def require_finite(values: object, what: str) -> None:
    """Raise `NonFiniteError` when an array or tensor (images, scores, weights) holds NaN or
    infinities; `what` names it (e.g. "generation of prompt 'x' seed 3")."""
    import numpy as np

    if hasattr(values, "detach"):  # a torch tensor
        import torch

        if values.is_floating_point() and not bool(torch.isfinite(values.detach()).all()):
            raise NonFiniteError(f"{what} holds NaN or infinite values")
        return
    arr = np.asarray(values)
    if arr.dtype.kind in "fc" and not bool(np.isfinite(arr).all()):
        raise NonFiniteError(f"{what} holds NaN or infinite values")


def check_finite_weights(state: dict, what: str) -> None:
    """A weights file (a name -> tensor dict) whose tensors hold NaN or infinities is refused
    in one line (exit 2: the file is bad input), naming how many tensors and the first."""
    import torch

    bad = [k for k, v in state.items() if hasattr(v, "is_floating_point")
           and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{what}: {len(bad)} tensor(s) hold NaN or infinite values "
                        f"(first: {bad[0]})")


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
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{what} {p}: invalid TOML ({e})") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    check_finite_tree(data, f"{what} {p}:")
    return data


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
    check_finite_tree(params, f"{owner} parameter")
    return params_cls(**params)

