"""LightningCLI entry point: ``lightning-epfl {fit,validate,test,predict}``, ``lightning-epfl export <method>``
and ``python -m lightning_epfl``.

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
        parser_kwargs={"exit_on_error": False},  # parse errors raise, so `main` can print them as one line
        auto_configure_optimizers=True,
    )


def error_message(err: BaseException) -> str:
    """The message a user should read for ``err``: the component's own message, not the parser's wrapper.

    jsonargparse wraps a constructor's exception, or a wrong option, in nested "Parser key ...: Does not validate
    against any of the Union subtypes ..." reports; the message of the innermost component is extracted, prefixed
    with the configuration key and class it concerns. A ``MisconfigurationException`` in the cause chain wins.
    """
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    chosen = next((e for e in chain if isinstance(e, MisconfigurationException)), None)
    if chosen is not None:
        return " ".join(str(chosen).split())
    for e in chain:
        inner = _innermost_parser_error(str(e))
        if inner:
            return inner
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


_PARSER_NOTES = (
    "Does not validate against",
    "Subtypes:",
    "Errors:",
    "Expected a ",
    "Given value",
    "Not a valid subclass",
    "Subclass types expect",
    "a class path",
    "a dict with",
    "Type <",
)


def _innermost_parser_error(text: str) -> str | None:
    """The first message in a jsonargparse error tree that is not one of its own notes, with its key and class.

    When every leaf is a type note (a value of the wrong type), the deepest key's value and the expected types are
    summarized instead.
    """
    if not any(m in text for m in ("Parser key", "Problem with given class_path", "Does not validate against")):
        return None
    context: list[tuple[int, str]] = []
    deepest: tuple[int, str, list[str], str] | None = None  # (depth, where, expected types, given value)
    for raw in text.splitlines():
        line = raw.strip()
        indent = len(raw) - len(raw.lstrip())
        if line.startswith("- "):
            line, indent = line[2:], indent + 2
        if not line:
            continue
        context = [(i, c) for i, c in context if i < indent]
        if line.startswith('Parser key "'):
            context.append((indent, line.split('"')[1]))
            continue
        if line.startswith("Problem with given class_path '"):
            context.append((indent, f"({line.split(chr(39))[1]})"))
            line = line.split("':", 1)[1].strip()
            if not line:
                continue
        keys = [c for _, c in context if not c.startswith("(")]
        classes = [c for _, c in context if c.startswith("(")]
        where = ".".join(keys) + (f" {classes[-1]}" if classes else "")
        if line.startswith(_PARSER_NOTES):
            if deepest is None or len(context) >= deepest[0]:
                if deepest is None or len(context) > deepest[0] or deepest[1] != where:
                    deepest = (len(context), where, [], "")
                if line.startswith("Expected a "):
                    deepest[2].append(line[len("Expected a ") :])
                elif line.startswith("Given value:") and not deepest[3]:
                    deepest = (deepest[0], deepest[1], deepest[2], line.split(":", 1)[1].strip())
            continue
        return f"{where}: {line}" if where else line
    if deepest is not None and deepest[2]:
        got = f"got {deepest[3]}; " if deepest[3] else ""
        return f"{deepest[1] or 'value'}: {got}expected " + " or ".join(deepest[2]) + "."
    return None


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

    def run() -> None:
        if args and args[0] == "export":  # compression without training: `lightning-epfl export quarot ...`
            from lightning_epfl.export.cli import export_main

            export_main(args[1:])
        else:
            cli_main(run_args)

    if show_traceback:
        run()
        return
    try:
        run()
    except KeyboardInterrupt:
        print("lightning-epfl: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:  # noqa: BLE001 - every error becomes one readable line; --traceback shows the rest
        print(f"(run with {TRACEBACK_FLAG} for the full traceback)", file=sys.stderr)
        print(f"lightning-epfl: error: {error_message(err)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    main()
