"""Embedders by name: `make_embedder("pixels" | "sscd" | "clip", **opts)`."""

from __future__ import annotations

from typing import Any

from memaudit.common import UserError
from memaudit.embedders.base import Embedder

EMBEDDERS = ("pixels", "sscd", "clip")


def make_embedder(name: str, **opts: Any) -> Embedder:
    """Build an embedder; `opts` are its `config()` keys plus `device`."""
    from memaudit.common import resolve_device

    opts = {k: v for k, v in opts.items() if v is not None}
    opts["device"] = resolve_device(opts.get("device"))
    if name == "pixels":
        from memaudit.embedders.pixels import PixelEmbedder

        return PixelEmbedder(**opts)
    if name == "sscd":
        from memaudit.embedders.sscd import SSCDEmbedder

        return SSCDEmbedder(**opts)
    if name == "clip":
        from memaudit.embedders.clip import CLIPEmbedder

        return CLIPEmbedder(**opts)
    raise UserError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)}")


__all__ = ["EMBEDDERS", "Embedder", "make_embedder"]
