"""Output paths every writer checks first: nothing a user gave as input is ever overwritten.

- `check_output_file(out, inputs, ...)`: refuses a file output that is one of the command's
  inputs (real paths: symlinks and hard links resolved) or lies inside an input folder (an
  index folder's files are inputs too; `overwrite` never changes that), an existing folder,
  an existing file that is not this command's own kind of output unless `overwrite`, and a
  location that cannot be written (naming the real reason).
- `check_output_dir(out, inputs, ...)`: refuses a folder output that is an input, lies
  inside an input folder, or (when it is replaced, or where it writes) holds an input; an
  existing folder that is replaced must be the command's own kind (e.g. a memaudit index).
- `atomic_write(path)`: write to a temporary file in the same folder, then rename, so the
  output is never half-written; OS errors become one-line `UserError`s naming `path`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from memaudit.common import UserError

PathLike = str | os.PathLike


def real(p: PathLike) -> Path:
    """Absolute path with every symlink resolved (works for paths that do not exist yet)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(p))))


def _same(a: Path, b: Path) -> bool:
    if real(a) == real(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    c, p = real(child), real(parent)
    return c != p and c.is_relative_to(p)


def _hard_link_into(out: Path, folder: Path) -> bool:
    """Is the existing file `out` a hard link to a file under `folder`?"""
    try:
        st = out.stat()
    except OSError:
        return False
    if st.st_nlink < 2:
        return False
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                s = os.stat(os.path.join(root, name))
            except OSError:
                continue
            if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


def writable_location(path: PathLike, what: str = "output") -> None:
    """Raise a `UserError` naming the real problem when `path` cannot be created."""
    p = real(path)
    a = p.parent
    while not a.exists():
        if a.parent == a:
            break
        a = a.parent
    if not a.is_dir():
        raise UserError(f"cannot write {what} {path}: {a} is a file, not a folder")
    if not os.access(a, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: no write permission in {a}")


def _inputs(inputs: Iterable[PathLike | None]) -> list[Path]:
    return [Path(os.fspath(i)) for i in inputs if i is not None and os.fspath(i) != ""]


def check_output_file(out: PathLike, inputs: Iterable[PathLike | None] = (), *,
                      overwrite: bool = False, own: Callable[[Path], bool] | None = None,
                      what: str = "output") -> Path:
    """Check a file output before any work (see the module docstring); returns it as a Path.

    `own(path)` tells whether an existing file is this command's own kind of output (e.g. a
    memaudit report), which is replaced without `overwrite`."""
    out = Path(os.fspath(out))
    if out.is_dir():
        raise UserError(f"{what} {out} is a folder; give a file name")
    for inp in _inputs(inputs):
        if _same(out, inp):
            raise UserError(f"{what} {out} is one of this command's inputs ({inp}); "
                            "choose another file")
    for inp in _inputs(inputs):  # every file of an input folder is an input, whatever the flag
        if inp.is_dir() and (_inside(out, inp) or _hard_link_into(out, inp)):
            raise UserError(f"{what} {out} is inside the input folder {inp}; choose a file "
                            "outside it")
    if out.exists() and not overwrite and not (own is not None and own(out)):
        raise UserError(f"{out} exists and is not a memaudit {what}; use --overwrite to "
                        "replace it")
    writable_location(out, what)
    return out


def check_output_dir(out: PathLike, inputs: Iterable[PathLike | None] = (), *,
                     replace: bool = False, own: Callable[[Path], bool] | None = None,
                     writes: Iterable[str] | None = None, what: str = "output folder"
                     ) -> Path:
    """Check a folder output before any work (see the module docstring).

    replace: the folder is swapped for a new one (an existing one must satisfy `own`, and it
    must hold no input); writes: the names memaudit writes inside it (files or subfolders);
    an input at or under one of them is refused. Without `writes`, the whole folder counts."""
    out = Path(os.fspath(out))
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} exists and is a file, not a folder")
    names = list(writes) if writes is not None and not replace else None
    for inp in _inputs(inputs):
        if _same(out, inp):
            raise UserError(f"{what} {out} is one of this command's inputs; choose another")
    for inp in _inputs(inputs):
        if inp.is_dir() and _inside(out, inp):
            raise UserError(f"{what} {out} is inside the input folder {inp}; choose a folder "
                            "outside it")
        if names is None:
            if _inside(inp, out):
                raise UserError(f"{what} {out} holds the input {inp}; choose another folder")
        else:
            for name in names:
                target = out / name
                if _same(target, inp) or _inside(inp, target):
                    raise UserError(f"{what} {out}: memaudit writes {target}, which holds the "
                                    f"input {inp}; choose another folder")
    if replace and out.exists() and own is not None and not own(out):
        raise UserError(f"{out} exists and is not a memaudit {what}; refusing to replace it")
    writable_location(out / "x", what)
    return out


def _os_error(e: OSError, path: Path, what: str) -> UserError:
    reason = e.strerror or type(e).__name__
    if e.errno == errno.ENOENT and path.parent.is_dir():
        reason = f"the folder {path.parent} does not accept new files"
    return UserError(f"cannot write {what} {path}: {reason}")


def make_dirs(path: PathLike, what: str = "output folder") -> Path:
    """`mkdir -p` with a one-line error naming the folder."""
    p = Path(os.fspath(path))
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise UserError(f"cannot create {what} {p}: a file is in the way") from e
    except OSError as e:
        raise _os_error(e, p / "x", what) from e
    return p


@contextmanager
def atomic_write(path: PathLike, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on failure
    removed. OS errors (no such folder, read-only, disk full) are one-line `UserError`s."""
    path = Path(os.fspath(path))
    make_dirs(path.parent, f"folder of the {what}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _os_error(e, path, what) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- is this existing file memaudit's own output? ------------------------------------------
def _head(path: Path, n: int = 4096) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def is_memaudit_html(path: Path) -> bool:
    return b'<meta name="generator" content="memaudit' in _head(path)


def is_memaudit_junit(path: Path) -> bool:
    return b'<testsuites name="memaudit"' in _head(path, 1024)


def is_pdf(path: Path) -> bool:
    return _head(path, 5) == b"%PDF-"


def parquet_with_columns(columns: Iterable[str]) -> Callable[[Path], bool]:
    """A predicate: an existing Parquet file whose columns are exactly `columns`."""
    want = list(columns)

    def check(path: Path) -> bool:
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names) == want
        except Exception:  # noqa: BLE001 - not Parquet, truncated, unreadable: not ours
            return False

    return check
