r"""
Validate at start
^^^^^^^^^^^^^^^^^

Run the validation loop once before the first training step, so that every validation metric (``val/loss``,
``val/ppl``, ...) is logged at step 0 next to the values after training: the baseline of a fine-tune.
"""

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_epfl._lightning_compat import run_fit_validation

__all__ = ["ValidateAtStart"]


class ValidateAtStart(Callback):
    """Validate once before the first optimizer step of a fit; metrics are logged at ``step=0``.

    Nothing runs when the fit resumes from a checkpoint past step 0, or when the trainer has no validation
    (no ``val_dataloader``, ``validation_step`` or ``limit_val_batches=0``). Callbacks that act on validation see this
    pass like any other one (``ModelCheckpoint`` does not save at step 0; ``EarlyStopping`` counts it).

    Example::

        trainer = Trainer(max_steps=100, callbacks=[ValidateAtStart()])  # val/loss at steps 0 and 100
    """

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.global_step != 0 or not trainer.enable_validation:
            return
        run_fit_validation(trainer)
