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
    """Write a file under a temporary name in the same folder, flush it to disk, then rename it over ``path``.

    A process killed at any moment leaves either the previous file or the complete new one under ``path`` (and at
    most a ``<path>.tmp<pid>`` file, see :func:`remove_dead_temporaries`); the file and the rename are ``fsync``-ed,
    so the same holds across a power loss on file systems that honour ``fsync``.

    Args:
        path: Final file path; its folder is created if missing.
        write: Called with the temporary path; must create that file.

    Returns:
        ``path`` as a string.

    Raises:
        Whatever ``write`` raises; the temporary file is removed first and ``path`` is left untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename: a power loss leaves the old file or the new one
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)
    return path


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    finally:
        os.close(fd)


def remove_dead_temporaries(folder: str | os.PathLike, pattern: str = "*.tmp*") -> list[str]:
    """Delete temporary files of :func:`atomic_write` (``<name>.tmp<pid>``) whose process no longer runs.

    A process killed while writing leaves its temporary file behind; the final name was never touched.

    Returns:
        The removed paths.
    """
    import glob

    removed = []
    for tmp in glob.glob(os.path.join(os.fspath(folder), pattern)):
        pid = tmp.rsplit(".tmp", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            os.remove(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


def umask_permissions(folder: str | os.PathLike) -> None:
    """Give a folder made by ``tempfile.mkdtemp`` (mode 0700) and everything in it the process umask's permissions.

    Folders are built under a private temporary name and renamed into place; without this the published folder and
    its files would stay readable by their owner only.
    """
    from pathlib import Path

    umask = os.umask(0)
    os.umask(umask)
    root = Path(folder)
    os.chmod(root, 0o777 & ~umask)
    for child in root.rglob("*"):
        os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~umask)


EXPORT_MARKER = ".lightning-epfl-export"
"""File in every folder written by :func:`atomic_directory` (marks it as safe to replace by a later export)."""


def check_export_target(directory: str | os.PathLike, replace: bool = True) -> str:
    """Check, before any work, that an export may be written to ``directory`` (see :func:`atomic_directory`).

    Args:
        directory: The export folder.
        replace: Whether an earlier export in ``directory`` may be replaced. Default ``True``; with ``False`` any
            non-empty folder is refused.

    Returns:
        The absolute path.

    Raises:
        FileExistsError: If ``directory`` is a file, a non-empty folder that no export wrote, or (``replace=False``)
            an earlier export.
    """
    directory = os.path.abspath(directory)
    if os.path.lexists(directory):
        if not os.path.isdir(directory):
            raise FileExistsError(f"{directory!r} is a file; give a folder path for the export.")
        entries = os.listdir(directory)
        if entries and EXPORT_MARKER not in entries:
            raise FileExistsError(
                f"{directory!r} already holds files that no export wrote ({sorted(entries)[:3]}...); an export "
                "replaces its whole folder, so choose a new or empty folder."
            )
        if entries and not replace:
            raise FileExistsError(
                f"{directory!r} already holds an earlier export; choose a new folder (or allow replacing it, "
                "e.g. `--overwrite` on the command line)."
            )
    return directory


def atomic_directory(directory: str | os.PathLike, write: Callable[[str], Any]) -> str:
    """Build a folder under a temporary name beside ``directory`` with ``write(tmp)``, then rename it into place.

    An existing ``directory`` is replaced only if it is empty or an earlier export (it holds the
    :data:`EXPORT_MARKER` file every export writes); it is moved aside first and deleted only after the new one is in
    place, so a crash leaves either the old folder or the new one (plus a hidden ``.old-*``/``.tmp-*`` folder), never
    a half-written one.

    Returns:
        The absolute path of ``directory``.

    Raises:
        FileExistsError: If ``directory`` is a file, or a non-empty folder that no export wrote (nothing is touched).
    """
    import shutil
    import tempfile

    directory = check_export_target(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        write(tmp)
        with open(os.path.join(tmp, EXPORT_MARKER), "w") as fh:
            fh.write("written by lightning-epfl; the folder is replaced whole by the next export here\n")
        umask_permissions(tmp)
        old = None
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=".old-export-", dir=parent)
            os.replace(directory, os.path.join(old, "x"))
        os.replace(tmp, directory)
        _fsync_folder(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


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
    """Save a matplotlib figure through :func:`atomic_write` (format from the extension, default PNG) and close it.

    Figures made with ``matplotlib.figure.Figure()`` (no pyplot, no backend switch) are saved as they are; figures
    made by pyplot are also closed in pyplot.
    """
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
    finally:
        if getattr(fig.canvas, "manager", None) is not None:  # created by pyplot: release it there
            import matplotlib.pyplot as plt

            plt.close(fig)


def new_figure(figsize: tuple[float, float] = (6.4, 4.8)) -> Any:
    """A matplotlib ``Figure`` that is not registered with pyplot: drawing it never changes the user's backend."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def check_checkpoint_path(ckpt_path: str | os.PathLike | None, argument: str = "ckpt_path") -> dict | None:
    """Check that a checkpoint to resume from exists and is a complete Lightning checkpoint.

    Lightning's special values (``"last"``, ``"best"``, ``"hpc"``, ``"registry..."``) and remote URLs pass unchecked.
    The file is opened with ``torch.load(..., mmap=True, weights_only=True)``: the structure is read, the tensors
    are only mapped.

    Returns:
        The (memory-mapped) checkpoint, or ``None`` when nothing was checked.

    Raises:
        MisconfigurationException: If the file does not exist, is truncated, is not a PyTorch checkpoint, or is a
            PyTorch file but not a Lightning checkpoint (e.g. exported weights); the message names the argument and
            the path.
    """
    if ckpt_path is None:
        return None
    text = os.fspath(ckpt_path)
    if text.startswith(_SPECIAL_CKPT_PATHS) or "://" in text:
        return None
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    if not os.path.isfile(text):
        what = "is a folder, not a checkpoint file" if os.path.isdir(text) else "does not exist"
        raise MisconfigurationException(f"`{argument}` {text!r} {what}.")
    import zipfile

    import torch

    if not zipfile.is_zipfile(text):
        raise MisconfigurationException(
            f"`{argument}` {text!r} is not a readable checkpoint: the file is truncated or not a PyTorch checkpoint "
            f"({os.path.getsize(text)} bytes, no valid zip archive). Resume from another checkpoint."
        )
    try:
        checkpoint = torch.load(text, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError ... by cause
        reason = str(err).split("\n")[0]
        raise MisconfigurationException(
            f"`{argument}` {text!r} is not a readable checkpoint ({type(err).__name__}: {reason[:200]}). "
            "Resume from another checkpoint."
        ) from err
    if not isinstance(checkpoint, dict) or not {"pytorch-lightning_version", "state_dict"} <= set(checkpoint):
        raise MisconfigurationException(
            f"`{argument}` {text!r} is a PyTorch file but not a Lightning checkpoint (no `state_dict` and "
            "`pytorch-lightning_version` entries; exported weights such as SWA averages cannot be resumed from). "
            "Give a checkpoint written by the Trainer (`checkpoints/step=...ckpt`)."
        )
    return checkpoint


def warn_on_unreachable_intervals(trainer: Any) -> None:
    """Warn when ``max_steps`` is below the validation or checkpoint interval (the run would never reach them)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    total = getattr(trainer, "max_steps", -1)
    if total is None or total < 1 or getattr(trainer, "fast_dev_run", False):
        return
    interval = getattr(trainer, "val_check_interval", None)
    if isinstance(interval, int) and not isinstance(interval, bool) and interval > total:
        rank_zero_warn(
            f"`trainer.val_check_interval`={interval} is larger than `trainer.max_steps`={total}: this run never "
            f"validates; use `--trainer.val_check_interval` <= {total}.",
            category=RuntimeWarning,
        )
    for cb in getattr(trainer, "callbacks", []):
        every = getattr(cb, "_every_n_train_steps", 0) if isinstance(cb, ModelCheckpoint) else 0
        if every and every > total:
            rank_zero_warn(
                f"ModelCheckpoint `every_n_train_steps`={every} is larger than `trainer.max_steps`={total}: this run "
                "writes no step checkpoint.",
                category=RuntimeWarning,
            )


def check_before_run(trainer: Any, pl_module: Any, datamodule: Any = None, checkpoint: dict | None = None) -> None:
    """Call ``check_config(trainer, pl_module, datamodule)`` of every component that defines it, before anything runs.

    Components (callbacks, the strategy, the module and the datamodule) validate settings that depend on each other
    or on the trainer (``max_steps``, the number of processes, ...) in a method ``check_config``; they also call it
    from their own ``setup``. The ``lightning-epfl`` CLI calls this function before the subcommand starts, so a bad
    combination fails before any process starts or any log folder, checkpoint or export is written.

    With the ``checkpoint`` to resume from, components that define ``check_resume(trainer, pl_module, checkpoint)``
    check it too (a cooldown that would start before the resumed step). Intervals the run never reaches are
    reported as warnings.

    Raises:
        MisconfigurationException: Whatever the first failing component raises.
    """
    components = [*getattr(trainer, "callbacks", []), getattr(trainer, "strategy", None), pl_module, datamodule]
    data = datamodule if datamodule is not None else getattr(trainer, "datamodule", None)
    for component in components:
        check = getattr(component, "check_config", None)
        if callable(check):
            check(trainer, pl_module, data)
    if checkpoint is not None:
        for component in components:
            check = getattr(component, "check_resume", None)
            if callable(check):
                check(trainer, pl_module, checkpoint)
    warn_on_unreachable_intervals(trainer)


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
