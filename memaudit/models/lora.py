"""LoRA fine-tunes on a diffusers pipeline: `--lora PATH[:SCALE]` (repeatable; issue 13).

Each LoRA is a safetensors file (or a folder holding `pytorch_lora_weights.safetensors` or one
`.safetensors` file), read with safetensors (never pickle) and handed to the pipeline's own
`load_lora_weights` (PEFT backend: the `memaudit[lora]` extra), then weighted with
`set_adapters`. Each is recorded with its SHA-256 and scale; the model hash of a LoRA-loaded
model hashes the base weights' hash with every (sha256, scale), so a run resumed with another
LoRA or scale is refused like one with other weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from memaudit.common import UserError, check_finite_weights, sha256_file, user_number

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`PATH[:SCALE]` -> (path, scale); SCALE defaults to 1.0 and must be finite."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and head:
        try:
            float(tail)
        except ValueError:
            return Path(spec), 1.0  # a ':' inside the path
        return Path(head), user_number(tail, f"LoRA scale in {spec!r}")
    return Path(spec), 1.0


def lora_file(path: Path) -> Path:
    """The safetensors file of a LoRA given as a file or a folder."""
    if path.is_dir():
        if (path / DEFAULT_WEIGHT_NAME).is_file():
            return path / DEFAULT_WEIGHT_NAME
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise UserError(f"LoRA folder {path}: expected {DEFAULT_WEIGHT_NAME} or exactly one "
                            f".safetensors file, found {len(files)}")
        return files[0]
    if not path.is_file():
        raise UserError(f"LoRA {path} not found")
    if path.suffix != ".safetensors":
        raise UserError(f"LoRA {path}: only .safetensors files are read (pickled weights can "
                        "run code)")
    return path


def load_loras(pipe: Any, specs: list[str]) -> list[dict[str, Any]]:
    """Load every `PATH[:SCALE]` into `pipe`; returns [{"path", "sha256", "scale"}]."""
    if not specs:
        return []
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not hasattr(pipe, "load_lora_weights"):
        raise UserError(f"{type(pipe).__name__} does not take LoRA weights")
    records, names = [], []
    for i, spec in enumerate(specs):
        path, scale = parse_lora_spec(spec)
        f = lora_file(path)
        try:
            state = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise UserError(f"LoRA {f}: not a readable safetensors file ({e})") from e
        if not state:
            raise UserError(f"LoRA {f} holds no tensors (an empty LoRA file)")
        check_finite_weights(state, f"LoRA {f}")
        name = f"lora{i}"
        try:
            pipe.load_lora_weights(state, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            hint = " (install the memaudit[lora] extra: peft)" if "PEFT" in str(e) else ""
            raise UserError(f"cannot load LoRA {f}: {first}{hint}") from e
        names.append(name)
        records.append({"path": str(f.resolve()), "sha256": sha256_file(f), "scale": scale})
    try:
        pipe.set_adapters(names, adapter_weights=[r["scale"] for r in records])
    except ValueError as e:  # a LoRA whose tensors name no layer of this pipeline
        raise UserError(f"cannot apply LoRA {', '.join(r['path'] for r in records)}: "
                        f"{(str(e).strip().splitlines() or ['no adapter'])[0]}") from e
    return records


def combined_hash(base_hash: str, loras: list[dict[str, Any]]) -> str:
    """The base weights' hash alone, or hashed with every LoRA's (sha256, scale) in order."""
    if not loras:
        return base_hash
    lines = [base_hash] + [f"lora {r['sha256']} {float(r['scale'])!r}" for r in loras]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
