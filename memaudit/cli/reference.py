"""Write the CLI reference (docs/cli.md) from the command tree itself, so it cannot drift.

Usage: `python -m memaudit.cli.reference > docs/cli.md` (a test checks it is current).
"""

from __future__ import annotations

import click
import typer


def _param_row(p: click.Parameter) -> str:
    if isinstance(p, click.Argument):
        name = p.human_readable_name.upper()
        kind = "argument"
    else:
        name = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
        kind = "flag" if getattr(p, "is_flag", False) else "option"
    help_text = (getattr(p, "help", None) or "").replace("|", "\\|").replace("\n", " ")
    default = ""
    if not isinstance(p, click.Argument) and p.default not in (None, False, (), []) \
            and not callable(p.default):
        default = f"`{p.default}`"
    if p.required:
        default = "required"
    return f"| {name if kind != 'argument' else '`' + name + '`'} | {kind} | {default} | {help_text} |"


def _walk(cmd: click.Command, path: list[str], out: list[str]) -> None:
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            _walk(cmd.commands[name], [*path, name], out)
        return
    out.append(f"## `{' '.join(path)}`\n")
    doc = (cmd.help or "").strip()
    if doc:
        out.append(doc.split("\n\n")[0].replace("\n", " ") + "\n")
    params = [p for p in cmd.params if p.name != "help"]
    if params:
        out.append("| name | kind | default | help |\n| --- | --- | --- | --- |")
        out.extend(_param_row(p) for p in params)
        out.append("")


def render() -> str:
    from memaudit.cli import app

    root = typer.main.get_command(app)
    out = [
        "# CLI reference",
        "",
        "Generated from the command tree by `python -m memaudit.cli.reference > docs/cli.md`;",
        "`memaudit COMMAND --help` prints the same. Global flag: `memaudit --quiet` silences",
        "progress bars. Errors a user can cause print one line and exit 2.",
        "",
    ]
    _walk(root, ["memaudit"], out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
