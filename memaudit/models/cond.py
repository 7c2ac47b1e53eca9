"""`Cond`: a batch of model conditions, the one thing guidances pass back to `Denoiser.eps`.

Families condition their denoiser on different things (DESIGN.md "Core abstractions"): Stable
Diffusion 1/2 and the canary on text-encoder states only; SDXL also on a pooled text embedding
and micro-conditioning time ids; SD3 and FLUX on states plus a pooled embedding; class-
conditional models on class labels; unconditional ones on nothing. A `Cond` holds these as
named tensors that share the leading batch dimension, and offers exactly the row operations
the sampler and the guidances need (concatenate, split, select, replace rows), so no guidance
learns which family it runs on.

Keys: `emb` is the main sequence a text mitigation perturbs or optimises (gni, wen); keys in
`TEXT_KEYS` are derived from the prompt (gni perturbs all of them); anything else (`time_ids`,
`class_labels`, ...) is passed through untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

#: Keys computed from the prompt text (perturbed by embedding-level mitigations).
TEXT_KEYS = ("emb", "pooled")


class Cond:
    """Named condition tensors [B, ...] with a common batch size B (possibly none at all:
    an unconditional model's condition is an empty `Cond` of a given batch size)."""

    __slots__ = ("_batch", "tensors")

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None, *,
                 batch: int | None = None, **kw: torch.Tensor) -> None:
        data = dict(tensors or {}, **kw)
        sizes = {int(v.shape[0]) for v in data.values()}
        if len(sizes) > 1:
            raise ValueError(f"condition tensors disagree on the batch size: "
                             f"{ {k: tuple(v.shape) for k, v in data.items()} }")
        if not data and batch is None:
            raise ValueError("an empty Cond needs its batch size")
        if batch is not None and sizes and sizes != {int(batch)}:
            raise ValueError(f"batch {batch} but tensors have {sizes.pop()} rows")
        self.tensors: dict[str, torch.Tensor] = data
        self._batch = int(batch) if batch is not None else sizes.pop()

    # --- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._batch

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __getattr__(self, key: str) -> torch.Tensor:
        if key.startswith("_") or key == "tensors":  # not set yet (copy, pickle)
            raise AttributeError(key)
        try:
            return self.tensors[key]
        except KeyError:
            raise AttributeError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.tensors.get(key, default)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def signature(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per key the shape without the batch dimension and the dtype (to check two
        conditions can be concatenated)."""
        return {k: (tuple(v.shape[1:]), v.dtype) for k, v in self.tensors.items()}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.tensors.items())
        return f"Cond(batch={self._batch}{', ' if inner else ''}{inner})"

    # --- making new conditions -------------------------------------------------------------
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor],
            keys: Iterable[str] | None = None) -> Cond:
        """Apply `fn` to the tensors named in `keys` (default: all), keep the others."""
        keys = set(self.tensors if keys is None else keys)
        return Cond({k: fn(v) if k in keys else v for k, v in self.tensors.items()},
                    batch=self._batch)

    def replace(self, **tensors: torch.Tensor) -> Cond:
        """The same condition with some tensors replaced (or added)."""
        return Cond({**self.tensors, **tensors}, batch=self._batch)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Cond:
        """Move every tensor to `device`; cast floating tensors (only) to `dtype`."""
        def move(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=device, dtype=dtype if (dtype and v.is_floating_point())
                        else None)

        return self.map(move)

    def detach(self) -> Cond:
        return self.map(torch.Tensor.detach)

    def clone(self) -> Cond:
        return self.map(torch.Tensor.clone)

    def __getitem__(self, rows: Any) -> Cond:
        """Rows of the batch: an index tensor, a list, a slice or a boolean mask."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        if not self.tensors:
            return Cond(batch=int(torch.arange(self._batch)[rows].numel()))
        out = {}
        for k, v in self.tensors.items():
            idx = rows.to(v.device) if torch.is_tensor(rows) else rows
            out[k] = v[idx]
        return Cond(out)

    def expand(self, n: int) -> Cond:
        """A batch-1 condition repeated n times (a copy, safe to modify)."""
        if self._batch != 1:
            raise ValueError(f"expand needs a batch of 1, not {self._batch}")
        return Cond({k: v.expand(n, *v.shape[1:]).clone() for k, v in self.tensors.items()},
                    batch=n)

    def where(self, mask: torch.Tensor, other: Cond) -> Cond:
        """Row i from self where mask[i], else from `other` (same keys and shapes)."""
        self._check_like(other)
        out = {}
        for k, v in self.tensors.items():
            m = mask.to(v.device).bool().view(-1, *([1] * (v.ndim - 1)))
            out[k] = torch.where(m, v, other.tensors[k].to(v))
        return Cond(out, batch=self._batch)

    def put(self, rows: torch.Tensor, values: Cond) -> Cond:
        """A copy of self with `rows` replaced by the rows of `values`."""
        self._check_like(values)
        out = {}
        for k, v in self.tensors.items():
            v = v.clone()
            v[rows.to(v.device)] = values.tensors[k].to(v)
            out[k] = v
        return Cond(out, batch=self._batch)

    def chunk(self, n: int) -> list[Cond]:
        """n equal parts along the batch (the inverse of `cat` of n equal conditions)."""
        if self._batch % n:
            raise ValueError(f"cannot split a batch of {self._batch} into {n} equal parts")
        size = self._batch // n
        return [self[i * size:(i + 1) * size] for i in range(n)]

    @staticmethod
    def cat(conds: Iterable[Cond]) -> Cond:
        """Concatenate along the batch; every part must have the same keys and row shapes."""
        conds = list(conds)
        if not conds:
            raise ValueError("nothing to concatenate")
        first = conds[0]
        for c in conds[1:]:
            first._check_like(c)
        if not first.tensors:
            return Cond(batch=sum(len(c) for c in conds))
        return Cond({k: torch.cat([c.tensors[k].to(v) for c in conds])
                     for k, v in first.tensors.items()})

    def _check_like(self, other: Cond) -> None:
        a, b = self.signature(), other.signature()
        if {k: s for k, (s, _) in a.items()} != {k: s for k, (s, _) in b.items()}:
            raise ValueError(f"conditions do not match: {a} vs {b}")


def as_cond(value: Cond | torch.Tensor) -> Cond:
    """A `Cond`, or a bare [B, L, D] tensor taken as `Cond(emb=...)` (text-only families)."""
    return value if isinstance(value, Cond) else Cond(emb=value)
