"""Crash-safe checkpoint files
=============================

:class:`AtomicCheckpointIO` writes every checkpoint under a temporary name in the checkpoint's own folder and renames
it into place, so a process killed while saving leaves either the complete file or no file under the final name.
Lightning's default ``TorchCheckpointIO`` stages the file in the system temporary folder and moves it; when that
folder is on another file system the move is a copy, and a kill during the copy leaves a truncated checkpoint under
the final name. Temporary files of processes killed while saving are removed at the next save in the same folder.
Files that are not complete Lightning checkpoints are refused with the path and the cause before loading.

The ``lightning-epfl`` CLI installs it in place of Lightning's default; elsewhere pass
``Trainer(plugins=[AtomicCheckpointIO()])``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_epfl.utilities import atomic_write, check_checkpoint_path, remove_dead_temporaries

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic on local disks and whose load errors name the file.

    Remote paths (``s3://``, ...) are handed to Lightning's implementation unchanged.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        remove_dead_temporaries(os.path.dirname(os.path.abspath(os.fspath(path))), "*.ckpt.tmp*")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    @override
    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" not in str(path):
            check_checkpoint_path(os.fspath(path))
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except MisconfigurationException:
            raise
        except Exception as err:  # noqa: BLE001 - name the file whatever torch raised
            raise MisconfigurationException(f"`ckpt_path` {str(path)!r} could not be loaded: {err}") from err
