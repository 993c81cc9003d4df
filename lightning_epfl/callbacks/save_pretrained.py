r"""
Save pretrained
^^^^^^^^^^^^^^^

Write the trained model as a ``transformers`` folder (LoRA adapters merged) when training ends, so that export and
evaluation tools (and ``from_pretrained``) can load what training produced; under a collaborative strategy, every
client's LoRA adapter in peft's format.
"""

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

__all__ = ["SavePretrained"]


class SavePretrained(Callback):
    """Call the module's ``save_pretrained(folder)`` at the end of ``fit`` (global rank 0 only).

    The module must have a ``save_pretrained(directory)`` method (``CausalLMModule`` has one: it merges LoRA adapters
    into a copy and writes the folder under a temporary name before renaming it). Under
    :class:`~lightning_epfl.strategies.CollaborativeStrategy` each client's LoRA adapter is written instead, to
    ``<folder>/client_{i}`` (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
    ``PeftModel.from_pretrained``; :func:`~lightning_epfl.strategies.export_client_adapter`).

    Args:
        dirpath: Output folder. Default ``None``: ``pretrained/`` inside the logger's version folder
            (``trainer.log_dir``), or inside ``trainer.default_root_dir`` without a logger, so every run writes its
            own folder and a branched run never replaces an earlier run's export.

    Raises:
        MisconfigurationException: In ``setup`` if the module has no ``save_pretrained`` method, or, under a
            collaborative strategy, its model has no LoRA adapters (``CausalLMModule(lora=...)``).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved_to: str | None = None

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if not callable(getattr(pl_module, "save_pretrained", None)):
            raise MisconfigurationException(
                f"SavePretrained needs a module with a `save_pretrained(directory)` method; "
                f"{type(pl_module).__name__} has none."
            )
        if self._collaborative(trainer) and getattr(pl_module, "lora", None) is None:
            raise MisconfigurationException(
                "SavePretrained under CollaborativeStrategy writes each client's LoRA adapter; the module has no "
                "`lora` settings (CausalLMModule(lora={...}))."
            )

    def resolve_dirpath(self, trainer: "pl.Trainer") -> str:
        """The folder this run writes to (see ``dirpath``)."""
        if self.dirpath is not None:
            return self.dirpath
        return os.path.join(trainer.log_dir or trainer.default_root_dir, "pretrained")

    @staticmethod
    def _collaborative(trainer: "pl.Trainer") -> bool:
        from lightning_epfl.strategies import CollaborativeStrategy

        return isinstance(trainer.strategy, CollaborativeStrategy)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        path = self.resolve_dirpath(trainer)
        if self._collaborative(trainer):
            from lightning_epfl.strategies import export_client_adapter

            for i in range(trainer.strategy.n_clients):  # type: ignore[attr-defined]
                export_client_adapter(trainer.strategy, i, os.path.join(path, f"client_{i}"))
            rank_zero_info(f"SavePretrained: wrote every client's LoRA adapter under {path}")
            self.saved_to = path
            return
        if trainer.is_global_zero:
            pl_module.save_pretrained(path)  # type: ignore[operator]
            rank_zero_info(f"SavePretrained: wrote the trained model to {path}")
        self.saved_to = path
        trainer.strategy.barrier("SavePretrained")
