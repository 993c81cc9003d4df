r"""
Cooldown
^^^^^^^^

Branch a cooldown from a constant-LR (trunk) checkpoint: resume with a new ``max_steps`` and this callback, and the
WSD scheduler cools down over the last part of the new run (Hägele et al., arXiv:2405.18392, Sec. 5).
"""

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig
from typing_extensions import override

from lightning_epfl.functional.schedules import _SHAPES, CooldownShape, WSDScheduler, resolve_cooldown

__all__ = ["Cooldown"]


def _planned_warmup_steps(pl_module: "pl.LightningModule") -> int | None:
    """Warmup of the ``WSDScheduler`` the module's ``lr_scheduler`` factory builds, or ``None`` if it builds another.

    Modules of this package take the scheduler as a factory (``LRSchedulerCallable``); it is called here on a
    throw-away one-parameter optimizer, so the check needs neither the model's weights nor its optimizer.
    """
    factory = getattr(pl_module, "lr_scheduler", None)
    if factory is None or not callable(factory) or isinstance(factory, torch.optim.lr_scheduler.LRScheduler):
        return None
    try:
        sched = factory(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    except Exception:  # noqa: BLE001 - a factory that needs the real optimizer is checked when training starts
        return None
    return sched.warmup_steps if isinstance(sched, WSDScheduler) else None


class Cooldown(Callback):
    """Place a WSD cooldown at the end of the current run (``trainer.max_steps``), e.g. when branching from a trunk.

    With ``N = trainer.max_steps``, the cooldown length is ``L = cooldown_steps`` or ``floor(cooldown_fraction * N)``
    and it starts at ``S = cooldown_start`` or ``N - L`` (:func:`~lightning_epfl.functional.resolve_cooldown`). Every
    :class:`~lightning_epfl.WSDScheduler` of the module gets :meth:`~lightning_epfl.WSDScheduler.set_cooldown`; if
    the module has no scheduler, a constant ``WSDScheduler`` (peak = each group's LR) is installed per optimizer.
    Resuming a trunk checkpoint at step ``S`` restores weights *and* optimizer state and then cools down, which
    equals a run planned with that cooldown from the start (the paper's Sec. 5 branching).

    Args:
        cooldown_fraction: Cooldown length as a fraction of ``max_steps``, in ``(0, 1]``. Default 0.2.
        cooldown_steps: Cooldown length in optimizer steps (overrides ``cooldown_fraction``).
        cooldown_start: First cooldown step; default ``max_steps - L``.
        shape: Cooldown shape (``1-sqrt`` default, ``linear``, ``cosine``, ``mirror_cosine``, ``1-square``).
        final_lr_ratio: LR multiplier at the end of the cooldown, in ``[0, 1]``. Default 0.

    Raises:
        MisconfigurationException: At construction for a fraction outside ``(0, 1]``, a negative step count, an
            unknown shape or a ratio outside ``[0, 1]``; before the run (:meth:`check_config`, :meth:`check_resume`:
            called by the CLI before anything is written, and from ``setup``) for a missing ``max_steps``, a cooldown
            that does not fit or overlaps the warmup, or one that starts before the resumed step; at fit start for a
            scheduler that is not a ``WSDScheduler`` or is stepped per epoch.

    A branch from a checkpoint saved inside (or after) the cooldown it was trained with restarts at the peak LR; that
    is allowed, with a warning: branch from a stable-phase checkpoint instead.

    Example::

        # trunk: 4000 constant-LR steps; branch from its step-3200 checkpoint and cool down for 800 steps
        trainer = Trainer(max_steps=4000, callbacks=[Cooldown(cooldown_fraction=0.2)])
        trainer.fit(model, ckpt_path="trunk/step=3200.ckpt")
    """

    def __init__(
        self,
        cooldown_fraction: float = 0.2,
        cooldown_steps: int | None = None,
        cooldown_start: int | None = None,
        shape: CooldownShape = "1-sqrt",
        final_lr_ratio: float = 0.0,
    ) -> None:
        if not 0.0 < cooldown_fraction <= 1.0:
            raise MisconfigurationException(
                f"Cooldown: `cooldown_fraction` must be in (0, 1], got {cooldown_fraction}."
            )
        if cooldown_steps is not None and cooldown_steps < 0:
            raise MisconfigurationException(f"Cooldown: `cooldown_steps` must be >= 0 or None, got {cooldown_steps}.")
        if cooldown_start is not None and cooldown_start < 0:
            raise MisconfigurationException(f"Cooldown: `cooldown_start` must be >= 0 or None, got {cooldown_start}.")
        if shape not in _SHAPES:
            raise MisconfigurationException(f"Cooldown: `shape` must be one of {list(_SHAPES)}, got {shape!r}.")
        if not 0.0 <= final_lr_ratio <= 1.0:
            raise MisconfigurationException(f"Cooldown: `final_lr_ratio` must be in [0, 1], got {final_lr_ratio}.")
        self.cooldown_fraction = cooldown_fraction
        self.cooldown_steps = cooldown_steps
        self.cooldown_start = cooldown_start
        self.shape: CooldownShape = shape
        self.final_lr_ratio = final_lr_ratio
        self.start: int | None = None
        self.length: int | None = None
        self._loaded: tuple[int, int] | None = None
        self._installed: list[WSDScheduler] = []

    def check_config(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", datamodule: "pl.LightningDataModule | None" = None
    ) -> None:
        """Check the cooldown against ``trainer.max_steps`` and the module's warmup, before anything runs.

        Called from :meth:`setup` and, by the ``lightning-epfl`` CLI, before the run starts (before any process,
        log folder or checkpoint is created). The module's warmup is read from a ``WSDScheduler`` built by its
        ``lr_scheduler`` factory on a throw-away optimizer.

        Raises:
            MisconfigurationException: If ``max_steps`` is unset, the cooldown does not fit in it, or it would start
                inside the warmup; the message names every setting involved and a value that works.
        """
        if trainer.fast_dev_run:
            return
        total = trainer.max_steps
        if total is None or total < 1:
            raise MisconfigurationException(
                f"Cooldown needs `trainer.max_steps` >= 1 to place the cooldown, got max_steps={total}; set "
                "`trainer.max_steps` (e.g. --trainer.max_steps 1000)."
            )
        try:
            start, length = resolve_cooldown(
                total,
                cooldown_fraction=self.cooldown_fraction,
                cooldown_steps=self.cooldown_steps,
                cooldown_start=self.cooldown_start,
            )
        except ValueError as err:
            raise MisconfigurationException(
                f"Cooldown with `trainer.max_steps`={total}: {err} Raise `trainer.max_steps` or lower the cooldown "
                "(`cooldown_steps`/`cooldown_start` of the Cooldown callback)."
            ) from err
        warmup = _planned_warmup_steps(pl_module)
        if warmup is not None and start < warmup:
            raise MisconfigurationException(
                f"Cooldown: the cooldown would start at step {start} ({self._describe(total, length)}), inside the "
                f"warmup of {warmup} steps (the module's WSDScheduler `warmup_steps`={warmup}). Fix it with any of: "
                + "; ".join(self._fixes(total, start, warmup))
                + "."
            )

    def _describe(self, total: int, length: int) -> str:
        if self.cooldown_start is not None:
            return f"`cooldown_start`={self.cooldown_start}"
        if self.cooldown_steps is not None:
            return f"`trainer.max_steps`={total} - `cooldown_steps`={length}"
        return f"`trainer.max_steps`={total} x (1 - `cooldown_fraction`={self.cooldown_fraction}), {length} steps"

    def _min_total_steps(self, warmup: int) -> int:
        if self.cooldown_start is not None:
            return max(warmup, self.cooldown_start) + (self.cooldown_steps or 0)
        total = max(warmup, 1)
        while True:
            try:
                start, _ = resolve_cooldown(
                    total, cooldown_fraction=self.cooldown_fraction, cooldown_steps=self.cooldown_steps
                )
            except ValueError:
                start = -1
            if start >= warmup:
                return total
            total += 1

    def _fixes(self, total: int, start: int, warmup: int) -> list[str]:
        fixes = [f"`trainer.max_steps` >= {self._min_total_steps(warmup)}"]
        fixes.append(f"`warmup_steps` <= {start} (model.init_args.lr_scheduler.init_args.warmup_steps)")
        room = max(total - warmup, 0)
        if self.cooldown_start is not None:
            fixes.append(f"`cooldown_start` >= {warmup} (Cooldown callback)")
        elif room > 0 and self.cooldown_steps is not None:
            fixes.append(f"`cooldown_steps` <= {room} (Cooldown callback)")
        elif room > 0 and int(room / total * 1000) > 0:
            fixes.append(f"`cooldown_fraction` <= {int(room / total * 1000) / 1000:.3f} (Cooldown callback)")
        return fixes

    def check_resume(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        """Check the cooldown against the checkpoint the run resumes from (the CLI calls this before the run).

        Raises:
            MisconfigurationException: If the cooldown would start before the checkpoint's step (the message gives
                the smallest ``trainer.max_steps`` that works).
        """
        if trainer.fast_dev_run or trainer.max_steps is None or trainer.max_steps < 1:
            return
        step = int(checkpoint.get("global_step", 0))
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        saved = (state.get("start"), state.get("length"))
        start, length = resolve_cooldown(
            trainer.max_steps,
            cooldown_fraction=self.cooldown_fraction,
            cooldown_steps=self.cooldown_steps,
            cooldown_start=self.cooldown_start,
        )
        self._check_resumed_step(trainer.max_steps, start, length, step, same=saved == (start, length))
        if saved[0] is not None and step > saved[0] and saved != (start, length):
            rank_zero_warn(
                f"Cooldown: the checkpoint was saved at step {step}, inside (or after) the cooldown it was trained "
                f"with (from step {saved[0]}); this run goes back to the peak LR before its own cooldown. For a "
                f"cooldown branch, resume from a stable-phase checkpoint (step <= {saved[0]}).",
                category=RuntimeWarning,
            )

    def _check_resumed_step(self, total: int, start: int, length: int, step: int, same: bool) -> None:
        if start >= step or same:
            return
        need = total
        while need < 10 * max(total, step) + 10:
            need += 1
            try:
                first, _ = resolve_cooldown(
                    need, cooldown_fraction=self.cooldown_fraction, cooldown_steps=self.cooldown_steps
                )
            except ValueError:
                continue
            if first >= step:
                break
        fixes = [f"resume from a checkpoint at step <= {start}"]
        if self.cooldown_start is None:
            fixes.insert(0, f"`trainer.max_steps` >= {need}")
        raise MisconfigurationException(
            f"Cooldown: this run's cooldown would start at step {start} ({self._describe(total, length)}), before "
            f"the resumed step {step}. Fix it with any of: " + "; ".join(fixes) + "."
        )

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self.check_config(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        total = trainer.max_steps
        # fast_dev_run caps max_steps at a few batches: a cooldown over them is meaningless (it would overlap the
        # warmup), so only the scheduler checks below run and the cooldown is not placed.
        if not trainer.fast_dev_run:
            self.check_config(trainer, pl_module)
            self.start, self.length = resolve_cooldown(
                total,
                cooldown_fraction=self.cooldown_fraction,
                cooldown_steps=self.cooldown_steps,
                cooldown_start=self.cooldown_start,
            )
        configs = trainer.lr_scheduler_configs
        for config in configs:
            sched = config.scheduler
            if not isinstance(sched, WSDScheduler):
                raise MisconfigurationException(
                    f"Cooldown works only with `lightning_epfl.WSDScheduler`, found {type(sched).__name__}. "
                    "Remove that scheduler (Cooldown then installs a constant WSDScheduler) or use WSDScheduler."
                )
            if config.interval != "step":
                raise MisconfigurationException(
                    f"Cooldown needs the WSDScheduler stepped per optimizer step (interval='step'), got "
                    f"interval={config.interval!r}."
                )
        self._installed = []
        if not configs:
            for opt in trainer.optimizers:
                sched = WSDScheduler(opt)
                self._installed.append(sched)
                trainer.strategy.lr_scheduler_configs.append(LRSchedulerConfig(scheduler=sched, interval="step"))

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.fast_dev_run:
            rank_zero_info("Cooldown: fast_dev_run, the cooldown is not placed.")
            return
        assert self.start is not None and self.length is not None
        step = trainer.global_step
        self._check_resumed_step(
            trainer.max_steps, self.start, self.length, step, same=self._loaded == (self.start, self.length)
        )
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            assert isinstance(sched, WSDScheduler)
            if any(sched is s for s in self._installed):
                sched.resume_at(step)
            elif sched.last_epoch != step:
                raise MisconfigurationException(
                    f"WSDScheduler is at step {sched.last_epoch} but the trainer at global_step {step}; Cooldown "
                    "needs the scheduler stepped once per optimizer step from the start of training."
                )
            try:
                sched.set_cooldown(
                    start=self.start, steps=self.length, shape=self.shape, final_lr_ratio=self.final_lr_ratio
                )
            except ValueError as err:
                raise MisconfigurationException(f"Cooldown: {err}") from err
        rank_zero_info(
            f"Cooldown: {self.shape} from step {self.start} for {self.length} steps to "
            f"{self.final_lr_ratio} x peak (max_steps={trainer.max_steps}, resumed at step {step})."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "length": self.length}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        start, length = state_dict.get("start"), state_dict.get("length")
        self._loaded = None if start is None or length is None else (int(start), int(length))
