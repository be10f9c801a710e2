"""GradMag: weight each loss by the inverse norm of its gradient on the last block (docs/method.md, "GradMag")."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from xtd.errors import ConfigError

__all__ = ["combine_losses", "gradmag_weights"]

logger = logging.getLogger(__name__)


def gradmag_weights(
    losses: dict[str, Tensor],
    params: list[nn.Parameter],
    *,
    eps: float = 1e-8,
    normalize: bool = True,
) -> dict[str, Tensor]:
    """w_i = stopgrad(1 / (‖∂L_i/∂θ_last‖ + eps)), divided by W = Σ_i w_i (docs/method.md, "GradMag").

    One ``torch.autograd.grad(L_i, params, retain_graph=True)`` per loss; the graph stays
    alive for the single backward of :func:`combine_losses`. Weights are per micro-batch.
    A loss whose gradient on ``params`` is exactly zero (or that does not reach them, e.g.
    an ALM loss of a micro-batch without contributing groups) gets weight 0 and stays out of
    W: 1/eps would otherwise swamp every other loss.

    Args:
        losses: name → 0-dim loss that requires grad.
        params: the last block's trainable parameters (:func:`xtd.model_parts.last_block_parameters`).
        eps: the 1e-8 of the spec.
        normalize: divide by W (``gradmag``, default); False keeps W = 1 (``gradmag_unit``).

    Returns:
        name → detached 0-dim float32 weight; they sum to 1 when ``normalize`` and some
        loss has a gradient.

    Raises:
        ConfigError: ``params`` is empty.
    """
    if not params:
        raise ConfigError("GradMag needs the last block's trainable parameters, got none")
    raw: dict[str, Tensor] = {}
    for name, loss in losses.items():
        if not loss.requires_grad:
            raw[name] = torch.zeros((), dtype=torch.float32, device=params[0].device)
            continue
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        norm = torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=params[0].device)
        raw[name] = torch.where(norm > 0, 1.0 / (norm + eps), torch.zeros_like(norm))
    if not normalize:
        return raw
    total = torch.stack(list(raw.values())).sum() if raw else torch.zeros(())
    return {
        name: torch.where(total > 0, w / total.clamp(min=torch.finfo(torch.float32).tiny), w)
        for name, w in raw.items()
    }


def combine_losses(losses: dict[str, Tensor], weights: dict[str, Tensor]) -> Tensor:
    """Σ_i w_i·L_i: the one loss to call ``backward()`` on (docs/method.md, "GradMag")."""
    terms = [
        weights[name].to(device=loss.device, dtype=loss.dtype) * loss
        for name, loss in losses.items()
    ]
    if not terms:
        raise ConfigError("combine_losses got no losses")
    return torch.stack(terms).sum()
