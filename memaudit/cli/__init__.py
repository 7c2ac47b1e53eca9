"""The `memaudit` command: a thin Typer layer over the library.

Each stage's commands live in their own module with a `register(app)` function. Errors a
user can cause (`UserError`) end in one line on stderr and exit 2; exit codes: `main`.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from memaudit.common import EXIT_INCOMPLETE, EXIT_USAGE, UserError, set_quiet
from memaudit.text import terminal_text

app = typer.Typer(
    name="memaudit",
    help="Audit text-to-image diffusion models for memorization.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    set_quiet(quiet)


def _option_name(param) -> str:
    decls = getattr(param.default, "param_decls", None) or ()
    longs = [d for d in decls if d.startswith("--")]
    return longs[0] if longs else "--" + param.name.replace("_", "-")


def _checked_numbers(fn):
    """`fn` with every float argument checked finite by the one number check
    (`memaudit.common.user_number`) before it runs, whatever the option: Typer reads `nan`
    and `inf` as floats. Ranges are each option's `min`/`max`."""
    import functools
    import inspect

    from memaudit.common import user_number

    names = {p.name: _option_name(p) for p in inspect.signature(fn).parameters.values()}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for key, value in kwargs.items():
            for v in value if isinstance(value, list | tuple) else (value,):
                if isinstance(v, float):
                    user_number(v, names.get(key, key))
        return fn(*args, **kwargs)

    return wrapper


def _register_all() -> None:
    from memaudit.cli import audit, calibrate, canary, detect, generate, index, screen

    for module in (index, detect, generate, canary, screen, audit, calibrate):
        module.register(app)
    groups = [app] + [g.typer_instance for g in app.registered_groups]
    for group in groups:
        for command in group.registered_commands:
            command.callback = _checked_numbers(command.callback)


_register_all()


def _error(message: str) -> None:
    print(f"error: {terminal_text(' '.join(str(message).split()))}", file=sys.stderr)


def _package_path(filename: str) -> str | None:
    """`memaudit/x/y.py` for a file of this package (found by the package's own folder,
    not by a name that any clone's folder may carry), else None."""
    from pathlib import Path

    import memaudit

    try:
        rel = Path(filename).resolve().relative_to(Path(memaudit.__file__).resolve().parent)
    except (ValueError, OSError):
        return None
    return f"memaudit/{rel.as_posix()}"


def _where(e: BaseException) -> str:
    """file:line of the innermost frame that raised `e` (memaudit's own when there is one)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [(f, name) for f in frames if (name := _package_path(f.filename)) is not None]
    if ours:
        f, name = ours[-1]
        return f"{name}:{f.lineno}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Returns normally on success; exits non-zero on failure.

    Exit codes (the one mechanism for every command; docs/report.md "Exit codes"):
    0 pass / done; 1 the gate failed; 2 a usage or input error (Typer's usage errors,
    `UserError`, a path that does not exist); 3 the audit is incomplete (the gate on an
    unfinished run) or memaudit itself failed: an unexpected exception ends in one line
    naming it and where it was raised (MEMAUDIT_DEBUG=1 prints the traceback instead);
    130 interrupted (Ctrl-C). Every message is one line with control characters escaped.
    """
    try:
        code = app(args=argv, standalone_mode=False)
    except UserError as e:
        _error(str(e))
        sys.exit(e.exit_code)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        _error(f"{e.strerror or type(e).__name__}: {e.filename or e}")
        sys.exit(EXIT_USAGE)
    except Exception as e:
        # Typer vendors click, so match its usage errors and aborts by shape, not by class.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            if type(e).__name__ == "NoArgsIsHelpError":  # `memaudit` alone: the help
                e.show()
            else:  # one line, like every other error
                ctx = getattr(e, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                _error(e.format_message() + hint)
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        if os.environ.get("MEMAUDIT_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        else:
            _error(f"memaudit failed: {type(e).__name__}: {e} (at {_where(e)}); this is a "
                   "bug, not your input: rerun with MEMAUDIT_DEBUG=1 for the traceback")
        sys.exit(EXIT_INCOMPLETE)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
