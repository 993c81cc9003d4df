r"""
Feature rank monitor
====================

Tracks the rank of chosen layers' features on a fixed probe set during training, as in Fan, Pascanu & Jaggi,
*Deep Grokking: Would Deep Neural Networks Generalize Better?* (arXiv:2405.19454, Sec. 4), where the numerical rank
of each Linear layer's output on held-out data falls around the grokking transition.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate
from typing_extensions import override

from lightning_epfl._lightning_compat import fit_val_dataloaders
from lightning_epfl.functional.rank import METRICS, spectral_metrics
from lightning_epfl.utilities import save_figure

_WRAPPER_PREFIXES = ("_forward_module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class FeatureRankMonitor(Callback):
    r"""Log the numerical and effective rank of layer features on a fixed probe set (arXiv:2405.19454).

    Every ``every_n_steps`` optimizer steps (and at step 0 and at the end of training) the callback puts the model in
    ``eval()`` mode, runs the probe inputs through it under ``torch.no_grad()`` with autocast disabled, collects the
    outputs of the selected layers with temporary forward hooks (removed, and the previous train/eval mode restored,
    even if the forward raises), and computes per layer the metrics of :func:`~lightning_epfl.functional.rank.
    spectral_metrics` on the features ``H`` of shape ``(num_samples, n_features)``. By default these are the paper's
    ``numerical_rank`` (``matrix_rank(torch.cov(H.T))`` in float64) and the threshold-free ``effective_rank``
    (Roy & Vetterli 2007).

    Values are logged by global rank 0 as ``{log_prefix}/{metric}/{layer}`` through every logger in
    ``trainer.loggers`` at ``step=trainer.global_step`` and kept in :attr:`history`. At the end of training a plot
    ``feature_rank.png`` (each metric per layer vs step, above the ``overlay_metrics`` such as accuracy) is written to
    ``trainer.log_dir``.

    The probe is the first ``num_samples`` items of the validation (or training) *dataset*, read in order without the
    sampler (so the global RNG and hence training are not affected), fixed in ``on_fit_start``. Use
    :meth:`set_probe` to give inputs directly and override :meth:`extract_inputs` for unusual batch structures.

    Under DDP only rank 0 runs the probe, on the bare LightningModule; under FSDP/DeepSpeed, whose forward is a
    collective, every rank runs it and rank 0 computes and logs.

    Args:
        probe: ``"val"`` (default, held-out data as in the paper) or ``"train"``.
        num_samples: Number of probe samples ``n`` (at least 2). Must not exceed the dataset size.
        batch_size: Chunk size of the probe forward passes.
        layers: Module names (as in ``named_modules()``) or ``fnmatch`` patterns (``"linears.*"``) to monitor. Takes
            precedence over ``layer_types``.
        layer_types: Class names of the leaf modules to monitor when ``layers`` is ``None``; ``None`` means
            ``["Linear"]`` (every leaf ``nn.Linear``, output layer included, as in the paper).
        reduction: How outputs with more than two dims are turned into ``(n, d)``: ``"flatten"`` all non-batch
            dims, or ``"mean"`` over the dims between the batch and the last (``(N, T, D) → (N, D)``) or over the
            spatial dims of ``(N, C, H, W)`` outputs (``→ (N, C)``).
        every_n_steps: Probe period in optimizer steps (``trainer.global_step``). Must be ``>= 1``.
        metrics: Names from ``numerical_rank``, ``effective_rank``, ``stable_rank``, ``pca_rank``, ``rankme``,
            ``dead_units``; ``None`` means ``["numerical_rank", "effective_rank"]``.
        rtol: Tolerance of ``numerical_rank`` on covariance eigenvalues; ``None`` → ``d · eps(compute_dtype)``.
        compute_dtype: ``"float64"`` (paper) or ``"float32"`` (a soft rank: larger tolerance).
        center: Centre features (covariance) before the spectral metrics.
        max_features: Randomly subsample this many feature columns (fixed per layer by ``seed``) when a layer has
            more; ``None`` keeps all. The anchor implementation caps at 8000.
        seed: Seed of the private generator used for column subsampling (the global RNG is never touched).
        log_prefix: Metric key prefix; also part of :attr:`state_key`, so two monitors need different prefixes.
        log_via: ``"loggers"`` (default: ``log_metrics`` at the exact step) or ``"self.log"`` (``pl_module.log``;
            then ``every_n_steps`` must be a multiple of ``trainer.log_every_n_steps`` or values are dropped; the
            loggers then stamp values with Lightning's counter, ``global_step - 1``, and the step-0 probe, made where
            ``self.log`` is not allowed, goes to the loggers directly).
        plot: Write ``feature_rank.png`` at the end of training (needs matplotlib).
        overlay_metrics: Keys of ``trainer.callback_metrics`` recorded at each probe and drawn under the ranks;
            ``None`` means ``["train/acc", "val/acc"]``.

    Raises:
        MisconfigurationException: In ``__init__`` if ``probe``, ``reduction``, ``compute_dtype``, ``log_via`` or a
            metric name is not an allowed value, or ``num_samples < 2``, ``batch_size < 1``, ``every_n_steps < 1``,
            ``rtol < 0``, ``max_features < 1``; in ``setup`` if ``log_via="self.log"`` and ``every_n_steps`` is not a
            multiple of ``log_every_n_steps``; in ``on_fit_start`` if a layer name does not exist (the message lists
            the valid ones), no layer matches, or ``num_samples`` exceeds the probe dataset.
    """

    def __init__(
        self,
        probe: Literal["val", "train"] = "val",
        num_samples: int = 2048,
        batch_size: int = 512,
        layers: list[str] | None = None,
        layer_types: list[str] | None = None,
        reduction: Literal["flatten", "mean"] = "flatten",
        every_n_steps: int = 1000,
        metrics: list[str] | None = None,
        rtol: float | None = None,
        compute_dtype: Literal["float64", "float32"] = "float64",
        center: bool = True,
        max_features: int | None = 8192,
        seed: int = 0,
        log_prefix: str = "feature_rank",
        log_via: Literal["loggers", "self.log"] = "loggers",
        plot: bool = True,
        overlay_metrics: list[str] | None = None,
    ) -> None:
        metrics = ["numerical_rank", "effective_rank"] if metrics is None else list(metrics)
        layer_types = ["Linear"] if layer_types is None else list(layer_types)
        overlay_metrics = ["train/acc", "val/acc"] if overlay_metrics is None else list(overlay_metrics)
        choices = {
            "probe": (probe, ("val", "train")),
            "reduction": (reduction, ("flatten", "mean")),
            "compute_dtype": (compute_dtype, ("float64", "float32")),
            "log_via": (log_via, ("loggers", "self.log")),
        }
        for arg, (value, allowed) in choices.items():
            if value not in allowed:
                raise MisconfigurationException(
                    f"FeatureRankMonitor: `{arg}` must be one of {list(allowed)}, got {value!r}."
                )
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise MisconfigurationException(
                f"FeatureRankMonitor: `metrics` must be a non-empty list from {list(METRICS)}, got {metrics}."
            )
        if num_samples < 2:
            raise MisconfigurationException(
                f"FeatureRankMonitor: `num_samples` must be >= 2 (covariance needs 2 samples), got {num_samples}."
            )
        if batch_size < 1:
            raise MisconfigurationException(f"FeatureRankMonitor: `batch_size` must be >= 1, got {batch_size}.")
        if every_n_steps < 1:
            raise MisconfigurationException(f"FeatureRankMonitor: `every_n_steps` must be >= 1, got {every_n_steps}.")
        if rtol is not None and rtol < 0:
            raise MisconfigurationException(f"FeatureRankMonitor: `rtol` must be >= 0 or None, got {rtol}.")
        if max_features is not None and max_features < 1:
            raise MisconfigurationException(
                f"FeatureRankMonitor: `max_features` must be >= 1 or None, got {max_features}."
            )
        if layers is not None and not layers:
            raise MisconfigurationException(
                "FeatureRankMonitor: `layers` must be None or a non-empty list of module names/patterns."
            )
        if layers is None and not layer_types:
            raise MisconfigurationException(
                "FeatureRankMonitor: `layer_types` must be non-empty when `layers` is None."
            )
        self.probe = probe
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.layers = None if layers is None else list(layers)
        self.layer_types = layer_types
        self.reduction = reduction
        self.every_n_steps = every_n_steps
        self.metrics = metrics
        self.rtol = rtol
        self.compute_dtype = compute_dtype
        self.center = center
        self.max_features = max_features
        self.seed = seed
        self.log_prefix = log_prefix
        self.log_via = log_via
        self.plot = plot
        self.overlay_metrics = overlay_metrics

        self.history: list[dict[str, Any]] = []
        self.last_step: int = -1
        self._probe_inputs: Tensor | None = None
        self._probe_indices: list[int] | None = None
        self._user_probe = False
        self._layer_names: list[str] = []
        self._handles: list[Any] = []
        self._probe_all_ranks = False

    # ------------------------------------------------------------------ configuration
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(log_prefix=self.log_prefix)

    def fingerprint(self) -> str:
        """Hash of the settings that determine the logged values (stored in checkpoints, checked on resume)."""
        cfg = {
            k: getattr(self, k)
            for k in (
                "probe",
                "num_samples",
                "layers",
                "layer_types",
                "reduction",
                "metrics",
                "rtol",
                "compute_dtype",
                "center",
                "max_features",
                "seed",
            )
        }
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]

    def set_probe(self, inputs: Tensor) -> None:
        """Use ``inputs`` of shape ``(n, ...)`` (``n >= 2``) as the probe instead of reading the dataset.

        Raises:
            MisconfigurationException: If ``inputs`` is not a tensor with at least 2 rows.
        """
        if not isinstance(inputs, Tensor) or inputs.ndim < 1 or inputs.shape[0] < 2:
            raise MisconfigurationException(
                "FeatureRankMonitor: `set_probe` needs a tensor of shape (n, ...) with n >= 2."
            )
        self._probe_inputs = inputs.detach().cpu()
        self._probe_indices = None
        self._user_probe = True

    def extract_inputs(self, item: Any) -> Tensor:
        """Return the model input from one dataset item (or collated batch): a tensor, the first element of a
        tuple/list, or the ``"x"``/``"input"``/``"inputs"``/``"input_ids"`` entry of a dict. Override for other
        structures."""
        if isinstance(item, Tensor):
            return item
        if isinstance(item, (tuple, list)) and item:
            return self.extract_inputs(item[0])
        if isinstance(item, dict):
            for key in ("x", "input", "inputs", "input_ids"):
                if key in item:
                    return item[key]
        raise MisconfigurationException(
            f"FeatureRankMonitor cannot find the model input in a {type(item).__name__}; override `extract_inputs`."
        )

    def select_layers(self, module: nn.Module) -> list[str]:
        """Names of the modules to monitor (``layers`` names/patterns, else leaf modules of ``layer_types``).

        Raises:
            MisconfigurationException: If a name does not exist (listing valid names) or nothing matches.
        """
        named = {_clean_name(n): m for n, m in module.named_modules() if n}
        valid = list(named)
        if self.layers is not None:
            selected: list[str] = []
            for pattern in self.layers:
                if any(c in pattern for c in "*?["):
                    hits = [n for n in valid if fnmatch.fnmatchcase(n, pattern)]
                else:
                    hits = [pattern] if pattern in named else []
                if not hits:
                    raise MisconfigurationException(
                        f"FeatureRankMonitor: `layers` entry {pattern!r} matches no module of "
                        f"{type(module).__name__}; valid names: {valid}."
                    )
                selected += [h for h in hits if h not in selected]
            return selected
        selected = [
            n for n, m in named.items() if not any(True for _ in m.children()) and type(m).__name__ in self.layer_types
        ]
        if not selected:
            raise MisconfigurationException(
                f"FeatureRankMonitor: `layer_types` {self.layer_types} matches no leaf module of "
                f"{type(module).__name__}; leaf types present: "
                f"{sorted({type(m).__name__ for m in named.values() if not any(True for _ in m.children())})}."
            )
        return selected

    # ------------------------------------------------------------------ measurement
    def _reduce(self, out: Any) -> Tensor:
        if isinstance(out, (tuple, list)):
            out = out[0]
        if hasattr(out, "last_hidden_state"):
            out = out.last_hidden_state
        if not isinstance(out, Tensor):
            raise MisconfigurationException(f"FeatureRankMonitor: layer output of type {type(out).__name__}.")
        out = out.detach()
        if out.ndim == 1:
            out = out[:, None]
        elif out.ndim > 2:
            if self.reduction == "flatten":
                out = out.flatten(1)
            elif out.ndim == 4:  # (N, C, H, W) -> (N, C)
                out = out.mean(dim=(2, 3))
            else:  # (N, ..., D) -> (N, D)
                out = out.mean(dim=tuple(range(1, out.ndim - 1)))
        return out.cpu()

    @contextmanager
    def _hooks(self, module: nn.Module, names: list[str], store: dict[str, list[Tensor]]) -> Iterator[None]:
        modules = {_clean_name(n): m for n, m in module.named_modules() if n}
        try:
            for name in names:
                store[name] = []
                self._handles.append(
                    modules[name].register_forward_hook(
                        lambda _m, _i, out, name=name: store[name].append(self._reduce(out))
                    )
                )
            yield
        finally:
            self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def collect_features(self, module: nn.Module, inputs: Tensor, layers: list[str] | None = None) -> dict[str, Tensor]:
        """Run ``inputs`` ``(n, ...)`` through ``module`` (eval, no_grad, autocast off, in ``batch_size`` chunks) and
        return ``{layer: features (n, d)}``; the previous train/eval mode is restored and the hooks removed even if
        the forward raises."""
        names = self.select_layers(module) if layers is None else layers
        store: dict[str, list[Tensor]] = {}
        was_training = module.training
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        try:
            module.eval()
            with self._hooks(module, names, store), torch.no_grad(), torch.autocast(device.type, enabled=False):
                for chunk in inputs.split(self.batch_size):
                    chunk = chunk.to(device)
                    if chunk.is_floating_point() and param is not None and param.is_floating_point():
                        chunk = chunk.to(param.dtype)
                    module(chunk)
        finally:
            module.train(was_training)
        feats = {}
        for i, name in enumerate(names):
            if not store[name]:
                raise MisconfigurationException(f"Layer {name!r} was not called in the forward pass of the probe.")
            h = torch.cat(store[name])
            if self.max_features is not None and h.shape[1] > self.max_features:
                gen = torch.Generator().manual_seed(self.seed + i)
                cols = torch.randperm(h.shape[1], generator=gen)[: self.max_features].sort().values
                h = h[:, cols]
            feats[name] = h
        return feats

    def compute(self, module: nn.Module, inputs: Tensor) -> dict[str, dict[str, float]]:
        """Rank metrics of every selected layer of ``module`` on ``inputs`` (``(n, ...)``), without a Trainer.

        Returns:
            ``{layer_name: {metric: value}}``.
        """
        names = self.select_layers(module)
        feats = self.collect_features(module, inputs, names)
        return {
            name: spectral_metrics(
                h, self.metrics, rtol=self.rtol, center=self.center, compute_dtype=self.compute_dtype
            )
            for name, h in feats.items()
        }

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.log_via == "self.log" and self.every_n_steps % trainer.log_every_n_steps != 0:
            raise MisconfigurationException(
                f"FeatureRankMonitor: `every_n_steps`={self.every_n_steps} must be a multiple of `log_every_n_steps`="
                f"{trainer.log_every_n_steps} with `log_via='self.log'` (else values are dropped); use "
                "`log_via='loggers'`."
            )
        if self.log_via == "loggers" and not trainer.loggers:
            rank_zero_warn(
                "FeatureRankMonitor has no logger to write to; values are only kept in `history`.",
                category=RuntimeWarning,
            )
        name = type(trainer.strategy).__name__
        self._probe_all_ranks = "FSDP" in name or "DeepSpeed" in name

    def _probe_dataset(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        # the fit loop's own loaders: the train loader is set up before `on_train_start`, validation lazily
        loaders = trainer.train_dataloader if self.probe == "train" else fit_val_dataloaders(trainer)
        if loaders is None:
            raise MisconfigurationException(
                f"FeatureRankMonitor(probe={self.probe!r}) found no {self.probe} dataloader; pass one, use "
                "`probe='train'`, or call `set_probe`."
            )
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0]
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()))
        return loaders

    def _build_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = self._probe_dataset(trainer, pl_module)
        dataset = loader.dataset if isinstance(loader, DataLoader) else None
        if isinstance(dataset, Dataset) and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            size = len(dataset)
            if self.num_samples > size:
                raise MisconfigurationException(
                    f"FeatureRankMonitor: `num_samples`={self.num_samples} exceeds the {self.probe} dataset size "
                    f"{size}; use `num_samples <= {size}`."
                )
            items = [dataset[i] for i in range(self.num_samples)]
            self._probe_inputs = self.extract_inputs(default_collate(items)).detach().cpu()
            self._probe_indices = list(range(self.num_samples))
            return
        chunks, n = [], 0
        for batch in loader:
            x = self.extract_inputs(batch)
            chunks.append(x.detach().cpu())
            n += len(x)
            if n >= self.num_samples:
                break
        if n < self.num_samples:
            raise MisconfigurationException(
                f"FeatureRankMonitor: `num_samples`={self.num_samples} exceeds the {n} samples of the {self.probe} "
                "dataloader."
            )
        self._probe_inputs = torch.cat(chunks)[: self.num_samples]
        self._probe_indices = list(range(self.num_samples))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layer_names = self.select_layers(pl_module)

    def should_probe(self, trainer: pl.Trainer) -> bool:
        """Whether to measure now: ``global_step`` is a multiple of ``every_n_steps`` and not measured yet."""
        step = trainer.global_step
        return step % self.every_n_steps == 0 and step != self.last_step

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_batch_hook: bool) -> None:
        step = trainer.global_step
        self.last_step = step
        if not (trainer.is_global_zero or self._probe_all_ranks):
            return
        assert self._probe_inputs is not None
        feats = self.collect_features(pl_module, self._probe_inputs, self._layer_names)
        if not trainer.is_global_zero:
            return
        values: dict[str, float] = {}
        for name, h in feats.items():
            res = spectral_metrics(
                h, self.metrics, rtol=self.rtol, center=self.center, compute_dtype=self.compute_dtype
            )
            for metric, v in res.items():
                values[f"{self.log_prefix}/{metric}/{name}"] = v
        overlay = {}
        for key in self.overlay_metrics:
            v = trainer.callback_metrics.get(key)
            if v is not None:
                overlay[key] = float(v)
        self.history.append({"step": step, "values": values, "overlay": overlay})
        if self.log_via == "self.log" and in_batch_hook:
            for key, v in values.items():
                pl_module.log(key, v, on_step=True, on_epoch=False, rank_zero_only=True)
        else:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._user_probe:
            self._build_probe(trainer, pl_module)
        if self.should_probe(trainer):
            self._measure(trainer, pl_module, in_batch_hook=False)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.should_probe(trainer):
            self._measure(trainer, pl_module, in_batch_hook=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self.last_step:
            self._measure(trainer, pl_module, in_batch_hook=False)
        if self.plot and trainer.is_global_zero and self.history:
            self.save_plot(os.path.join(trainer.log_dir or trainer.default_root_dir, "feature_rank.png"))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------ state and plot
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(h) for h in self.history],
            "last_step": self.last_step,
            "probe_indices": self._probe_indices,
            "fingerprint": self.fingerprint(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("fingerprint") != self.fingerprint():
            rank_zero_warn(
                "FeatureRankMonitor settings differ from the checkpoint's; its rank history is discarded.",
                category=RuntimeWarning,
            )
            return
        self.history = [dict(h) for h in state_dict["history"]]
        self.last_step = int(state_dict["last_step"])
        self._probe_indices = state_dict.get("probe_indices")

    def series(self, metric: str) -> dict[str, tuple[list[int], list[float]]]:
        """``{layer: (steps, values)}`` of one metric from :attr:`history`."""
        out: dict[str, tuple[list[int], list[float]]] = {}
        prefix = f"{self.log_prefix}/{metric}/"
        for rec in self.history:
            for key, v in rec["values"].items():
                if key.startswith(prefix):
                    steps, vals = out.setdefault(key[len(prefix) :], ([], []))
                    steps.append(rec["step"])
                    vals.append(v)
        return out

    def save_plot(self, path: str) -> str | None:
        """Write the rank-vs-step figure (one panel per metric, one line per layer, overlay metrics below) to
        ``path`` via a temporary file and ``os.replace``. Returns the path, or ``None`` without matplotlib."""
        try:
            from matplotlib import colormaps
            from matplotlib.figure import Figure
        except ImportError:  # pragma: no cover
            rank_zero_warn("matplotlib is not installed; FeatureRankMonitor skips its plot.", category=RuntimeWarning)
            return None
        panels = [m for m in self.metrics]
        has_overlay = any(rec["overlay"] for rec in self.history)
        n = len(panels) + int(has_overlay)
        fig = Figure(figsize=(8, 2.6 * n))  # not registered with pyplot: the user's backend is left alone
        axes = fig.subplots(n, 1, sharex=True, squeeze=False)
        axes = axes[:, 0]
        if has_overlay:
            ax = axes[0]
            for key in self.overlay_metrics:
                pts = [(r["step"], r["overlay"][key]) for r in self.history if key in r["overlay"]]
                if pts:
                    ax.plot(*zip(*pts), marker=".", label=key)
            ax.set_ylabel("logged metrics")
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=8)
        cmap = colormaps["viridis"]
        for ax, metric in zip(axes[int(has_overlay) :], panels):
            series = self.series(metric)
            for i, (layer, (steps, vals)) in enumerate(series.items()):
                ax.plot(steps, vals, marker=".", color=cmap(0.85 * i / max(len(series) - 1, 1)), label=layer)
            ax.set_ylabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
        axes[-1].set_xlabel("optimizer step")
        fig.suptitle(f"Feature rank on {self.num_samples} {self.probe} samples ({self.compute_dtype})")
        fig.tight_layout()
        return save_figure(fig, path, dpi=110)


__all__ = ["FeatureRankMonitor"]
