"""LightningCLI entry point: ``lightning-epfl {fit,validate,test,predict}`` and ``python -m lightning_epfl``.

Every component of the package is importable by ``class_path`` (``lightning_epfl.callbacks.WindowedSWA``,
``lightning_epfl.modules.CausalLMModule``, ...), so a YAML file can compose any of them.

Before a subcommand runs (before any process starts and before any log folder or checkpoint is written), the CLI
checks ``--ckpt_path`` and calls ``check_config(trainer, pl_module, datamodule)`` of every component that has one
(:func:`lightning_epfl.utilities.check_before_run`). The console script prints an error as one line, the
component's own message, and exits with status 1; ``--traceback`` (or ``LIGHTNING_EPFL_TRACEBACK=1``) shows the
full traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI, LRSchedulerTypeUnion
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_epfl.utilities import check_before_run, check_checkpoint_path, step_scheduler_config

TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "LIGHTNING_EPFL_TRACEBACK"


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

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Build the trainer with atomic checkpoint files.

        Lightning's default checkpoint IO is replaced by :class:`~lightning_epfl.checkpoint_io.AtomicCheckpointIO`
        (a custom one given with ``trainer.plugins`` is kept), so a run killed while saving never leaves a truncated
        checkpoint under its final name.
        """
        from lightning.fabric.plugins import TorchCheckpointIO

        from lightning_epfl.checkpoint_io import AtomicCheckpointIO

        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        """Parse, then check ``--ckpt_path`` before LightningCLI reads hyperparameters from it.

        LightningCLI replaces the configured model by the checkpoint's model class when they differ; a checkpoint of
        another model class is refused here instead.
        """
        super().parse_arguments(parser, args)
        self._resume_checkpoint = None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        path = self.config[subcommand].get("ckpt_path")
        checkpoint = check_checkpoint_path(path)
        if checkpoint is None:
            return
        saved = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
        model = self.config[subcommand].get("model")
        configured = getattr(model, "class_path", None) if model is not None else None
        if saved and configured and saved != configured:
            raise MisconfigurationException(
                f"`ckpt_path` {path!r} is a checkpoint of {saved}, but the configured model is {configured}; resume "
                "with the configuration that wrote the checkpoint."
            )
        self._resume_checkpoint = checkpoint

    def _check_before_run(self) -> None:
        check_before_run(self.trainer, self.model, self.datamodule, getattr(self, "_resume_checkpoint", None))

    def before_fit(self) -> None:
        """Checks before ``fit``: the checkpoint to resume from, and every component's ``check_config``."""
        self._check_before_run()

    def before_validate(self) -> None:
        """Checks before ``validate`` (as :meth:`before_fit`)."""
        self._check_before_run()

    def before_test(self) -> None:
        """Checks before ``test`` (as :meth:`before_fit`)."""
        self._check_before_run()

    def before_predict(self) -> None:
        """Checks before ``predict`` (as :meth:`before_fit`)."""
        self._check_before_run()


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


def error_message(err: BaseException) -> str:
    """The message a user should read for ``err``: the component's own message, not the parser's wrapper.

    jsonargparse wraps a constructor's exception in "Does not validate against any of the Union subtypes ..." with
    a dump of the configuration; the constructor's exception is in the ``__cause__`` chain. The first
    ``MisconfigurationException`` in the chain wins; otherwise a wrapped parser error gives its root cause.
    """
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    chosen = next((e for e in chain if isinstance(e, MisconfigurationException)), None)
    if chosen is not None:
        return " ".join(str(chosen).split())
    if str(err).startswith(_PARSER_WRAPPERS):
        own = _component_errors(str(err))
        if own:
            return " ".join(own[0].split())
        chosen = chain[-1]
    else:
        chosen = err
    return f"{type(chosen).__name__}: {' '.join(str(chosen).split())}"


_PARSER_WRAPPERS = ("Does not validate against", "Problem with given class_path")
_PARSER_TYPE_ERRORS = ("Expected a ", "Not a valid subclass", "Type <", "Given value", "Does not validate", "Import ")


def _component_errors(text: str) -> list[str]:
    """The errors listed under "Errors:" in a jsonargparse union message, minus its own type-mismatch notes.

    jsonargparse tries each type of a union and reports every failure; the component's constructor error is the one
    that is not a parser note ("Expected a <class 'str'>", "Not a valid subclass ...").
    """
    if "Errors:" not in text:
        return []
    block = text.split("Errors:", 1)[1].split("\nGiven value type:", 1)[0]
    items: list[str] = []
    for line in block.splitlines():
        if line.startswith("  - "):
            items.append(line[4:])
        elif items and line.startswith("    "):
            items[-1] += "\n" + line[4:]
    found: list[str] = []
    for item in items:
        if item.startswith(_PARSER_WRAPPERS):
            found += _component_errors(item)
        elif item.startswith("Problem with given class_path") or not item.startswith(_PARSER_TYPE_ERRORS):
            found.append(item.split(":\n", 1)[-1] if item.startswith("Problem with") else item)
    return found


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``lightning-epfl``): run the CLI on ``argv`` (default ``sys.argv[1:]``).

    An error ends the process with status 1 and the component's message as the last line on stderr; with
    ``--traceback`` anywhere in the arguments, or ``LIGHTNING_EPFL_TRACEBACK=1``, the exception propagates with its
    traceback.
    """
    from_command_line = argv is None
    args = list(sys.argv[1:] if argv is None else argv)
    show_traceback = TRACEBACK_FLAG in args or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    args = [a for a in args if a != TRACEBACK_FLAG]
    if from_command_line:  # LightningCLI reads sys.argv itself (passing `args` as well makes it warn)
        sys.argv = [sys.argv[0], *args]
    run_args = None if from_command_line else args
    if show_traceback:
        cli_main(run_args)
        return
    try:
        cli_main(run_args)
    except KeyboardInterrupt:
        print("lightning-epfl: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:  # noqa: BLE001 - every error becomes one readable line; --traceback shows the rest
        print(f"(run with {TRACEBACK_FLAG} for the full traceback)", file=sys.stderr)
        print(f"lightning-epfl: error: {error_message(err)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    main()
