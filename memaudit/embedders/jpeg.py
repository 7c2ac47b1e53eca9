"""JPEG decoding on the GPU for index builds (issue 21): torchvision's `decode_jpeg(list,
device="cuda")` (nvJPEG, batched) instead of PIL in the decoding threads.

`jpeg_device` of a build (resolved once by the build, recorded in its manifest, handed to
every worker): None / "auto" decodes on the GPU when the embedder runs on CUDA in the
building process (Ray builds: PIL unless a device is named), torchvision can decode there and
the embedder preprocesses tensors itself (`Embedder.preprocess_tensor`; SSCD does); "off"
always uses PIL; "cpu" or "cuda[:N]" force
torchvision's decoder on that device ("cpu": libjpeg, the same code path without a GPU, which
is how the tests run it). Rows that are not JPEG, larger than the build's pixel limit, or that
torchvision cannot decode go through PIL as before (which gives the skip reason). Decoders
differ in their IDCT and chroma upsampling by a few grey levels, so vectors and exact-duplicate
hashes of a GPU-decoded build are not bit-identical to a PIL-decoded one; within one build
every JPEG row is decoded the same way.
"""

from __future__ import annotations

import warnings

import torch

JPEG_DEVICES = ("auto", "off", "cpu", "cuda")


def is_jpeg(data: bytes | None) -> bool:
    return bool(data) and data[:3] == b"\xff\xd8\xff"


def gpu_decode_available() -> bool:
    """torchvision can decode JPEG on CUDA here (a CUDA build with nvJPEG and a GPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
        from torchvision.io.image import _has_nvjpeg  # type: ignore[attr-defined]

        return bool(_has_nvjpeg())
    except (ImportError, AttributeError, RuntimeError):
        return True  # older/newer torchvision without the probe: try, fall back per batch


def resolve_jpeg_device(jpeg_device: str | None, embedder) -> str | None:
    """The device torchvision decodes JPEG rows on for this build, or None (PIL)."""
    from memaudit.common import UserError

    choice = str(jpeg_device or "auto").lower()
    if choice == "off":
        return None
    if choice == "auto":
        dev = torch.device(getattr(embedder, "device", "cpu"))
        ok = dev.type == "cuda" and getattr(embedder, "tensor_preprocess", False)
        return str(dev) if ok and gpu_decode_available() else None
    if choice == "cpu":
        return "cpu"
    if choice.startswith("cuda"):
        if not gpu_decode_available():
            raise UserError(f"--jpeg-device {jpeg_device}: torchvision cannot decode JPEG on "
                            "CUDA here (no GPU or no nvJPEG); use auto or off")
        return choice
    raise UserError(f"unknown --jpeg-device {jpeg_device!r}; known: auto, off, cpu, cuda[:N]")


def decode_jpegs(datas: list[bytes], device: str) -> list[torch.Tensor | None]:
    """JPEG bytes -> uint8 RGB [3, H, W] tensors on `device` (None where torchvision cannot
    decode one: the caller falls back to PIL). One batched call; per image after a failure."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image decoders
        warnings.simplefilter("ignore")
        try:
            out = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
            return list(out) if isinstance(out, list | tuple) else [out]
        except (RuntimeError, ValueError):
            pass
        res: list[torch.Tensor | None] = []
        for r in raw:
            try:
                res.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
            except (RuntimeError, ValueError):
                res.append(None)
        return res
