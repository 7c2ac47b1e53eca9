"""Write the CLI reference (docs/cli.md) from the command tree itself, so it cannot drift.

Usage: `python -m memaudit.cli.reference > docs/cli.md` (a test checks it is current).
"""

from __future__ import annotations

import typer
from rich.text import Text


def plain(text: str) -> str:
    """A help string as `--help` shows it: Typer renders help as Rich markup, so a literal
    bracket is written escaped (`\\[auto]`) and shown without the backslash."""
    return Text.from_markup(text).plain


def _param_row(p) -> str:
    if p.param_type_name == "argument":
        name = f"`{(p.metavar or p.name).upper()}`"
        kind = "argument"
    else:
        name = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
        kind = "flag" if getattr(p, "is_flag", False) else "option"
    help_text = plain(getattr(p, "help", None) or "").replace("|", "\\|").replace("\n", " ")
    default = ""
    if kind != "argument" and p.default is not None and p.default is not False \
            and p.default not in ((), []) and not callable(p.default):
        default = f"`{p.default}`"
    if p.required:
        default = "required"
    return f"| {name} | {kind} | {default} | {help_text} |"


def _walk(cmd, path: list[str], out: list[str]) -> None:
    if hasattr(cmd, "commands"):
        for name in sorted(cmd.commands):
            _walk(cmd.commands[name], [*path, name], out)
        return
    out.append(f"## `{' '.join(path)}`\n")
    doc = plain(cmd.help or "").strip()
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
        "progress bars. Errors a user can cause print one line and exit 2; exit codes",
        "(0 done/pass, 1 gate failed, 2 usage or input error, 3 incomplete audit or memaudit",
        "failure): docs/report.md.",
        "",
    ]
    _walk(root, ["memaudit"], out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
