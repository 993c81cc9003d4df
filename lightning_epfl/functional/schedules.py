r"""
Warmup-stable-decay (WSD) learning-rate schedules
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Pure functions of the optimizer step and the configuration, after Hägele et al., *Scaling Laws and
Compute-Optimal Training Beyond Fixed Training Durations* (NeurIPS 2024, arXiv:2405.18392), Sec. 3 and Fig. 3.

With ``n`` the number of optimizer steps already taken (0-based), ``W`` warmup steps, ``S`` the cooldown start,
``L`` the cooldown length, ``r0 = init_lr_ratio`` and ``rf = final_lr_ratio`` the multiplier of the peak LR is

.. math::

    \lambda(n) = \begin{cases}
        r_0 + (1 - r_0)\, n / W & n < W \\
        1 & W \le n < S \\
        r_f + (1 - r_f)\, g(\min(1, (n - S) / L)) & n \ge S
    \end{cases}

where ``g`` is the cooldown shape (``1-sqrt`` by default, the paper's best). Nothing here imports Lightning.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, get_args

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

CooldownShape = Literal["1-sqrt", "linear", "cosine", "mirror_cosine", "1-square"]
_SHAPES: tuple[str, ...] = get_args(CooldownShape)

__all__ = ["CooldownShape", "WSDScheduler", "cooldown_factor", "resolve_cooldown", "wsd_lr_factor"]


def _check_shape(shape: str) -> None:
    if shape not in _SHAPES:
        raise ValueError(f"`shape` must be one of {list(_SHAPES)}, got {shape!r}.")


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}.")


def _check_nonneg_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")


def cooldown_factor(progress: float, shape: CooldownShape = "1-sqrt", final_lr_ratio: float = 0.0) -> float:
    r"""LR multiplier inside the cooldown, ``rf + (1 - rf) * g(t)`` (arXiv:2405.18392, Sec. 3, Fig. 3).

    Shapes ``g(t)``: ``1-sqrt`` :math:`1-\sqrt t`; ``linear`` :math:`1-t`; ``cosine`` :math:`\tfrac12(1+\cos\pi t)`;
    ``mirror_cosine`` :math:`2(1-t)-\tfrac12(1+\cos\pi t)`; ``1-square`` :math:`1-t^2`.

    Args:
        progress: Fraction ``t`` of the cooldown already done, in ``[0, 1]``.
        shape: Cooldown shape. Default ``"1-sqrt"``.
        final_lr_ratio: Multiplier ``rf`` reached at ``t = 1``, in ``[0, 1]``. Default ``0``.

    Returns:
        The multiplier, in ``[rf, 1]``; ``1`` at ``t = 0`` and ``rf`` at ``t = 1``.

    Raises:
        ValueError: If ``progress`` or ``final_lr_ratio`` is outside ``[0, 1]`` or ``shape`` is unknown.
    """
    _check_shape(shape)
    _check_ratio("final_lr_ratio", final_lr_ratio)
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"`progress` must be in [0, 1], got {progress}.")
    t = float(progress)
    if shape == "1-sqrt":
        g = 1.0 - math.sqrt(t)
    elif shape == "linear":
        g = 1.0 - t
    elif shape == "cosine":
        g = 0.5 * (1.0 + math.cos(math.pi * t))
    elif shape == "mirror_cosine":
        g = 2.0 * (1.0 - t) - 0.5 * (1.0 + math.cos(math.pi * t))
    else:  # "1-square"
        g = 1.0 - t * t
    return g * (1.0 - final_lr_ratio) + final_lr_ratio


def wsd_lr_factor(
    step: int,
    *,
    warmup_steps: int = 0,
    cooldown_start: int | None = None,
    cooldown_steps: int = 0,
    shape: CooldownShape = "1-sqrt",
    init_lr_ratio: float = 0.0,
    final_lr_ratio: float = 0.0,
) -> float:
    """LR multiplier ``lambda(step)`` of the WSD schedule (arXiv:2405.18392, Sec. 3).

    Args:
        step: Optimizer steps already taken, ``n >= 0`` (the LR used by the ``n``-th update, 0-based).
        warmup_steps: Linear warmup length ``W`` from ``init_lr_ratio`` to 1. Default 0.
        cooldown_start: First cooldown step ``S >= W``; ``None`` keeps the LR constant after warmup (a trunk run).
        cooldown_steps: Cooldown length ``L``; after ``S + L`` the multiplier stays at ``final_lr_ratio``.
            ``L = 0`` drops to ``final_lr_ratio`` at ``S``. Default 0.
        shape: Cooldown shape, see :func:`cooldown_factor`. Default ``"1-sqrt"``.
        init_lr_ratio: Multiplier ``r0`` at step 0, in ``[0, 1]``. Default 0.
        final_lr_ratio: Multiplier ``rf`` at the end of the cooldown, in ``[0, 1]``. Default 0.

    Returns:
        The multiplier of the peak LR (dimensionless).

    Raises:
        ValueError: For a negative step or length, ``cooldown_start < warmup_steps`` (overlapping phases), ratios
            outside ``[0, 1]`` or an unknown ``shape``.
    """
    _check_nonneg_int("step", step)
    _check_nonneg_int("warmup_steps", warmup_steps)
    _check_nonneg_int("cooldown_steps", cooldown_steps)
    _check_shape(shape)
    _check_ratio("init_lr_ratio", init_lr_ratio)
    _check_ratio("final_lr_ratio", final_lr_ratio)
    if cooldown_start is not None:
        _check_nonneg_int("cooldown_start", cooldown_start)
        if cooldown_start < warmup_steps:
            raise ValueError(
                f"`cooldown_start` ({cooldown_start}) must be >= `warmup_steps` ({warmup_steps}): phases overlap."
            )
    if step < warmup_steps:
        return (step / warmup_steps) * (1.0 - init_lr_ratio) + init_lr_ratio
    if cooldown_start is None or step < cooldown_start:
        return 1.0
    progress = 1.0 if cooldown_steps == 0 else min(1.0, (step - cooldown_start) / cooldown_steps)
    return cooldown_factor(progress, shape, final_lr_ratio)


def resolve_cooldown(
    total_steps: int,
    *,
    cooldown_fraction: float = 0.2,
    cooldown_steps: int | None = None,
    cooldown_start: int | None = None,
) -> tuple[int, int]:
    """Cooldown start and length ``(S, L)`` for a run of ``total_steps`` optimizer steps.

    ``L = cooldown_steps`` if given, else ``floor(cooldown_fraction * total_steps)`` (the fraction includes warmup,
    as in the paper); ``S = cooldown_start`` if given, else ``total_steps - L``.

    Args:
        total_steps: Total optimizer steps ``N >= 1``.
        cooldown_fraction: Cooldown length as a fraction of ``N``, in ``(0, 1]``. Default 0.2 (the paper's choice).
        cooldown_steps: Cooldown length in steps; overrides ``cooldown_fraction``.
        cooldown_start: Cooldown start step; defaults to ``N - L``.

    Returns:
        ``(S, L)`` with ``0 <= S`` and ``S + L <= N``.

    Raises:
        ValueError: If ``total_steps < 1``, ``cooldown_fraction`` is outside ``(0, 1]``, a step count is negative,
            or the cooldown ends after ``total_steps``.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"`total_steps` must be a positive integer, got {total_steps!r}.")
    if not 0.0 < cooldown_fraction <= 1.0:
        raise ValueError(f"`cooldown_fraction` must be in (0, 1], got {cooldown_fraction}.")
    if cooldown_steps is not None:
        _check_nonneg_int("cooldown_steps", cooldown_steps)
        length = cooldown_steps
    else:
        length = int(math.floor(cooldown_fraction * total_steps))
    if cooldown_start is not None:
        _check_nonneg_int("cooldown_start", cooldown_start)
        start = cooldown_start
    else:
        start = total_steps - length
    if start < 0 or start + length > total_steps:
        raise ValueError(
            f"The cooldown (`cooldown_start`={start}, `cooldown_steps`={length}) must end by `total_steps`="
            f"{total_steps}."
        )
    return start, length


class WSDScheduler(LRScheduler):
    """Warmup-stable-decay LR scheduler whose LR is a pure function of (step, config) (arXiv:2405.18392).

    The LR of group ``g`` after ``n`` optimizer steps is ``base_lr_g * wsd_lr_factor(n, ...)``; it is recomputed in
    closed form at every step (never chained), so a run resumed with a *different* configuration follows the new
    schedule: the scheduler's state is its step counters only. This is what makes branching several cooldowns from
    one constant-LR trunk checkpoint possible (Sec. 5 of the paper).

    Without ``total_steps`` and ``cooldown_start`` the LR stays at the peak after warmup (a trunk run); a cooldown
    can be added later with :meth:`set_cooldown` (what :class:`~lightning_epfl.callbacks.Cooldown` does).

    Step it once per *optimizer step* (Lightning: ``interval: "step"``).

    Args:
        optimizer: Wrapped optimizer; each group's ``lr`` (or ``initial_lr``) is its peak LR.
        warmup_steps: Linear warmup length ``W``. Default 0.
        total_steps: Total optimizer steps ``N``; with it the cooldown is placed by :func:`resolve_cooldown`.
        cooldown_fraction: Cooldown length as a fraction of ``total_steps``, in ``(0, 1]``. Default 0.2.
        cooldown_steps: Cooldown length in steps (overrides ``cooldown_fraction``; required when ``cooldown_start``
            is given without ``total_steps``).
        cooldown_start: Cooldown start ``S``; default ``N - L``.
        shape: Cooldown shape, one of ``1-sqrt`` (default), ``linear``, ``cosine``, ``mirror_cosine``, ``1-square``.
        init_lr_ratio: LR multiplier at step 0, in ``[0, 1]``. Default 0.
        final_lr_ratio: LR multiplier at and after the end of the cooldown, in ``[0, 1]``. Default 0.
        last_epoch: Index of the last step (``-1`` starts a new schedule), as in :class:`LRScheduler`.

    Raises:
        ValueError: If a ratio is outside ``[0, 1]``, ``cooldown_fraction`` is outside ``(0, 1]``, ``shape`` is
            unknown, or warmup plus cooldown does not fit in ``total_steps`` (overlapping phases).

    Example::

        sched = WSDScheduler(opt, warmup_steps=100, total_steps=10_000)  # 20 % 1-sqrt cooldown from step 8000
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        cooldown_fraction: float = 0.2,
        cooldown_steps: int | None = None,
        cooldown_start: int | None = None,
        shape: CooldownShape = "1-sqrt",
        init_lr_ratio: float = 0.0,
        final_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        _check_nonneg_int("warmup_steps", warmup_steps)
        _check_shape(shape)
        _check_ratio("init_lr_ratio", init_lr_ratio)
        _check_ratio("final_lr_ratio", final_lr_ratio)
        if not 0.0 < cooldown_fraction <= 1.0:
            raise ValueError(f"`cooldown_fraction` must be in (0, 1], got {cooldown_fraction}.")
        start: int | None
        if total_steps is not None:
            start, length = resolve_cooldown(
                total_steps,
                cooldown_fraction=cooldown_fraction,
                cooldown_steps=cooldown_steps,
                cooldown_start=cooldown_start,
            )
            if start < warmup_steps:
                raise ValueError(
                    f"`warmup_steps` ({warmup_steps}) + cooldown ({length} steps) is longer than `total_steps` "
                    f"({total_steps}): the cooldown would start at step {start}, inside the warmup."
                )
        elif cooldown_start is not None:
            if cooldown_steps is None:
                raise ValueError("`cooldown_steps` is required when `cooldown_start` is given without `total_steps`.")
            _check_nonneg_int("cooldown_start", cooldown_start)
            _check_nonneg_int("cooldown_steps", cooldown_steps)
            if cooldown_start < warmup_steps:
                raise ValueError(
                    f"`cooldown_start` ({cooldown_start}) must be >= `warmup_steps` ({warmup_steps}): phases overlap."
                )
            start, length = cooldown_start, cooldown_steps
        else:
            start, length = None, 0
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.cooldown_start = start
        self.cooldown_steps = length
        self.shape: CooldownShape = shape
        self.init_lr_ratio = float(init_lr_ratio)
        self.final_lr_ratio = float(final_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, step: int | None = None) -> float:
        """Multiplier ``lambda(step)`` of the current configuration (default: at ``last_epoch``)."""
        return wsd_lr_factor(
            self.last_epoch if step is None else step,
            warmup_steps=self.warmup_steps,
            cooldown_start=self.cooldown_start,
            cooldown_steps=self.cooldown_steps,
            shape=self.shape,
            init_lr_ratio=self.init_lr_ratio,
            final_lr_ratio=self.final_lr_ratio,
        )

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """Closed-form LRs ``base_lr * lambda(last_epoch)``, one per param group."""
        factor = self.lr_factor()
        return [float(base) * factor for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def _apply_lr(self) -> None:
        """Write the closed-form LR of ``last_epoch`` into every param group (overrides restored values)."""
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            if isinstance(group["lr"], Tensor):  # e.g. capturable optimizers keep the LR in a tensor: no aliasing
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        groups = self.optimizer.param_groups
        self._last_lr = [g["lr"].clone() if isinstance(g["lr"], Tensor) else g["lr"] for g in groups]

    def set_cooldown(
        self,
        *,
        start: int,
        steps: int,
        shape: CooldownShape | None = None,
        final_lr_ratio: float | None = None,
    ) -> None:
        """Place (or move) the cooldown and rewrite the param groups' LR for the current step at once.

        Args:
            start: First cooldown step ``S >= warmup_steps``.
            steps: Cooldown length ``L >= 0``.
            shape: New cooldown shape; ``None`` keeps the current one.
            final_lr_ratio: New final multiplier in ``[0, 1]``; ``None`` keeps the current one.

        Raises:
            ValueError: If ``start < warmup_steps``, a count is negative, ``shape`` is unknown or
                ``final_lr_ratio`` is outside ``[0, 1]``.
        """
        _check_nonneg_int("start", start)
        _check_nonneg_int("steps", steps)
        if start < self.warmup_steps:
            raise ValueError(f"`start` ({start}) must be >= `warmup_steps` ({self.warmup_steps}): phases overlap.")
        if shape is not None:
            _check_shape(shape)
            self.shape = shape
        if final_lr_ratio is not None:
            _check_ratio("final_lr_ratio", final_lr_ratio)
            self.final_lr_ratio = float(final_lr_ratio)
        self.cooldown_start = start
        self.cooldown_steps = steps
        self.total_steps = start + steps
        self._apply_lr()

    def resume_at(self, step: int) -> None:
        """Continue the schedule at optimizer step ``step`` (a scheduler created after ``step`` steps were taken).

        Sets the step counters as if :meth:`step` had been called ``step`` times and writes that step's LR into the
        param groups.

        Raises:
            ValueError: If ``step`` is negative.
        """
        _check_nonneg_int("step", step)
        self.last_epoch = step
        self._step_count = step + 1  # LRScheduler's own counter (its order check between optimizer and scheduler)
        self._apply_lr()

    @property
    def phase(self) -> str:
        """Phase of the next optimizer step: ``"warmup"``, ``"stable"``, ``"cooldown"`` or ``"final"``."""
        n = self.last_epoch
        if n < self.warmup_steps:
            return "warmup"
        if self.cooldown_start is None or n < self.cooldown_start:
            return "stable"
        if n < self.cooldown_start + self.cooldown_steps:
            return "cooldown"
        return "final"

    def _config(self) -> dict[str, Any]:
        return {
            "warmup_steps": self.warmup_steps,
            "cooldown_start": self.cooldown_start,
            "cooldown_steps": self.cooldown_steps,
            "shape": self.shape,
            "init_lr_ratio": self.init_lr_ratio,
            "final_lr_ratio": self.final_lr_ratio,
        }

    def state_dict(self) -> dict[str, Any]:
        """Step counters (the only state), plus the saved config and ``base_lrs`` for information."""
        return {
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "base_lrs": [float(b) for b in self.base_lrs],
            "config": self._config(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step counters; keep this scheduler's config and ``base_lrs``; re-apply the LR at once.

        ``Optimizer.load_state_dict`` restores the saved ``lr`` of each group; this method overwrites it with the
        *current* configuration's closed form, so the first resumed step already runs at the new LR.
        """
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        saved_base = state_dict.get("base_lrs")
        if saved_base is not None and [float(b) for b in saved_base] != [float(b) for b in self.base_lrs]:
            warnings.warn(
                f"WSDScheduler: checkpoint peak LRs {list(saved_base)} differ from the configured "
                f"{[float(b) for b in self.base_lrs]}; the configured ones are used.",
                RuntimeWarning,
                stacklevel=2,
            )
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base
        self._apply_lr()
