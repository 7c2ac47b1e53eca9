"""Reading cross-attention probabilities out of any diffusers model with `Attention` layers
(UNet2DConditionModel: the canary's and Stable Diffusion's), for one forward.

`capture_cross_attention(module)` installs, on every cross-attention layer, a processor that
computes softmax(q k^T * scale) from the layer's own projections (the same normalisations the
stock processors apply) and then calls the original processor, so the forward's output is
unchanged. Probabilities are recorded per call in execution order as [B, heads, L_q, L_k]
float32 on the CPU; the original processors are restored on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class _Recorder:
    """Wraps one cross-attention layer's processor; appends (layer, probabilities)."""

    def __init__(self, name: str, inner: Any, store: list[tuple[str, torch.Tensor]]) -> None:
        self.name, self.inner, self.store = name, inner, store

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is not None:
            self.store.append((self.name, self._probs(attn, hidden_states, encoder_hidden_states,
                                                      attention_mask, temb)))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                          *args, **kwargs)

    @staticmethod
    def _probs(attn: Any, h: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None,
               temb: torch.Tensor | None) -> torch.Tensor:
        if attn.spatial_norm is not None:
            h = attn.spatial_norm(h, temb)
        if h.ndim == 4:
            b, c, hh, ww = h.shape
            h = h.view(b, c, hh * ww).transpose(1, 2)
        b = ctx.shape[0]
        if attn.group_norm is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        q, k = attn.to_q(h), attn.to_k(ctx)
        heads, dim = attn.heads, k.shape[-1] // attn.heads
        q = q.view(b, -1, heads, dim).transpose(1, 2)
        k = k.view(b, -1, heads, dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        logits = (q.float() @ k.float().transpose(-1, -2)) * float(attn.scale)
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, k.shape[2], b)
            logits = logits + mask.view(b, heads, -1, mask.shape[-1]).float()
        return logits.softmax(dim=-1).detach().cpu()


def cross_attention_layers(module: torch.nn.Module) -> dict[str, Any]:
    """name -> diffusers `Attention` layer, for every cross-attention layer of `module`."""
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in module.named_modules()
            if isinstance(m, Attention) and m.is_cross_attention}


@contextmanager
def capture_cross_attention(module: torch.nn.Module
                            ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Record cross-attention probabilities of `module`'s forwards inside the block."""
    layers = cross_attention_layers(module)
    store: list[tuple[str, torch.Tensor]] = []
    saved = {name: layer.processor for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            layer.set_processor(_Recorder(name, saved[name], store))
        yield store
    finally:
        for name, layer in layers.items():
            layer.set_processor(saved[name])
