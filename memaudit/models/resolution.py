"""What a model can draw vs what a pixel index compares (METHODS 1.2, the comparison size).

A pixel criterion compares images at the index's size. When that is finer than the images
the model draws (e.g. a canary with 16x16 outputs trained on a user's 32x32 Parquet), a
generated copy is upsampled and compared with detail it could never reproduce, so it looks
farther than it is (issue 11's review, on such a canary: 64% of the planted copies found
with the index at 32, 81% at 16). So a plan that builds a pixel index compares at the model's
output size unless the plan sets `size`, and an index finer than the model is warned about.
"""

from __future__ import annotations

from typing import Any


def output_size(model: Any) -> tuple[int, int] | None:
    """(H, W) of the images `model.decode` returns, without decoding anything; None when the
    model does not say."""
    size = getattr(model, "output_size", None)
    if size:
        return (int(size[0]), int(size[-1])) if not isinstance(size, int) else (size, size)
    shape = getattr(model, "latent_shape", None)
    if not shape or len(shape) < 2:
        return None
    h, w = int(shape[-2]), int(shape[-1])
    if not getattr(model, "is_latent", True):
        return h, w
    cfg = getattr(getattr(model, "vae", None), "config", None)
    blocks = getattr(cfg, "block_out_channels", None)
    factor = 2 ** (len(blocks) - 1) if blocks else 8  # the VAE's downsampling
    return h * factor, w * factor


def pixel_index_size(index: Any) -> tuple[int, int] | None:
    """(H, W) a pixels index compares at; None for other embedders."""
    spec = (getattr(index, "manifest", None) or {}).get("embedder")
    if not isinstance(spec, dict) or spec.get("name") != "pixels":
        return None
    size = (spec.get("config") or {}).get("size")
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def finer_than_model(index: Any, model: Any) -> str | None:
    """A one-line warning when a pixel index compares at a finer size than the model draws."""
    size, out = pixel_index_size(index), output_size(model)
    if size is None or out is None or (size[0] <= out[0] and size[1] <= out[1]):
        return None
    where = getattr(index, "path", "the index")
    return (f"{where} compares pixels at {size[0]}x{size[1]}, finer than the "
            f"{out[0]}x{out[1]} images the model draws: its copies look farther than they "
            f"are (METHODS 1.2); build the pixel index with size = {out[0]} (an audit plan's "
            "[index] does so unless it sets size)")
