r"""
Export callbacks
^^^^^^^^^^^^^^^^

:class:`QuaRotExport` runs a QuaRot export (:mod:`lightning_epfl.export.quarot`) and :class:`SparseQuantExport` a
prune-and-quantize export (:mod:`lightning_epfl.export.sparse_quant`) inside a Lightning run: at the end of ``fit``,
at the start of ``test`` (so the test loop measures the compressed model) or when called. Both share
:class:`CompressionExport`: calibration batches drawn from the datamodule, perplexity before and after on the
validation batches, a logit comparison on the first validation batch, the figures logged to the run's loggers, a
progress bar over layers, an atomic export, and a state that keeps a resumed run from compressing twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_epfl.export import sparse_quant
from lightning_epfl.export.calibration import input_ids_of
from lightning_epfl.export.config import ExportConfig
from lightning_epfl.export.quarot import (
    QuaRotConfig,
    install_quantizers,
    is_transformed,
    perplexity,
    quarot_quantize_,
    save_quantized,
    validate_model,
)
from lightning_epfl.utilities import check_export_target

__all__ = ["CompressionExport", "QuaRotExport", "SparseQuantExport", "find_causal_lm"]


def find_causal_lm(pl_module: pl.LightningModule, who: str = "QuaRotExport") -> torch.nn.Module:
    """The transformers model inside a LightningModule (its ``model`` attribute, or the module itself).

    Args:
        pl_module: The LightningModule.
        who: The caller's name, used in the error messages.

    Raises:
        MisconfigurationException: If neither is a transformers model, or the model carries peft adapters (merge
            them first: ``SavePretrained`` writes a merged folder that ``lightning-epfl export`` reads).
    """
    for candidate in (getattr(pl_module, "model", None), pl_module):
        if candidate is not None and callable(getattr(candidate, "merge_and_unload", None)):
            raise MisconfigurationException(
                f"{who}: the model has LoRA adapters; export the merged model instead (SavePretrained writes it, then "
                "`lightning-epfl export <method> --model <that folder>`)."
            )
        if candidate is not None and hasattr(getattr(candidate, "config", None), "model_type"):
            return candidate
    raise MisconfigurationException(
        f"{type(pl_module).__name__} holds no transformers model (expected a `model` attribute such as "
        "CausalLMModule's)."
    )


@torch.no_grad()
def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


class CompressionExport(Callback):
    """Shared mechanism of the export callbacks: when to run, data, evaluation, logging, saving and state.

    Subclasses set :attr:`config_class`, :attr:`name`, :attr:`prefix` and implement :meth:`check_model`,
    :meth:`transform` and :meth:`save`.

    Args:
        config: The method's config (:class:`~lightning_epfl.export.QuaRotConfig` for :class:`QuaRotExport`,
            :class:`~lightning_epfl.export.SparseQuantConfig` for :class:`SparseQuantExport`), or a dict of its
            fields (as LightningCLI passes ``config: {w_bits: 8}``). Default ``None``: the config's defaults.
        when: ``"fit_end"`` (after training), ``"test_start"`` (before the test loop, which then measures the
            compressed model) or ``"manual"`` (call :meth:`export`). Default ``"fit_end"``.
        calib_from: ``"train"`` or ``"val"``: the datamodule loader the calibration sequences come from.
        evaluate: Measure perplexity before and after (``quant/ppl_fp``, ``quant/ppl_q``). Default ``True``.
        eval_batches: Validation batches used for perplexity (``>= 1``). Default 8.
        export_dir: Output folder; ``None``: ``<log_dir>/<name>``. ``""``: do not save. A folder that already holds
            files (an earlier export included) is refused before training: nothing written earlier is replaced.
        compare_logits: Log ``<prefix>/max_abs_dlogit``, the largest logit change on the first validation batch
            (what it compares is the subclass's: see :class:`QuaRotExport`, :class:`SparseQuantExport`).
            Default ``True``.

    Raises:
        MisconfigurationException: A config of the wrong type or with a bad field, or a bad
            ``when``/``calib_from``/``eval_batches`` (in ``__init__``); before training or testing
            (``on_fit_start`` / ``on_test_start``, once the model is built): a model the method cannot take, LoRA
            adapters, or an export folder holding unrelated files.
    """

    config_class: ClassVar[type[ExportConfig]]
    name: ClassVar[str]
    prefix: ClassVar[str]
    redo_after_training: ClassVar[bool] = False
    """Whether a run resumed after the export and trained further exports again at its end."""

    def __init__(
        self,
        config: ExportConfig | dict[str, Any] | None = None,
        when: Literal["fit_end", "test_start", "manual"] = "fit_end",
        calib_from: Literal["train", "val"] = "train",
        evaluate: bool = True,
        eval_batches: int = 8,
        export_dir: str | None = None,
        compare_logits: bool = True,
    ) -> None:
        who = type(self).__name__
        if when not in ("fit_end", "test_start", "manual"):
            raise MisconfigurationException(f"{who}: `when` must be 'fit_end', 'test_start' or 'manual', got {when!r}.")
        if calib_from not in ("train", "val"):
            raise MisconfigurationException(f"{who}: `calib_from` must be 'train' or 'val', got {calib_from!r}.")
        if not isinstance(eval_batches, int) or eval_batches < 1:
            raise MisconfigurationException(f"{who}: `eval_batches` must be an integer >= 1, got {eval_batches!r}.")
        try:
            if config is None:
                config = self.config_class()
            elif isinstance(config, dict):
                config = self.config_class.from_dict(config)
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(f"{who}: `config`: {err}") from err
        if not isinstance(config, self.config_class):
            raise MisconfigurationException(
                f"{who}: `config` must be a {self.config_class.__name__} (or a dict of its fields), got "
                f"{type(config).__name__}."
            )
        self.config = config
        self.when = when
        self.calib_from = calib_from
        self.evaluate = evaluate
        self.eval_batches = eval_batches
        self.export_dir = export_dir
        self.compare_logits = compare_logits
        self.done = False
        self.metrics: dict[str, float] = {}
        self.report: Any = None
        self.saved_to: str | None = None
        self.export_step: int | None = None

    # ------------------------------------------------------------------------------------------------ method hooks
    def check_model(self, model: torch.nn.Module) -> bool:
        """Raise ``ValueError`` if the config cannot apply to ``model``; return ``True`` if ``model`` was restored
        already compressed (nothing left to do)."""
        raise NotImplementedError

    def transform(
        self,
        model: torch.nn.Module,
        calib: Iterable[Any],
        check_ids: torch.Tensor | None,
        progress: Callable[[Iterable[Any]], Iterable[Any]] | None,
    ) -> tuple[Any, float | None]:
        """Compress ``model`` in place; returns the report and the logit change on ``check_ids`` (or ``None``)."""
        raise NotImplementedError

    def save(self, model: torch.nn.Module, path: str, tokenizer: Any) -> str:
        """Write the export atomically; returns its path."""
        raise NotImplementedError

    def report_metrics(self, report: Any) -> dict[str, float]:
        """Figures of the transform's report to log beside the perplexities (none by default)."""
        return {}

    def mark(self, model: torch.nn.Module, step: int) -> None:
        """Record in the model (its config, which checkpoints keep) that it was exported at ``step`` (no-op by
        default)."""

    # --------------------------------------------------------------------------------------------------- mechanism
    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(config_hash=self.config_hash)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before training or testing: the model, the config and the export folder."""
        model = find_causal_lm(pl_module, type(self).__name__)
        try:
            if self.check_model(model):
                self.done = True
            again = self.redo_after_training and stage == "fit" and self.when == "fit_end"
            if self.done and not again:
                return
            path = self.resolve_export_dir(trainer)
            if path is not None:
                check_export_target(path, replace=False)
        except (ValueError, FileExistsError) as err:
            raise MisconfigurationException(f"{type(self).__name__}: {err}") from err

    def check_config(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule: pl.LightningDataModule | None = None
    ) -> None:
        """Checks that need no model, run by the CLI before any log folder exists: an explicit ``export_dir`` that
        holds files (the checks that need the built model run at fit or test start)."""
        if self.export_dir and not self.done:
            try:
                check_export_target(self.export_dir, replace=False)
            except FileExistsError as err:
                raise MisconfigurationException(f"{type(self).__name__}: {err}") from err

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module, "fit")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module, "test")
        if self.when == "test_start":
            self.export(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end":
            self.export(trainer, pl_module)

    def resolve_export_dir(self, trainer: pl.Trainer) -> str | None:
        """The export folder: ``export_dir``, or ``<log_dir>/<name>``; ``None`` when saving is off."""
        if self.export_dir == "":
            return None
        return self.export_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, self.name)

    def _batches(self, trainer: pl.Trainer, which: str) -> Any:
        dm = trainer.datamodule
        if dm is None:
            raise MisconfigurationException(
                f"{type(self).__name__} needs a datamodule for calibration and evaluation batches."
            )
        if not getattr(dm, "datasets", None):
            dm.setup("fit")
        return dm.train_dataloader() if which == "train" else dm.val_dataloader()

    @torch.no_grad()
    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Compress the module's model in place, evaluate it, log and save; returns the logged figures.

        A run resumed after the export (same config) does not redo it at the step it was done; if it trained further,
        a subclass with :attr:`redo_after_training` exports again (into the resumed run's folder), the others warn.
        """
        who = type(self).__name__
        if self.done:
            fitting = trainer.state.fn == TrainerFn.FITTING
            if not fitting or self.export_step is None or trainer.global_step == self.export_step:
                rank_zero_info(f"{who}: already exported at step {self.export_step} ({self.saved_to}); skipped.")
                return self.metrics
            if not self.redo_after_training:
                rank_zero_warn(
                    f"{who}: the model was exported at step {self.export_step} and trained up to step "
                    f"{trainer.global_step} since; it is not exported again."
                )
                return self.metrics
        model = find_causal_lm(pl_module, type(self).__name__)
        was_training = model.training
        model.eval()
        eval_batches = []
        for i, batch in enumerate(self._batches(trainer, "val")):
            if i >= self.eval_batches:
                break
            eval_batches.append(batch)
        metrics: dict[str, float] = {}
        if self.evaluate:
            metrics["quant/ppl_fp"] = perplexity(model, eval_batches)
        check = input_ids_of(eval_batches[0]) if (self.compare_logits and eval_batches) else None
        progress = None
        if trainer.progress_bar_callback is not None and trainer.is_global_zero:
            from tqdm.auto import tqdm

            desc = f"{type(self).__name__}: compressing layers"

            def progress(items: Any) -> Any:
                return tqdm(items, desc=desc, leave=False)

        self.report, dlogit = self.transform(model, self._batches(trainer, self.calib_from), check, progress)
        self.mark(model, trainer.global_step)
        if dlogit is not None:
            metrics[f"{self.prefix}/max_abs_dlogit"] = dlogit
        metrics.update(self.report_metrics(self.report))
        if self.evaluate:
            metrics["quant/ppl_q"] = perplexity(model, eval_batches)
        model.train(was_training)
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        path = self.resolve_export_dir(trainer)
        if path is not None and trainer.is_global_zero:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            self.saved_to = self.save(model, path, tokenizer)
            rank_zero_info(f"{type(self).__name__}: wrote {self.saved_to} ({_summary(metrics)})")
        self.metrics, self.done, self.export_step = metrics, True, trainer.global_step
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "config_hash": self.config_hash,
            "metrics": dict(self.metrics),
            "step": self.export_step,
            "saved_to": self.saved_to,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("config_hash") == self.config_hash:
            self.done = bool(state_dict.get("done", False))
            self.metrics = dict(state_dict.get("metrics", {}))
            self.export_step = state_dict.get("step")
            self.saved_to = state_dict.get("saved_to")


class QuaRotExport(CompressionExport):
    """Rotate and quantize the module's transformers causal LM (QuaRot, arXiv:2404.00456), evaluate and export it.

    Takes the arguments of :class:`CompressionExport` with a :class:`~lightning_epfl.export.QuaRotConfig` (W4A4KV4
    GPTQ by default). Logged (to every logger, and in ``trainer.callback_metrics``): ``quant/ppl_fp``,
    ``quant/ppl_q`` and ``quarot/max_abs_dlogit``, the rotated *float* model against the original on the first
    validation batch (the rotations preserve the function, so this is float round-off). The JSON report (config,
    rotations, per-layer weight errors, timings) is written into the export (:func:`~lightning_epfl.export.
    save_quantized`; :func:`~lightning_epfl.export.load_quantized` reads it).

    A checkpoint written after the export holds the rotated, quantized weights and a ``quarot`` marker in the
    model config; resuming from it (``fit`` or ``test`` with ``ckpt_path``) re-installs the online rotations and
    quantizers instead of transforming again.

    Raises:
        MisconfigurationException: As :class:`CompressionExport`; also an unsupported architecture (the message
            names the supported ones), a config the model cannot take (group size, Hadamard fallback, skip list), or
            a checkpoint transformed with another config.
    """

    config_class = QuaRotConfig
    name = "quarot"
    prefix = "quarot"

    @override
    def check_model(self, model: torch.nn.Module) -> bool:
        marker = getattr(model.config, "quarot", None)
        if marker is not None and not is_transformed(model):  # rotated weights restored from a checkpoint
            if marker != self.config.to_dict():
                raise ValueError(
                    "the checkpoint holds a model already transformed with another QuaRot config; start from the "
                    "float model or use the same config."
                )
            install_quantizers(model, self.config)
            return True
        if not self.done:
            validate_model(model, self.config)
        return False

    @override
    def transform(
        self,
        model: torch.nn.Module,
        calib: Iterable[Any],
        check_ids: torch.Tensor | None,
        progress: Callable[[Iterable[Any]], Iterable[Any]] | None,
    ) -> tuple[Any, float | None]:
        report = quarot_quantize_(model, self.config, calib, check_ids, progress)
        return report, report.max_abs_dlogit

    @override
    def save(self, model: torch.nn.Module, path: str, tokenizer: Any) -> str:
        return save_quantized(model, self.config, path, self.report, tokenizer)


class SparseQuantExport(CompressionExport):
    """Prune and block-quantize the module's transformers model (arXiv:2405.20935), evaluate and export it.

    Takes the arguments of :class:`CompressionExport` with a :class:`~lightning_epfl.export.SparseQuantConfig`
    (2:4 magnitude pruning, then INT4 in blocks of 32, by default). Masks come
    from the weights the model holds when the export runs: after a sparse fine-tune with
    :class:`~lightning_epfl.callbacks.SparseFinetune` (same pattern) the pruned weights are already zero and the
    export re-derives the same mask, then quantizes.

    Logged (to every logger, and in ``trainer.callback_metrics``): ``quant/ppl_fp``, ``quant/ppl_q``,
    ``sparse_quant/max_abs_dlogit`` (the compressed model against the model before the export, on the first
    validation batch), and from the :class:`~lightning_epfl.export.SparseQuantReport` the whole-model relative
    weight errors ``sparse_quant/eps_s``, ``eps_q``, ``eps_sq`` (sparsity alone, quantization alone, both in the
    configured order), ``excess`` (``eps_sq - (eps_s + eps_q)``) and ``sparsity`` (achieved). The export
    (:func:`~lightning_epfl.export.save_sparse_quantized`) holds plain weights that ``from_pretrained`` loads, plus
    the config and report; :func:`~lightning_epfl.export.load_sparse_quantized` reads both.

    The model's config records the export (``sparse_quant``: config and step), and checkpoints keep it: a run
    resumed from a checkpoint written after the export skips it at the same step (``test``), and exports again at
    its end if it trained further (the weights moved off the quantization grid), into the resumed run's folder.

    Raises:
        MisconfigurationException: As :class:`CompressionExport`; also a config the model cannot take (``m`` or
            ``block_size`` not dividing a layer's input size, nothing left after ``skip_modules``).
    """

    config_class = sparse_quant.SparseQuantConfig
    name = "sparse_quant"
    prefix = "sparse_quant"
    redo_after_training = True

    @override
    def check_model(self, model: torch.nn.Module) -> bool:
        marker = getattr(model.config, "sparse_quant", None)
        if isinstance(marker, dict) and not self.done:  # compressed weights restored from a checkpoint
            if marker.get("config") != self.config.to_dict():
                raise ValueError(
                    "the checkpoint holds a model already sparse-quantized with another config; start from the float "
                    "model or use the same config."
                )
            self.export_step = marker.get("step")
            return True
        sparse_quant.validate_model(model, self.config)
        return False

    @override
    def mark(self, model: torch.nn.Module, step: int) -> None:
        model.config.sparse_quant = {"config": self.config.to_dict(), "step": step}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        from lightning_epfl.callbacks.sparse_finetune import SparseFinetune

        shape = ("n", "m") if self.config.pattern == "n:m" else ("sparsity", "scope")
        fields = ("pattern", *shape, "skip_modules")
        for callback in trainer.callbacks:
            if isinstance(callback, SparseFinetune):
                theirs = {f: getattr(callback.config, f) for f in fields}
                ours = {f: getattr(self.config, f) for f in fields}
                if theirs != ours:
                    rank_zero_warn(
                        f"SparseQuantExport: its mask settings {ours} differ from SparseFinetune's {theirs}; the "
                        "export will prune the fine-tuned weights again with its own rule."
                    )

    @override
    def transform(
        self,
        model: torch.nn.Module,
        calib: Iterable[Any],
        check_ids: torch.Tensor | None,
        progress: Callable[[Iterable[Any]], Iterable[Any]] | None,
    ) -> tuple[Any, float | None]:
        before = _logits(model, check_ids) if check_ids is not None else None
        report = sparse_quant.sparse_quantize_(model, self.config, calib, progress)
        dlogit = None if before is None else float((_logits(model, check_ids) - before).abs().max())
        return report, dlogit

    @override
    def report_metrics(self, report: Any) -> dict[str, float]:
        fields = {"eps_s": "eps_s", "eps_q": "eps_q", "eps_sq": "eps_sq", "excess": "excess"}
        metrics = {f"{self.prefix}/{key}": float(getattr(report, attr)) for key, attr in fields.items()}
        metrics[f"{self.prefix}/sparsity"] = float(report.sparsity_achieved)
        return metrics

    @override
    def save(self, model: torch.nn.Module, path: str, tokenizer: Any) -> str:
        return sparse_quant.save_sparse_quantized(model, path, self.config, self.report, tokenizer)


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) or "not evaluated"
