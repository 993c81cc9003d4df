"""Small shared helpers: crash-safe file writes and the per-step scheduler configuration.

Imports nothing heavy at module level (benchmarks import it before configuring torch).

Everything the package writes (checkpoints, averaged weights, plots, benchmark results) goes through
:func:`atomic_write`, so an interrupted write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> str:
    """Write a file under a temporary name in the same folder, then rename it over ``path``.

    Args:
        path: Final file path; its folder is created if missing.
        write: Called with the temporary path; must create that file.

    Returns:
        ``path`` as a string.

    Raises:
        Whatever ``write`` raises; the temporary file is removed first and ``path`` is left untouched.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` through :func:`atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> str:
    """Save a matplotlib figure through :func:`atomic_write` (format from the extension, default PNG) and close it."""
    import matplotlib.pyplot as plt

    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
    finally:
        plt.close(fig)


def step_scheduler_config(optimizer: torch.optim.Optimizer, lr_scheduler: Any | None) -> Any:
    """Return what ``configure_optimizers`` should return so that ``lr_scheduler`` steps per optimizer step.

    Schedules in this package (``WSDScheduler``) are functions of the optimizer step; Lightning's default for a bare
    ``[optimizer], [scheduler]`` is once per epoch. ``ReduceLROnPlateau`` keeps the epoch interval and its monitor.

    Args:
        optimizer: The optimizer.
        lr_scheduler: A scheduler built on ``optimizer``, or ``None``.

    Returns:
        ``optimizer`` alone when there is no scheduler, else Lightning's optimizer-config dict.
    """
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    if lr_scheduler is None:
        return optimizer
    if isinstance(lr_scheduler, ReduceLROnPlateau):
        monitor = getattr(lr_scheduler, "monitor", "val/loss")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "monitor": monitor}}
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}
