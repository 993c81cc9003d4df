"""MetaOptimizer
===============

A ``torch.optim.Optimizer`` with plain, normalized and clipped momentum steps for the outer loop of meta-learning
(math in :mod:`lightning_epfl.functional.meta_optim`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_epfl.functional.meta_optim import OUTER_STEP_MODES, ema_momentum_, global_norm, outer_step_scale

__all__ = ["MetaOptimizer"]


class MetaOptimizer(torch.optim.Optimizer):
    """Momentum SGD with plain, normalized (SNGDM, arXiv:2002.03305) or clipped steps, norms global over all groups.

    With ``m_t = momentum * m_{t-1} + (1 - momentum) * grad_t`` (kept per parameter in
    ``state["momentum_buffer"]``), the update of a parameter in a group with learning rate ``lr`` is
    ``p <- p - lr * s * m`` with ``s`` from :func:`~lightning_epfl.functional.meta_optim.outer_step_scale` evaluated at
    the global ``||m||`` over every parameter of every group. With one learning rate, ``normalized`` steps have
    length exactly ``lr`` and ``clipped`` steps at most ``lr * clip_norm`` (motivated by the ``(L0, L1)``-smoothness of
    the MAML objective, arXiv:2409.03682). Normalized steps do not shrink near a stationary point, so pair them with
    a decaying learning-rate schedule. ``mode``, ``clip_norm`` and ``eps`` are read from the first parameter group
    (the step scale is global); ``lr`` and ``momentum`` may differ per group.

    Args:
        params: Parameters or parameter groups.
        lr: Step size ``> 0``.
        mode: ``"plain"``, ``"normalized"`` or ``"clipped"``.
        momentum: EMA coefficient ``beta`` in ``[0, 1)``.
        clip_norm: ``gamma > 0`` for ``"clipped"``.
        eps: Floor of ``||m||`` in ``"normalized"``.

    Raises:
        ValueError: If ``lr <= 0``, ``mode`` is unknown, ``momentum`` is outside ``[0, 1)`` or ``clip_norm <= 0``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        mode: Literal["plain", "normalized", "clipped"] = "plain",
        momentum: float = 0.9,
        clip_norm: float = 1.0,
        eps: float = 1e-12,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr}.")
        if mode not in OUTER_STEP_MODES:
            raise ValueError(f"`mode` must be one of {list(OUTER_STEP_MODES)}, got {mode!r}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum}.")
        if not clip_norm > 0:
            raise ValueError(f"`clip_norm` must be > 0, got {clip_norm}.")
        super().__init__(params, {"lr": lr, "mode": mode, "momentum": momentum, "clip_norm": clip_norm, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one outer step; returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ema_momentum_([state["momentum_buffer"]], [p.grad], group["momentum"])
                entries.append((p, state["momentum_buffer"], group))
        if not entries:
            return loss
        norm = global_norm([m for _, m, _ in entries])
        first = self.param_groups[0]
        scale = outer_step_scale(norm, first["mode"], first["clip_norm"], first["eps"])
        for p, m, group in entries:
            p.add_(m * scale.to(m.dtype), alpha=-group["lr"])
        return loss
