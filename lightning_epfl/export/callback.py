r"""
Export callbacks
^^^^^^^^^^^^^^^^

:class:`QuaRotExport` runs a QuaRot export (:mod:`lightning_epfl.export.quarot`) inside a Lightning run: at the end
of ``fit``, at the start of ``test`` (so the test loop measures the quantized model) or when called. It draws its
calibration batches from the datamodule, measures perplexity before and after on the validation batches, checks
that the rotated float model computes what the original did, logs the figures to the run's loggers and writes the
export atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_epfl.export.calibration import input_ids_of
from lightning_epfl.export.quarot import (
    QuaRotConfig,
    QuaRotReport,
    install_quantizers,
    is_transformed,
    perplexity,
    quarot_quantize_,
    save_quantized,
    validate_model,
)
from lightning_epfl.utilities import check_export_target

__all__ = ["QuaRotExport", "find_causal_lm"]


def find_causal_lm(pl_module: pl.LightningModule) -> torch.nn.Module:
    """The transformers causal LM inside a LightningModule (its ``model`` attribute, or the module itself).

    Raises:
        MisconfigurationException: If neither is a transformers model, or the model carries peft adapters (merge
            them first: ``SavePretrained`` writes a merged folder that ``lightning-epfl export`` reads).
    """
    for candidate in (getattr(pl_module, "model", None), pl_module):
        if candidate is not None and callable(getattr(candidate, "merge_and_unload", None)):
            raise MisconfigurationException(
                "QuaRotExport: the model has LoRA adapters; export the merged model instead (SavePretrained writes "
                "it, then `lightning-epfl export quarot --model <that folder>`)."
            )
        if candidate is not None and hasattr(getattr(candidate, "config", None), "model_type"):
            return candidate
    raise MisconfigurationException(
        f"{type(pl_module).__name__} holds no transformers causal LM (expected a `model` attribute such as "
        "CausalLMModule's)."
    )


class QuaRotExport(Callback):
    """Rotate and quantize the module's transformers causal LM (QuaRot, arXiv:2404.00456), evaluate and export it.

    Logged (to every logger, and in ``trainer.callback_metrics``): ``quant/ppl_fp`` and ``quant/ppl_q`` (perplexity
    on up to ``eval_batches`` validation batches before and after), ``quarot/max_abs_dlogit`` (rotated float model
    vs original on the first validation batch). The JSON report (config, rotations, per-layer weight errors,
    timings) is written into the export.

    Args:
        config: The :class:`~lightning_epfl.export.QuaRotConfig` (W4A4KV4 GPTQ by default).
        when: ``"fit_end"`` (after training), ``"test_start"`` (before the test loop, which then measures the
            quantized model) or ``"manual"`` (call :meth:`export`).
        calib_from: ``"train"`` or ``"val"``: the datamodule loader the calibration sequences come from.
        evaluate: Measure perplexity before and after.
        eval_batches: Validation batches used for perplexity (``>= 1``).
        export_dir: Output folder; ``None``: ``<log_dir>/quarot``. ``""``: do not save.
        check_invariance: Compare the rotated float model's logits with the original's.

    A checkpoint written after the export holds the rotated, quantized weights and a ``quarot`` marker in the
    model config; resuming from it (``fit`` or ``test`` with ``ckpt_path``) re-installs the online rotations and
    quantizers instead of transforming again.

    Raises:
        MisconfigurationException: A bad ``when``/``calib_from``/``eval_batches`` (in ``__init__``); before training
            or testing (``on_fit_start`` / ``on_test_start``, once the model is built):
            an unsupported model (the message names the supported ones), LoRA adapters, a config the model cannot
            take (group size, Hadamard fallback, skip list), an export folder holding unrelated files, or a
            checkpoint transformed with another config.
    """

    def __init__(
        self,
        config: QuaRotConfig | None = None,
        when: Literal["fit_end", "test_start", "manual"] = "fit_end",
        calib_from: Literal["train", "val"] = "train",
        evaluate: bool = True,
        eval_batches: int = 8,
        export_dir: str | None = None,
        check_invariance: bool = True,
    ) -> None:
        if when not in ("fit_end", "test_start", "manual"):
            raise MisconfigurationException(
                f"QuaRotExport: `when` must be 'fit_end', 'test_start' or 'manual', got {when!r}."
            )
        if calib_from not in ("train", "val"):
            raise MisconfigurationException(f"QuaRotExport: `calib_from` must be 'train' or 'val', got {calib_from!r}.")
        if eval_batches < 1:
            raise MisconfigurationException(f"QuaRotExport: `eval_batches` must be >= 1, got {eval_batches}.")
        self.config = config or QuaRotConfig()
        self.when = when
        self.calib_from = calib_from
        self.evaluate = evaluate
        self.eval_batches = eval_batches
        self.export_dir = export_dir
        self.check_invariance = check_invariance
        self.done = False
        self.metrics: dict[str, float] = {}
        self.report: QuaRotReport | None = None
        self.saved_to: str | None = None

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(config_hash=self.config_hash)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before training or testing: the model, the config and the export folder; re-install the quantizers on a
        model restored from a checkpoint written after the export."""
        model = find_causal_lm(pl_module)
        marker = getattr(model.config, "quarot", None)
        if marker is not None and not is_transformed(model):  # rotated weights restored from a checkpoint
            if marker != self.config.to_dict():
                raise MisconfigurationException(
                    "QuaRotExport: the checkpoint holds a model already transformed with another QuaRot config; "
                    "start from the float model or use the same config."
                )
            install_quantizers(model, self.config)
            self.done = True
            return
        if self.done:
            return
        try:
            validate_model(model, self.config)
            path = self.resolve_export_dir(trainer)
            if path is not None:
                check_export_target(path)
        except (ValueError, FileExistsError) as err:
            raise MisconfigurationException(f"QuaRotExport: {err}") from err

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module)
        if self.when == "test_start":
            self.export(trainer, pl_module)

    def resolve_export_dir(self, trainer: pl.Trainer) -> str | None:
        if self.export_dir == "":
            return None
        return self.export_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "quarot")

    @staticmethod
    def _batches(trainer: pl.Trainer, which: str) -> Any:
        dm = trainer.datamodule
        if dm is None:
            raise MisconfigurationException("QuaRotExport needs a datamodule for calibration and evaluation batches.")
        if not getattr(dm, "datasets", None):
            dm.setup("fit")
        return dm.train_dataloader() if which == "train" else dm.val_dataloader()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end":
            self.export(trainer, pl_module)

    @torch.no_grad()
    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Transform the module's model in place, evaluate it, log and save; returns the logged figures.

        A run resumed after the export (same config) does not redo it.
        """
        if self.done:
            return self.metrics
        model = find_causal_lm(pl_module)
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
        check = input_ids_of(eval_batches[0]) if (self.check_invariance and eval_batches) else None
        progress = None
        if trainer.progress_bar_callback is not None and trainer.is_global_zero:
            from tqdm.auto import tqdm

            def progress(items: Any) -> Any:
                return tqdm(items, desc="QuaRot: quantizing layers", leave=False)

        self.report = quarot_quantize_(model, self.config, self._batches(trainer, self.calib_from), check, progress)
        if self.report.max_abs_dlogit is not None:
            metrics["quarot/max_abs_dlogit"] = self.report.max_abs_dlogit
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
            self.saved_to = save_quantized(model, self.config, path, self.report, tokenizer)
            rank_zero_info(f"QuaRotExport: wrote {self.saved_to} ({_summary(metrics)})")
        self.metrics, self.done = metrics, True
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "config_hash": self.config_hash, "metrics": dict(self.metrics)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("config_hash") == self.config_hash:
            self.done = bool(state_dict.get("done", False))
            self.metrics = dict(state_dict.get("metrics", {}))


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) or "not evaluated"
