"""The package's only uses of Lightning loop internals, for what no public hook offers.

Checked against Lightning 2.5 and 2.6 (``pyproject.toml`` pins ``lightning<2.7``); rerun the tests of
``ValidateAtStart`` and ``FeatureRankMonitor(probe="val")`` before raising the bound.
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
