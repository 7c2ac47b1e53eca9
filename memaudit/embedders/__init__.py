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


def _is_file_ref(value: Any) -> bool:
    """A config value that names a file or a URL (not a model name or a tag)."""
    v = str(value)
    return "://" in v or "/" in v or "\\" in v or v.endswith((".pt", ".pth", ".bin",
                                                                ".safetensors"))


#: per embedder: (config key of the weights file it loads, key of that file's SHA-256)
WEIGHT_KEYS = {"sscd": ("weights", "weights_sha256"), "clip": ("pretrained", "pretrained_sha256")}


def embedder_from_manifest(spec: Any, *, weights: str | None = None, device: str | None = None,
                           where: str = "the index") -> Embedder:
    """Rebuild an index's embedder from its manifest entry without loading anything the
    manifest names: a weights file (SSCD TorchScript is code; a CLIP checkpoint is a file
    the user did not name) or URL recorded there is never loaded or fetched. The user names
    the file (`weights`: --weights, or `weights` in the plan) and it must have the SHA-256
    the manifest recorded at build time; without it, one line says which file and hash the
    index needs."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise UserError(f"{where}: the manifest names no embedder")
    name = spec["name"]
    if name not in EMBEDDERS:
        raise UserError(f"{where}: unknown embedder {name!r}; known: {', '.join(EMBEDDERS)}")
    cfg = dict(spec.get("config") or {})
    keys = WEIGHT_KEYS.get(name)
    if keys is not None:
        wkey, hkey = keys
        recorded, sha = cfg.get(wkey), cfg.get(hkey)
        if name == "sscd" or (recorded is not None and _is_file_ref(recorded)):
            if weights is None:
                label = str(recorded).replace("\\", "/").rsplit("/", 1)[-1] or "?"
                raise UserError(
                    f"{where} needs the {name} weights file {label} with SHA-256 "
                    f"{sha or '(not recorded)'}: memaudit loads weights only from a path you "
                    "name; pass --weights PATH (or `weights` in the plan)")
            if not sha:
                raise UserError(f"{where} records no SHA-256 of its {name} weights, so no "
                                "file can be checked against it; rebuild the index")
            cfg[wkey], cfg[hkey] = str(weights), sha
    elif weights is not None:
        raise UserError(f"{where} uses the {name} embedder, which takes no --weights")
    return make_embedder(name, **{**cfg, "device": device})


__all__ = ["EMBEDDERS", "WEIGHT_KEYS", "Embedder", "embedder_from_manifest", "make_embedder"]
