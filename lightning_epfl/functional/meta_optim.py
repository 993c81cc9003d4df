"""Outer-step rules for meta-learning
====================================

The MAML objective is ``(L0, L1)``-smooth: its Hessian norm grows with the meta-gradient norm,
``||hess F|| <= L0 + L1 ||grad F||`` (Zhang et al., 2020, arXiv:1905.11881; the MAML case is derived in
Chayti & Jaggi, arXiv:2409.03682). Steps whose length does not grow with ``||grad F||`` are then the natural choice:

- ``plain``: ``dx = -lr * m``;
- ``normalized`` (SNGDM, Cutkosky & Mehta, 2020, arXiv:2002.03305): ``dx = -lr * m / max(||m||, eps)``, so
  ``||dx|| = lr``;
- ``clipped``: ``dx = -lr * min(1, clip_norm / ||m||) * m``, so ``||dx|| <= lr * clip_norm``,

where ``m_t = beta m_{t-1} + (1 - beta) d_t`` is an exponential moving average of the meta-gradients and norms are
global over all parameter tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["OUTER_STEP_MODES", "ema_momentum_", "global_norm", "outer_step_scale"]

OUTER_STEP_MODES = ("plain", "normalized", "clipped")


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """Euclidean norm of all ``tensors`` taken together (a 0-dim tensor; ``0`` for an empty sequence)."""
    if len(tensors) == 0:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.detach()) for t in tensors]))


def ema_momentum_(buffers: Sequence[Tensor], updates: Sequence[Tensor], beta: float) -> None:
    """In place ``m <- beta * m + (1 - beta) * d`` for each pair (``beta = 0`` gives ``m = d``).

    Raises:
        ValueError: If ``beta`` is outside ``[0, 1)``.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"`momentum` must be in [0, 1), got {beta}.")
    for m, d in zip(buffers, updates, strict=True):
        m.mul_(beta).add_(d, alpha=1.0 - beta)


def outer_step_scale(norm: Tensor, mode: str, clip_norm: float = 1.0, eps: float = 1e-12) -> Tensor:
    """Factor ``s`` such that the outer step is ``dx = -lr * s * m`` for a direction of global norm ``norm``.

    Args:
        norm: ``||m||`` (0-dim tensor).
        mode: ``"plain"`` (``s = 1``), ``"normalized"`` (``s = 1 / max(||m||, eps)``) or ``"clipped"``
            (``s = min(1, clip_norm / ||m||)``).
        clip_norm: ``gamma > 0`` for ``"clipped"``.
        eps: Floor of ``||m||`` for ``"normalized"``.

    Returns:
        The 0-dim scale ``s``.

    Raises:
        ValueError: If ``mode`` is unknown or ``clip_norm <= 0``.
    """
    if mode == "plain":
        return torch.ones_like(norm)
    if mode == "normalized":
        return 1.0 / norm.clamp_min(eps)
    if mode == "clipped":
        if not clip_norm > 0:
            raise ValueError(f"`clip_norm` must be > 0, got {clip_norm}.")
        return torch.clamp(clip_norm / norm.clamp_min(eps), max=1.0)
    raise ValueError(f"`mode` must be one of {list(OUTER_STEP_MODES)}, got {mode!r}.")
