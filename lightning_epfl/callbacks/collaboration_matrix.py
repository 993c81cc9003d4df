"""Collaboration matrix logger
=============================

Periodically records the ``[n, n]`` collaboration matrix of a collaborative strategy (CoBo's learned ``W``,
arXiv:2409.05539 Fig. 2; IFCA's co-assignment; a fixed gossip ``W``), draws it as a heatmap with the clients
ordered by their true cluster, and, when the datamodule knows the true clusters, records how well ``W`` recovers
them in its history (``w_within``, ``w_between``, ``pair_accuracy``, ``ari_components``, ``ari_spectral``), for
plots over time. The scalar metrics ``collab/*`` are logged by the strategy at every evaluation
(``CollaborativeStrategy.recovery_metrics``, the same numbers); this callback logs none, so each key has one owner.

**Where the matrix comes from** (:meth:`CollaborationMatrixLogger.get_matrix`, overridable): the first of
``trainer.strategy.collaboration_matrix()``, ``trainer.strategy.algorithm.collaboration_matrix()`` or
``trainer.strategy.W`` that exists. True clusters come from ``trainer.datamodule.true_clusters`` (optional).

**Files** (in ``save_dir``, default ``<trainer.log_dir>/collaboration_matrix``; every file is written to a
temporary name and renamed): ``matrix_{step}.npy``, ``matrix_{step}.png`` (when ``plot`` and matplotlib is
available) and ``history.npz`` (``steps [T]``, ``matrices [T, n, n]`` and one ``[T]`` array per recovery metric,
NaN without true clusters). Images also go to TensorBoard (``experiment.add_image``) or any logger with
``log_image`` (W&B).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_epfl.functional.collab_metrics import recovery_metrics
from lightning_epfl.utilities import atomic_write_bytes

__all__ = ["CollaborationMatrixLogger", "cluster_order", "plot_collaboration_matrix", "plot_matrix_history"]

_METRICS = ("w_within", "w_between", "pair_accuracy", "ari_components", "ari_spectral")


def cluster_order(clusters: Tensor | None, n: int) -> np.ndarray:
    """Client order that groups clients by cluster (stable, so ties keep client order); identity without clusters."""
    if clusters is None:
        return np.arange(n)
    return np.argsort(np.asarray(torch.as_tensor(clusters).cpu()), kind="stable")


def plot_collaboration_matrix(
    W: Tensor | np.ndarray,
    clusters: Tensor | None = None,
    ax: Any = None,
    mask_diagonal: bool = True,
    order_by_cluster: bool = True,
    title: str | None = None,
) -> Any:
    """Draw ``W`` as a heatmap (matplotlib).

    Args:
        W: ``[n, n]`` matrix.
        clusters: ``[n]`` true cluster ids; with ``order_by_cluster`` rows/columns are sorted by cluster and cluster
            boundaries are drawn.
        ax: Axes to draw on; a new figure is made when ``None``.
        mask_diagonal: Hide the diagonal (meaningless in CoBo's box mode).
        order_by_cluster: Sort clients by ``clusters``.
        title: Axes title.

    Returns:
        The matplotlib ``Axes``; ``ax.images[0].get_array()`` holds the drawn (ordered, masked) matrix.
    """
    import matplotlib.pyplot as plt

    w = np.asarray(torch.as_tensor(W).detach().cpu().double())
    n = w.shape[0]
    order = cluster_order(clusters if order_by_cluster else None, n)
    shown = w[np.ix_(order, order)]
    if mask_diagonal:
        shown = np.ma.masked_array(shown, mask=np.eye(n, dtype=bool))
    if ax is None:
        _, ax = plt.subplots(figsize=(4.8, 4.2))
    image = ax.imshow(shown, cmap="viridis", interpolation="nearest", vmin=min(0.0, float(w.min())))
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if clusters is not None and order_by_cluster:
        sorted_c = np.asarray(torch.as_tensor(clusters).cpu())[order]
        for b in np.flatnonzero(np.diff(sorted_c)) + 0.5:
            ax.axhline(b, color="white", linewidth=0.8)
            ax.axvline(b, color="white", linewidth=0.8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if clusters is not None and order_by_cluster:  # tick labels are positions; the order is printed in the title
        ax.set_xlabel("client position, sorted by true cluster")
    else:
        ax.set_xlabel("client")
    ax.set_ylabel("client")
    if title:
        ax.set_title(title)
    return ax


def plot_matrix_history(history: Mapping[str, Any] | str, metric: str, ax: Any = None) -> Any:
    """Plot one recovery metric of a ``history.npz`` (path or loaded mapping) against the step.

    Args:
        history: Path to ``history.npz`` or a mapping with ``steps`` and ``metric`` arrays.
        metric: One of ``w_within``, ``w_between``, ``pair_accuracy``, ``ari_components``, ``ari_spectral``.
        ax: Axes to draw on; a new figure is made when ``None``.

    Raises:
        ValueError: If ``metric`` is not in the history.
    """
    import matplotlib.pyplot as plt

    data = dict(np.load(history)) if isinstance(history, str) else dict(history)
    if metric not in data:
        raise ValueError(f"`metric` must be one of {sorted(k for k in data if k not in ('steps', 'matrices'))}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.8, 3.2))
    ax.plot(data["steps"], data[metric], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    return ax


class CollaborationMatrixLogger(Callback):
    """Save, plot and score the strategy's collaboration matrix every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: Logging period in optimizer steps (also logs at the end of training). Must be positive.
        plot: Draw a heatmap PNG (needs matplotlib; without it a warning is issued once and plots are skipped).
        mask_diagonal: Hide the diagonal in the heatmap.
        order_by_cluster: Order clients by their true cluster in the heatmap.
        save_dir: Output directory; default ``<trainer.log_dir>/collaboration_matrix``.

    Attributes:
        last_logged_step: The last step logged (``-1`` before the first).
        last_metrics: The recovery metrics of the last logged matrix (empty without true clusters).

    Raises:
        MisconfigurationException: If ``every_n_steps < 1`` (in ``__init__``), or the strategy exposes no
            collaboration matrix (in ``setup``).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        plot: bool = True,
        mask_diagonal: bool = True,
        order_by_cluster: bool = True,
        save_dir: str | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise MisconfigurationException(
                f"CollaborationMatrixLogger: `every_n_steps` must be >= 1, got {every_n_steps}."
            )
        self.every_n_steps = every_n_steps
        self.plot = plot
        self.mask_diagonal = mask_diagonal
        self.order_by_cluster = order_by_cluster
        self.save_dir = save_dir
        self.last_logged_step = -1
        self.last_metrics: dict[str, float] = {}
        self._dir: str | None = None
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, save_dir=self.save_dir)

    # ---------------------------------------------------------------- overridable accessors
    def get_matrix(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        """Return the current ``[n, n]`` matrix, or ``None`` when there is none (e.g. a Local baseline)."""
        strategy = trainer.strategy
        fn = getattr(strategy, "collaboration_matrix", None)
        if not callable(fn):
            fn = getattr(getattr(strategy, "algorithm", None), "collaboration_matrix", None)
        if callable(fn):
            return fn()
        return getattr(strategy, "W", None)

    def get_true_clusters(self, trainer: pl.Trainer) -> Tensor | None:
        """Return ``trainer.datamodule.true_clusters`` when available."""
        clusters = getattr(getattr(trainer, "datamodule", None), "true_clusters", None)
        return None if clusters is None else torch.as_tensor(clusters).long().cpu()

    def should_log(self, trainer: pl.Trainer) -> bool:
        """Whether to log at the current ``trainer.global_step``."""
        step = trainer.global_step
        return step > 0 and step % self.every_n_steps == 0 and step != self.last_logged_step

    # ---------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        has = callable(getattr(strategy, "collaboration_matrix", None)) or callable(
            getattr(getattr(strategy, "algorithm", None), "collaboration_matrix", None)
        )
        if not has and not hasattr(strategy, "W"):
            raise MisconfigurationException(
                "CollaborationMatrixLogger needs a strategy exposing `collaboration_matrix()`, "
                "`algorithm.collaboration_matrix()` or `W` (e.g. CollaborativeStrategy); got "
                f"{type(strategy).__name__}."
            )
        base = trainer.log_dir or trainer.default_root_dir
        self._dir = self.save_dir or os.path.join(base, "collaboration_matrix")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.should_log(trainer):
            self.log_matrix(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 and trainer.global_step != self.last_logged_step and not trainer.sanity_checking:
            self.log_matrix(trainer, pl_module)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)

    def log_matrix(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read, score, save and plot the matrix at the current step (called on every rank; rank 0 writes)."""
        step = trainer.global_step
        W = self.get_matrix(trainer, pl_module)
        self.last_logged_step = step
        if W is None:
            self._warn_once("none", "CollaborationMatrixLogger: the strategy has no collaboration matrix; skipping.")
            return
        w = torch.as_tensor(W).detach().cpu().double()
        clusters = self.get_true_clusters(trainer)
        metrics: dict[str, float] = {}
        if clusters is not None and clusters.numel() == w.shape[0]:
            score = getattr(trainer.strategy, "recovery_metrics", None)  # the strategy's own numbers (its seed)
            metrics = score(w) if callable(score) else recovery_metrics(w, clusters)
        self.last_metrics = metrics
        if not trainer.is_global_zero:
            return
        assert self._dir is not None
        os.makedirs(self._dir, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, w.numpy())
        atomic_write_bytes(os.path.join(self._dir, f"matrix_{step}.npy"), buf.getvalue())
        self._append_history(step, w.numpy(), metrics)
        if self.plot:
            self._plot(trainer, w, clusters, step)

    def _append_history(self, step: int, w: np.ndarray, metrics: dict[str, float]) -> None:
        path = os.path.join(self._dir, "history.npz")
        data: dict[str, np.ndarray] = {}
        if os.path.exists(path):
            with np.load(path) as old:
                data = {k: old[k] for k in old.files}
            keep = data["steps"] < step  # a resumed run overwrites what came after its checkpoint
            data = {k: v[keep] for k, v in data.items()}
            if data["matrices"].shape[1:] != w.shape:
                data = {}
        row = {"steps": np.array([step]), "matrices": w[None].astype(np.float64)}
        row.update({k: np.array([metrics.get(k, np.nan)], dtype=np.float64) for k in _METRICS})
        data = {k: np.concatenate([data[k], v]) if k in data else v for k, v in row.items()}
        buf = io.BytesIO()
        np.savez(buf, **data)
        atomic_write_bytes(path, buf.getvalue())

    def _plot(self, trainer: pl.Trainer, w: Tensor, clusters: Tensor | None, step: int) -> None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            self._warn_once("mpl", "CollaborationMatrixLogger: matplotlib is not installed; skipping heatmaps.")
            return
        fig = Figure(figsize=(4.8, 4.2))  # Agg canvas, no pyplot state
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        title = f"W at step {step}"
        if "ari_spectral" in self.last_metrics:
            title += f" (ARI {self.last_metrics['ari_spectral']:.2f})"
        plot_collaboration_matrix(w, clusters, ax, self.mask_diagonal, self.order_by_cluster, title)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(os.path.join(self._dir, f"matrix_{step}.png"), buf.getvalue())
        canvas.draw()
        image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("collab/matrix", image, global_step=step, dataformats="HWC")
            elif callable(getattr(logger, "log_image", None)):
                logger.log_image(key="collab/matrix", images=[image], step=step)

    # ---------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_logged_step": self.last_logged_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_logged_step = int(state_dict["last_logged_step"])
