"""The `memaudit` command: a thin Typer layer over the library.

Each stage's commands live in their own module with a `register(app)` function. Errors a
user can cause (`UserError`) end in one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys

import typer

from memaudit.common import UserError, set_quiet

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


def _register_all() -> None:
    from memaudit.cli import audit, canary, detect, generate, index, screen

    for module in (index, detect, generate, canary, screen, audit):
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Returns normally on success; exits non-zero on failure.

    Usage errors print Typer's message (exit 2); `UserError`s end in one line (exit 2);
    commands may return or `typer.Exit` with a code (the gate's 1).
    """
    try:
        code = app(args=argv, standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename or e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        # Typer vendors click, so match its usage errors and aborts by shape, not by class.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            print("aborted", file=sys.stderr)
            sys.exit(1)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
