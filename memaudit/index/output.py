"""Where an index may be written (issue 11): never over a source, only over an index.

`check_index_out` runs before any work: `overwrite` replaces only a folder that is a memaudit
index, never one that is, holds or lies inside a source path, and the `DIR.partial/` build
folder obeys the same rules. `remove_partial` deletes a build folder only when it holds
nothing but what the builder writes (state.json, shard_* files, the final/ staging folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from memaudit.common import UserError


def check_index_out(out: Path, source: str | Path, files: list[Path], overwrite: bool,
                    partial_suffix: str = ".partial") -> None:
    """Refuse an index folder (and its build folder) that would overwrite an input or a
    folder memaudit did not write (`memaudit.paths.check_output_dir`)."""
    from memaudit.index.training_index import is_index_dir
    from memaudit.paths import check_output_dir

    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists (use --overwrite to replace it)")
    src = Path(str(source))
    inputs: list[Path] = [*([src] if src.is_dir() else []), *files]
    check_output_dir(out, inputs, replace=True, own=is_index_dir, what="index folder")
    partial = out.with_name(out.name + partial_suffix)
    check_output_dir(partial, inputs, replace=True, own=is_partial, what="build folder")


def is_partial(path: Path) -> bool:
    """A `DIR.partial/` memaudit made: its state.json, shards and staging folder only."""
    return path.is_dir() and all(
        p.name == "state.json" or p.name.startswith("shard_") or p.name == "final"
        or p.name.endswith(".tmp") for p in path.iterdir())


def remove_partial(partial: Path) -> None:
    """Delete a build folder memaudit made; refuse one holding anything else."""
    if not is_partial(partial):
        raise UserError(f"{partial} holds files memaudit did not write; remove it yourself")
    shutil.rmtree(partial)
