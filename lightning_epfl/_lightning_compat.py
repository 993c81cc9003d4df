"""The package's only uses of Lightning internals, for what no public hook offers.

Checked against Lightning 2.5 and 2.6 (``pyproject.toml`` pins ``lightning<2.7``); rerun the tests of
``ValidateAtStart``, ``FeatureRankMonitor(probe="val")`` and the collaborative strategy (simulated and 2-process)
before raising the bound.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def run_fit_validation(trainer: pl.Trainer) -> None:
    """Run the fit loop's validation loop now, as Lightning does between training batches.

    No public API validates before the first training step; this drives ``trainer.fit_loop.epoch_loop.val_loop``
    so that logging, callbacks and ``limit_val_batches`` behave as in any validation during ``fit``.
    """
    trainer.validating = True
    try:
        trainer.fit_loop.epoch_loop.val_loop.run()
    finally:
        trainer.training = True


def fit_val_dataloaders(trainer: pl.Trainer) -> Any:
    """The validation loaders of the running ``fit`` (``trainer.val_dataloaders``), set up now if not yet.

    Lightning sets up validation data lazily, at the first validation; ``val_loop.setup_data()`` is the loop's own
    idempotent set-up, which the first validation then reuses. With ``limit_val_batches=0`` it sets up nothing, and
    the loaders given to ``fit`` are only reachable through the loop's private ``_data_source``.
    """
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    if trainer.val_dataloaders is None:
        val_loop.setup_data()
    if trainer.val_dataloaders is None and val_loop._data_source.is_defined():
        return val_loop._data_source.dataloader()
    return trainer.val_dataloaders


def optimizers_to_device(optimizers: list[Any], device: Any) -> None:
    """Move optimizer state tensors to ``device`` (Lightning's own helper, as ``DDPStrategy`` uses it after setup)."""
    from lightning.fabric.utilities.optimizer import _optimizers_to_device

    _optimizers_to_device(optimizers, device)


class InProcessWhenSimulated:
    """Mixin for a ``DDPStrategy`` subclass: with one process in total, run in this process, without a launcher and
    without a process group.

    ``DDPStrategy`` always configures a launcher, which with one process still sets ``torch``'s thread count (and
    ``OMP_NUM_THREADS``) to the machine's core count, and initializes a one-process group. A simulated collaborative
    run needs neither, and must keep the caller's thread count for reproducible numbers. The override is of
    Lightning's private ``_configure_launcher``.
    """

    def _configure_launcher(self) -> None:
        if self.num_nodes * self.num_processes == 1:  # type: ignore[attr-defined]
            self._launcher = None
            return
        super()._configure_launcher()  # type: ignore[misc]

    def setup_distributed(self) -> None:
        if self.num_nodes * self.num_processes == 1:  # type: ignore[attr-defined]
            self.set_world_ranks()  # type: ignore[attr-defined]
            return
        super().setup_distributed()  # type: ignore[misc]
