"""LightningCLI entry point: ``lightning-epfl {fit,validate,test,predict}`` and ``python -m lightning_epfl``.

Every component of the package is importable by ``class_path`` (``lightning_epfl.callbacks.WindowedSWA``,
``lightning_epfl.modules.CausalLMModule``, ...), so a YAML file can compose any of them.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI, LRSchedulerTypeUnion

from lightning_epfl.utilities import step_scheduler_config


class EPFLCLI(LightningCLI):
    """LightningCLI whose automatic top-level ``lr_scheduler`` steps once per optimizer step.

    Lightning's default ``configure_optimizers`` returns ``[optimizer], [scheduler]``, which Lightning steps once
    per *epoch*; schedules in this package (``WSDScheduler``) are functions of the optimizer step, so the
    scheduler is returned with ``interval="step"`` (``ReduceLROnPlateau`` keeps its epoch interval and monitor).
    """

    @staticmethod
    def configure_optimizers(
        lightning_module: LightningModule,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: LRSchedulerTypeUnion | None = None,
    ) -> Any:
        return step_scheduler_config(optimizer, lr_scheduler)


def cli_main(args: ArgsType = None, run: bool = True) -> EPFLCLI:
    """Build (and by default run) the package's LightningCLI.

    Args:
        args: Command-line arguments (list or dict); ``None`` reads ``sys.argv``.
        run: Whether to run the subcommand (``fit``, ``validate``, ``test``, ``predict``).

    Returns:
        The CLI object (``cli.trainer``, ``cli.model``, ``cli.datamodule``).
    """
    import lightning_epfl  # noqa: F401  (registers components)

    return EPFLCLI(
        LightningModule,
        None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=True,
    )


def main() -> None:
    """Console-script entry point (``lightning-epfl``): run the CLI on ``sys.argv``."""
    cli_main()


if __name__ == "__main__":  # pragma: no cover
    main()
