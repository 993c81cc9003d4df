r"""
Windowed stochastic weight averaging
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Uniform averages of the weights along the training trajectory, restarted every ``window_steps`` optimizer steps,
evaluated next to the raw model and never touching the learning rate (Hägele et al., arXiv:2405.18392, Sec. 4.1;
after Izmailov et al., arXiv:1803.05407, without SWALR).

Why not Lightning's ``WeightAveraging`` (``lightning.pytorch.callbacks.WeightAveraging``, Lightning >= 2.6): it keeps
one ``AveragedModel`` that is updated from the first step, so it has no windows or horizons; it averages in the
model's dtype; it swaps the average into the module for *every* validation (the raw model is never validated, and the
initial weights are validated before any update, Lightning #21724); it overwrites the trained weights with the
average at the end of training; and it writes the average into the checkpoint's ``state_dict`` (the raw weights move
to another key), which breaks resuming and weight migration for other tools. Each of these is a hook this method has
to behave differently in, so this callback derives from ``Callback`` directly and shares only the math
(``lightning_epfl.functional.averaging``) with nothing else.
"""

import os
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from copy import deepcopy
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor
from typing_extensions import override

from lightning_epfl.functional.averaging import running_mean_, weighted_average
from lightning_epfl.utilities import atomic_torch_save

__all__ = ["WindowedSWA"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _free_path(path: str) -> str:
    """``path`` if no file has that name, else the first free ``<stem>-<k><ext>`` (with a warning)."""
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    k = 1
    while os.path.exists(f"{stem}-{k}{ext}"):
        k += 1
    rank_zero_warn(
        f"WindowedSWA: {path} exists (an earlier run's export) and is kept; this run writes {stem}-{k}{ext}.",
        category=RuntimeWarning,
    )
    return f"{stem}-{k}{ext}"


_REDUCE_FX = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}


def _reduce_name(reduce_fx: Any) -> str:
    if callable(reduce_fx):
        reduce_fx = getattr(reduce_fx, "__name__", "")
    name = _REDUCE_FX.get(str(reduce_fx).lower())
    if name is None:
        raise MisconfigurationException(
            f"WindowedSWA evaluates `self.log(..., reduce_fx=...)` with 'mean', 'sum', 'max' or 'min' (or torch.mean, "
            f"torch.sum, torch.max, torch.min), got {reduce_fx!r}."
        )
    return name


class _LogCollector:
    """Receives the ``log``/``log_dict`` calls of the private evaluation copy and reduces them like Lightning's
    epoch-level logging: ``reduce_fx`` ``"mean"`` (batch-size weighted), ``"sum"``, ``"max"`` or ``"min"``, combined
    across processes with the same operation (whatever ``sync_dist`` says, so every process logs the same value);
    torchmetrics objects are computed once at the end of the pass. A non-scalar tensor raises, as in ``self.log``.
    """

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.ops: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}
        self.batch: Any = None

    def log(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        logger: bool | None = None,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: Any = "mean",
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_group: Any = None,
        add_dataloader_idx: bool = True,
        batch_size: int | None = None,
        metric_attribute: str | None = None,
        rank_zero_only: bool = False,
    ) -> None:
        if hasattr(value, "compute") and hasattr(value, "reset"):  # a torchmetrics Metric
            self.metrics[name] = value
            return
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"`self.log({name!r}, value)` needs a scalar, got a tensor of shape {tuple(value.shape)} "
                    "(WindowedSWA evaluates what the module logs during validation)."
                )
            value = value.detach().float().item()
        op = _reduce_name(reduce_fx)
        if self.ops.setdefault(name, op) != op:
            raise ValueError(f"`{name}` is logged with reduce_fx {op!r} and {self.ops[name]!r} in one epoch.")
        if op == "mean":
            if batch_size is None:
                try:
                    batch_size = extract_batch_size(self.batch) if self.batch is not None else 1
                except Exception:  # noqa: BLE001 - any batch structure Lightning itself cannot size counts as 1
                    batch_size = 1
            self.values[name] = self.values.get(name, 0.0) + float(value) * batch_size
            self.weights[name] = self.weights.get(name, 0.0) + float(batch_size)
        elif op == "sum":
            self.values[name] = self.values.get(name, 0.0) + float(value)
        else:
            pick = max if op == "max" else min
            self.values[name] = pick(self.values.get(name, float(value)), float(value))

    def log_dict(
        self,
        dictionary: Mapping[str, Any],
        prog_bar: bool = False,
        logger: bool | None = None,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: Any = "mean",
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_group: Any = None,
        add_dataloader_idx: bool = True,
        batch_size: int | None = None,
        rank_zero_only: bool = False,
    ) -> None:
        for name, value in dictionary.items():
            self.log(name, value, reduce_fx=reduce_fx, batch_size=batch_size)

    def reduce(self, strategy: Any, device: torch.device) -> dict[str, float]:
        """Combine the values of every process (one collective per operation) and return ``{key: value}``."""
        out: dict[str, float] = {}
        for op in ("mean", "sum", "max", "min"):
            keys = sorted(k for k, o in self.ops.items() if o == op)
            if not keys:
                continue
            rows = [[self.values[k], self.weights.get(k, 1.0)] for k in keys]
            packed = torch.tensor(rows, dtype=torch.float64, device=device)
            if op in ("mean", "sum"):
                packed = strategy.reduce(packed, reduce_op="sum")
            else:
                gathered = strategy.all_gather(packed)
                if gathered.dim() == 3:
                    packed = gathered.amax(0) if op == "max" else gathered.amin(0)
            for k, (v, w) in zip(keys, packed.tolist()):
                if op != "mean":
                    out[k] = v
                elif w > 0:
                    out[k] = v / w
        for name, metric in self.metrics.items():
            out[name] = float(metric.compute())
            metric.reset()
        return out


class WindowedSWA(Callback):
    r"""Windowed SWA: uniform means of snapshots inside windows of ``window_steps`` steps (arXiv:2405.18392, Sec. 4.1).

    Window ``w`` covers optimizer steps ``(w H, (w+1) H]``. Every ``every_n_steps`` (``k``, with ``k | H``) the
    post-step weights join the window's running mean :math:`m \leftarrow m + (\theta - m)/c` in a ``dtype``
    accumulator. A window closes after its last step and is frozen; the last ``keep_windows`` closed windows are kept.
    Horizon ``j`` is the count-weighted mean of the last ``j`` closed windows, i.e. the mean of the last
    ``j H / k`` snapshots. The LR scheduler is never touched and the module keeps its raw weights.

    After each normal validation epoch (during ``fit``, no sanity check), every horizon with enough closed windows is
    evaluated on the first validation loader through a private copy of the module: every key the module logs during
    validation is logged again as ``<key><log_suffix>`` for horizon 1 and ``<key><log_suffix>_h<j>`` for horizon
    ``j > 1`` (``val/loss`` -> ``val/loss_swa``, ``val/loss_swa_h2``), batch-size weighted and summed over ranks,
    plus ``swa/windows``. Nothing is logged before the first window closes. The pass runs under
    ``torch.random.fork_rng``, so raw training is bitwise unchanged.

    State: the running mean and the closed windows are part of the callback's ``state_dict``, so every checkpoint
    holds exactly the averages it was saved with, wherever it is loaded from, and no later run (a resumed or
    branched one) can change them. At the end of training the average of every horizon is also exported to
    ``save_dir`` as ``swa_average_h<j>.pt`` (a ``state_dict`` in ``dtype``); an existing file is never replaced.

    Memory: a copy of the module (for evaluation) + one accumulator + ``keep_windows`` closed windows, each the size of
    the averaged tensors in ``dtype``; checkpoints grow by the same ``keep_windows + 1`` copies.

    Args:
        window_steps: Window length ``H`` in optimizer steps. Default 500 (the paper's).
        every_n_steps: Snapshot period ``k`` in optimizer steps; must divide ``window_steps``. Default 5.
        start_step: Snapshots are taken only at steps ``> start_step``. Default 0.
        keep_windows: Closed windows kept in memory (and in checkpoints). Default ``None``: ``max(horizons)``, the
            fewest the horizons need.
        horizons: Horizons (in windows) to evaluate, each in ``[1, keep_windows]``. Default ``[1]``.
        evaluate: Evaluate the averages after each validation epoch. Default ``True``.
        use_buffers: Also average floating-point buffers (BatchNorm statistics); other buffers take the latest
            value. Default ``True``.
        dtype: Accumulator dtype, ``"float32"`` (default) or ``"float64"``.
        device: Device of the accumulators and windows (e.g. ``"cpu"`` to spare GPU memory); default the module's.
        save_dir: Folder of the exported averages ``swa_average_h<j>.pt``, written at the end of training (temporary
            file + rename). Default ``None``: ``swa/`` inside the run's log folder (``trainer.log_dir``, i.e. the
            logger's version folder; ``trainer.default_root_dir`` without a logger), so each run, a branched one
            included, writes its own folder. A name already taken gets a numeric suffix (``swa_average_h1-1.pt``)
            with a warning: earlier exports are never overwritten.
        apply_at_end: Load the average of ``horizons[0]`` into the module when training ends. Default ``False``
            (the module keeps its raw, e.g. cooled-down, weights).
        log_suffix: Suffix of the averaged-model metric keys. Default ``"_swa"``.

    Raises:
        MisconfigurationException: If a count is not positive, ``every_n_steps`` does not divide ``window_steps``,
            a horizon is outside ``[1, keep_windows]``, ``dtype`` is unknown, ``log_suffix`` is empty, or the strategy
            shards the model (FSDP, DeepSpeed, ModelParallel).

    Example::

        trainer = Trainer(max_steps=3000, callbacks=[WindowedSWA(window_steps=300, every_n_steps=3, horizons=[1, 2])])
    """

    def __init__(
        self,
        window_steps: int = 500,
        every_n_steps: int = 5,
        start_step: int = 0,
        keep_windows: int | None = None,
        horizons: list[int] = [1],  # noqa: B006 - a YAML-friendly default; copied below, never mutated
        evaluate: bool = True,
        use_buffers: bool = True,
        dtype: Literal["float32", "float64"] = "float32",
        device: str | None = None,
        save_dir: str | None = None,
        apply_at_end: bool = False,
        log_suffix: str = "_swa",
    ) -> None:
        if window_steps < 1:
            raise MisconfigurationException(f"WindowedSWA: `window_steps` must be >= 1, got {window_steps}.")
        if every_n_steps < 1:
            raise MisconfigurationException(f"WindowedSWA: `every_n_steps` must be >= 1, got {every_n_steps}.")
        if window_steps % every_n_steps != 0:
            raise MisconfigurationException(
                f"WindowedSWA: `every_n_steps` ({every_n_steps}) must divide `window_steps` ({window_steps})."
            )
        if start_step < 0:
            raise MisconfigurationException(f"WindowedSWA: `start_step` must be >= 0, got {start_step}.")
        horizons = list(horizons)
        if not horizons or any(not isinstance(j, int) or isinstance(j, bool) or j < 1 for j in horizons):
            raise MisconfigurationException(
                f"WindowedSWA: `horizons` must be a non-empty list of integers >= 1 (e.g. [1, 2]), got {horizons}."
            )
        if keep_windows is None:
            keep_windows = max(horizons)
        if keep_windows < 1:
            raise MisconfigurationException(
                f"WindowedSWA: `keep_windows` must be >= 1 (or None for max(horizons)), got {keep_windows}."
            )
        if any(j > keep_windows for j in horizons):
            raise MisconfigurationException(
                f"WindowedSWA: `horizons` must be integers in [1, keep_windows={keep_windows}], got {horizons}."
            )
        if dtype not in _DTYPES:
            raise MisconfigurationException(f"WindowedSWA: `dtype` must be one of {list(_DTYPES)}, got {dtype!r}.")
        if not log_suffix:
            raise MisconfigurationException("WindowedSWA: `log_suffix` must be a non-empty string.")
        self.window_steps = window_steps
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.keep_windows = keep_windows
        self.horizons = [int(j) for j in horizons]
        self.evaluate = evaluate
        self.use_buffers = use_buffers
        self.dtype = dtype
        self.device = device
        self.save_dir = save_dir
        self.apply_at_end = apply_at_end
        self.log_suffix = log_suffix

        self._avg_keys: list[str] = []
        self._other_keys: list[str] = []
        self._refs: list[Tensor] = []
        self._other_refs: list[Tensor] = []
        self._mean: list[Tensor] | None = None
        self._others: dict[str, Tensor] = {}
        self._count = 0
        self._window: int | None = None
        self._closed: list[dict[str, Any]] = []
        self._last_update_step = 0
        self._eval_module: pl.LightningModule | None = None
        self._acc_device: torch.device = torch.device("cpu")
        self._restored_mean: dict[str, Tensor] | None = None
        self.exported: dict[int, str] = {}
        """Files written by the last ``fit`` at the end of training, by horizon."""

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(window_steps=self.window_steps, every_n_steps=self.every_n_steps)

    # ------------------------------------------------------------------ public API
    def resolve_save_dir(self, trainer: "pl.Trainer") -> str:
        """The folder this run exports to: ``save_dir``, or ``swa/`` in the run's log folder."""
        if self.save_dir is not None:
            return self.save_dir
        return os.path.join(trainer.log_dir or trainer.default_root_dir, "swa")

    @property
    def num_closed_windows(self) -> int:
        """Closed windows currently kept (at most ``keep_windows``)."""
        return len(self._closed)

    def should_update(self, step: int) -> bool:
        """Whether the weights after optimizer step ``step`` (1-based, ``trainer.global_step``) join the window.

        Override to customize; the default takes every ``every_n_steps``-th step after ``start_step``.
        """
        return step % self.every_n_steps == 0 and step > self.start_step

    def average_state_dict(self, horizon: int = 1) -> dict[str, Tensor]:
        """Average of the last ``horizon`` closed windows (count-weighted), as a module ``state_dict``.

        Args:
            horizon: Windows to average, ``>= 1``; fewer are used while fewer have closed.

        Returns:
            Fresh tensors (no aliasing with the callback's state) in the accumulator ``dtype``; entries that are not
            averaged (integer buffers, and float buffers with ``use_buffers=False``) hold the latest snapshot's value.

        Raises:
            ValueError: If ``horizon < 1`` or no window has closed yet.
        """
        if horizon < 1:
            raise ValueError(f"`horizon` must be >= 1, got {horizon}.")
        if not self._closed:
            raise ValueError("No SWA window has closed yet: there is no average to return.")
        last = self._closed[-horizon:]
        return weighted_average([self._window_state(w) for w in last], [w["count"] for w in last])

    @contextmanager
    def swapped(self, pl_module: "pl.LightningModule", horizon: int = 1) -> Generator[None, None, None]:
        """Context manager: the module holds the horizon-``horizon`` average inside, its raw weights after.

        Raises:
            ValueError: If no window has closed yet.
        """
        average = self.average_state_dict(horizon)
        backup = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(average)
        try:
            yield
        finally:
            pl_module.load_state_dict(backup)

    # ------------------------------------------------------------------ hooks
    def check_config(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", datamodule: "pl.LightningDataModule | None" = None
    ) -> None:
        """Refuse strategies that shard the model; called from :meth:`setup` and by the CLI before the run."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise MisconfigurationException(
                f"WindowedSWA does not support sharded models ({type(trainer.strategy).__name__}); use a DDP or "
                "single-device strategy (`trainer.strategy`)."
            )

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.check_config(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # After configure_model and the restore of module weights and callback state: the module is complete here.
        state = pl_module.state_dict(keep_vars=True)
        dtype = _DTYPES[self.dtype]
        self._acc_device = torch.device(self.device) if self.device is not None else pl_module.device
        self._avg_keys, self._other_keys, self._refs, self._other_refs = [], [], [], []
        for key, tensor in state.items():
            averaged = torch.is_floating_point(tensor) and (isinstance(tensor, torch.nn.Parameter) or self.use_buffers)
            (self._avg_keys if averaged else self._other_keys).append(key)
            (self._refs if averaged else self._other_refs).append(tensor)
        previous = self._mean  # a partial window from an earlier fit() call with this callback
        self._mean = [torch.zeros(r.shape, dtype=dtype, device=self._acc_device) for r in self._refs]
        if self._restored_mean is not None and self._count > 0:
            torch._foreach_copy_(self._mean, [self._restored_mean[k] for k in self._avg_keys])
        elif previous is not None and self._count > 0 and len(previous) == len(self._mean):
            torch._foreach_copy_(self._mean, previous)
        self._restored_mean = None
        self._others = {k: v.to(self._acc_device) for k, v in self._others.items()}
        for window in self._closed:
            if "state" in window:
                window["state"] = {k: v.to(self._acc_device) for k, v in window["state"].items()}
        if self.evaluate:
            self._eval_module = deepcopy(pl_module)
            self._eval_module.eval()
            self._eval_module.requires_grad_(False)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps taken: unchanged over accumulation micro-batches
        if step <= self._last_update_step or not self.should_update(step):
            return
        self._update(step)

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if (
            not self.evaluate
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or not self._closed
            or self._eval_module is None
        ):
            return
        for j in self.horizons:
            if len(self._closed) < j:
                continue
            suffix = self.log_suffix if j == 1 else f"{self.log_suffix}_h{j}"
            for key, value in self._evaluate(trainer, pl_module, j).items():
                pl_module.log(key + suffix, value, on_step=False, on_epoch=True, sync_dist=True)
        pl_module.log("swa/windows", float(len(self._closed)), on_step=False, on_epoch=True, sync_dist=True)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._closed:
            if self.apply_at_end:
                rank_zero_warn(
                    "WindowedSWA: no window closed, the module keeps its raw weights.", category=RuntimeWarning
                )
            return
        if trainer.is_global_zero:
            folder = self.resolve_save_dir(trainer)
            self.exported = {}
            for j in self.horizons:
                path = _free_path(os.path.join(folder, f"swa_average_h{j}.pt"))
                self.exported[j] = atomic_torch_save(self.average_state_dict(j), path)
        if self.apply_at_end:
            pl_module.load_state_dict(self.average_state_dict(self.horizons[0]))
            rank_zero_info(f"WindowedSWA: loaded the horizon-{self.horizons[0]} average into the module.")

    @override
    def on_load_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        callbacks = checkpoint.get("callbacks", {})
        if self.state_key not in callbacks and any(str(k).startswith("WindowedSWA") for k in callbacks):
            rank_zero_warn(
                "WindowedSWA: the checkpoint's SWA state was saved with another `window_steps`/`every_n_steps`; "
                "its windows are dropped and averaging restarts.",
                category=RuntimeWarning,
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        closed = [{"window": w["window"], "count": w["count"], "state": w["state"]} for w in self._closed]
        mean = None
        if self._mean is not None and self._count > 0:
            mean = {k: t.clone() for k, t in zip(self._avg_keys, self._mean)}
        return {
            "window_steps": self.window_steps,
            "every_n_steps": self.every_n_steps,
            "last_update_step": self._last_update_step,
            "window": self._window,
            "count": self._count,
            "mean": mean,
            "others": {k: v.clone() for k, v in self._others.items()},
            "closed": closed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state_dict.get("window_steps"), state_dict.get("every_n_steps")) != (self.window_steps, self.every_n_steps):
            rank_zero_warn(
                "WindowedSWA: checkpoint state has another `window_steps`/`every_n_steps`; windows dropped.",
                category=RuntimeWarning,
            )
            return
        self._last_update_step = int(state_dict["last_update_step"])
        self._window = state_dict["window"]
        self._count = int(state_dict["count"])
        self._restored_mean = state_dict["mean"]
        self._others = dict(state_dict.get("others", {}))
        self._closed = []
        for entry in state_dict["closed"]:
            window = {"window": entry["window"], "count": entry["count"]}
            if "state" in entry:
                window["state"] = entry["state"]
            elif os.path.exists(entry["file"]):  # checkpoints of versions that kept closed windows in files
                window["state"] = torch.load(entry["file"], map_location="cpu", weights_only=True)
            else:
                rank_zero_warn(
                    f"WindowedSWA: window file {entry['file']} named by an old-format checkpoint is missing; "
                    "window dropped.",
                    category=RuntimeWarning,
                )
                continue
            self._closed.append(window)

    # ------------------------------------------------------------------ internals
    def _update(self, step: int) -> None:
        assert self._mean is not None, "WindowedSWA: on_fit_start did not run"
        window = (step - 1) // self.window_steps
        if self._window is not None and window != self._window and self._count > 0:
            self._close_window()
        self._window = window
        self._count += 1
        running_mean_(self._mean, [r.detach() for r in self._refs], self._count)
        self._others = {
            k: r.detach().to(self._acc_device, copy=True) for k, r in zip(self._other_keys, self._other_refs)
        }
        self._last_update_step = step
        if step % self.window_steps == 0:
            self._close_window()

    def _close_window(self) -> None:
        assert self._mean is not None and self._window is not None
        state = {k: m.clone() for k, m in zip(self._avg_keys, self._mean)}
        state.update({k: v.clone() for k, v in self._others.items()})
        self._closed.append({"window": self._window, "count": self._count, "state": state})
        del self._closed[: -self.keep_windows]
        self._count = 0
        self._window = None

    def _window_state(self, window: dict[str, Any]) -> dict[str, Tensor]:
        keys = self._avg_keys + self._other_keys
        state = window["state"]
        return {k: state[k] for k in keys} if keys else state

    def _evaluate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", horizon: int) -> dict[str, float]:
        """Validation metrics of the horizon-``horizon`` average through the private copy (first val loader)."""
        module = self._eval_module
        assert module is not None
        loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0]
        if isinstance(loaders, Mapping):
            loaders = next(iter(loaders.values()))
        limit = trainer.num_val_batches[0] if trainer.num_val_batches else float("inf")
        collector = _LogCollector()
        module.load_state_dict(self.average_state_dict(horizon))
        module.log = collector.log  # type: ignore[method-assign]
        module.log_dict = collector.log_dict  # type: ignore[method-assign]
        module.trainer = trainer  # shared reference (read-only use by validation_step), detached again below
        cuda = pl_module.device.type == "cuda"
        rng_devices = [pl_module.device.index or 0] if cuda else []
        try:
            with (
                torch.random.fork_rng(devices=rng_devices, device_type="cuda"),
                torch.no_grad(),
                trainer.precision_plugin.val_step_context(),
            ):
                module.on_validation_epoch_start()
                for batch_idx, batch in enumerate(loaders):
                    if batch_idx >= limit:
                        break
                    batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                    collector.batch = batch
                    module.validation_step(batch, batch_idx)
                collector.batch = None
                module.on_validation_epoch_end()
        finally:
            module.trainer = None  # type: ignore[assignment]
            del module.log, module.log_dict
        return collector.reduce(trainer.strategy, pl_module.device)
