"""Per-sample minimisation before the loop, shared by `wen` (the text embedding, METHODS 3.4)
and `init-noise` (x_T, METHODS 3.5): AdamW over a batch of rows, each row with its own loss,
its own target and its own stop.

The loss of every row is checked before each step; a row stops as soon as loss <= target
(`target` when given, else `fraction` x its initial loss) and keeps the value that met it; at
most `max_iters` steps. Adam is elementwise, so this equals one optimiser per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Minimised:
    value: torch.Tensor  # the final rows (detached)
    loss0: torch.Tensor  # [B] initial loss
    loss: torch.Tensor  # [B] loss of the final value
    iters: torch.Tensor  # [B] steps taken (long, CPU)
    reached: torch.Tensor  # [B] bool: met its target


def minimise_per_row(start: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                     lr: float, max_iters: int, target: float | None, fraction: float,
                     before_step: Callable[[torch.Tensor], None] | None = None,
                     after_step: Callable[[torch.Tensor], None] | None = None) -> Minimised:
    """Minimise `loss_fn(value) -> [B]` per row from `start` [B, ...] with AdamW (lr).

    `before_step(value)` may edit the gradient (wen freezes its first token),
    `after_step(value)` may edit the value in place, under no_grad."""
    b = start.shape[0]
    with torch.enable_grad():
        value = start.detach().clone().requires_grad_(True)
        opt = torch.optim.AdamW([value], lr=lr)
        done = torch.zeros(b, dtype=torch.bool, device=value.device)
        kept = value.detach().clone()
        iters = torch.zeros(b, dtype=torch.long)
        loss0 = tau = loss = None
        for it in range(max_iters + 1):
            loss = loss_fn(value)
            if loss0 is None:
                loss0 = loss.detach().clone()
                tau = torch.full_like(loss0, target) if target is not None else fraction * loss0
            newly = (loss.detach() <= tau) & ~done
            kept[newly] = value.detach()[newly]
            done = done | newly
            if bool(done.all()) or it == max_iters:
                break
            iters += (~done).long().cpu()
            opt.zero_grad()
            (loss * (~done).float()).sum().backward()
            if before_step is not None:
                before_step(value)
            opt.step()
            with torch.no_grad():
                if after_step is not None:
                    after_step(value)
                value[done] = kept[done]  # a row that met its target keeps that value
    final = value.detach().clone()
    final[done] = kept[done]
    return Minimised(final, loss0.detach(), loss.detach(), iters, done.cpu())
