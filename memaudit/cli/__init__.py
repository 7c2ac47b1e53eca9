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
    """Console entry point: usage errors are Typer's (exit 2); `UserError`s end in one line."""
    try:
        app(args=argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename or e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
