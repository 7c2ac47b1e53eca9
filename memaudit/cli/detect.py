"""CLI: `memaudit detect IMAGES... --index DIR` (copy detection of any image folder)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("detect")
    def detect(
        images: list[Path] = typer.Argument(..., help="Image files and/or folders (recursive)."),
        index: Path = typer.Option(..., "--index", help="Training index directory."),
        criterion: list[str] = typer.Option(
            [], "--criterion", "-c",
            help="nl2, l2-tiled, sscd, clip (repeatable; default: all the index supports)."),
        out: Path | None = typer.Option(None, "--out", help="Write the results as Parquet."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Let --out replace a file "
                                       "that is not a detect table memaudit wrote."),
        weights: str | None = typer.Option(None, "--weights", help="sscd: the TorchScript file "
                                           "the index was built with (checked against its "
                                           "recorded SHA-256)."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default auto)."),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per batch."),
        limit: int = typer.Option(50, "--show", help="Rows printed on the terminal."),
    ) -> None:
        """Nearest training item, score and copy verdicts (fixed and calibrated) per image."""
        import pyarrow.parquet as pq
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from memaudit.common import resolve_device
        from memaudit.criteria import open_index
        from memaudit.criteria.detect import SCHEMA, detect_images, list_images
        from memaudit.paths import atomic_write, check_output_file, parquet_with_columns
        from memaudit.text import terminal_text

        files = list_images(images)  # path errors before the (slow) index load
        if out is not None:
            named = [weights] if weights and "://" not in weights else []
            check_output_file(out, [*images, *files, index, *named], overwrite=overwrite,
                              own=parquet_with_columns(SCHEMA.names), what="detect table")
        idx = open_index(index, device=resolve_device(device), weights=weights)
        table = detect_images(images, idx, criteria=criterion or None, batch_size=batch_size)
        if out is not None:
            with atomic_write(out, "detect table") as tmp:
                pq.write_table(table, tmp)
        n_crit = max(1, len(set(table["criterion"].to_pylist())))
        show = Table(title=escape(f"detect: {table.num_rows // n_crit} images vs {index}"))
        show.add_column("image", overflow="fold", ratio=3)
        show.add_column("criterion", no_wrap=True)
        show.add_column("score", justify="right", no_wrap=True)
        show.add_column("nearest key", overflow="fold", ratio=2)
        show.add_column("dups", justify="right", no_wrap=True)
        show.add_column("copy", no_wrap=True)
        show.add_column("calibrated", no_wrap=True)
        rows = table.to_pylist()
        for r in rows[:limit]:
            cal = r["is_copy_calibrated"]
            show.add_row(
                escape(terminal_text(Path(r["image"]).name)), r["criterion"],
                f"{r['score']:.4f}", escape(terminal_text(r["neighbour_key"])),
                str(r["group_count"]),
                "[red]yes[/red]" if r["is_copy"] else "no",
                "n/a" if cal is None else ("[red]yes[/red]" if cal else "no"),
            )
        console = Console()
        console.print(show)
        if len(rows) > limit:
            console.print(escape(f"... {len(rows) - limit} more rows"
                                 + (f" in {out}" if out else "")))
        for name in dict.fromkeys(table["criterion"].to_pylist()):
            sub = [r for r in rows if r["criterion"] == name]
            fixed = sum(r["is_copy"] for r in sub)
            cal = [r["is_copy_calibrated"] for r in sub if r["is_copy_calibrated"] is not None]
            msg = f"{name}: {fixed}/{len(sub)} copies at the fixed {sub[0]['threshold']:g}"
            if cal:
                msg += (f", {sum(cal)}/{len(sub)} at the calibrated "
                        f"{sub[0]['calibrated_threshold']:.4g} (1% FPR)")
            else:
                msg += ", index not calibrated"
            console.print(msg)
        if out is not None:
            console.print(escape(f"wrote {out}"))
