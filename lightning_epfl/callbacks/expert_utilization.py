r"""
Expert utilization monitor
==========================

Logs how a mixture-of-experts model uses its experts (Fan, Messmer & Jaggi, arXiv:2402.13089): per MoE layer the
load of each expert, the number of dead experts and the router entropy during training, and at the end of each
validation the normalized mutual information between the chosen expert and the sequence's domain (topical
specialization) or the token's character class (syntactic specialization), plus a heatmap of the validation load.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_epfl.functional.moe import BYTE_TOKEN_CLASSES, byte_token_classes
from lightning_epfl.metrics.routing import RoutingNMI
from lightning_epfl.modules.moe import MoEMLP, moe_layers
from lightning_epfl.utilities import new_figure, save_figure

__all__ = ["ExpertUtilizationMonitor", "plot_expert_load"]

_MAX_DOMAINS = 64
"""Domain ids the domain NMI accepts when the datamodule does not name its domains."""


def plot_expert_load(load: Tensor, title: str | None = None, blocks: list[int] | None = None) -> Any:
    """Heatmap of the utilization ``load · E`` (1 = the balanced share) of ``load`` ``[layers, E]``.

    Args:
        load: Expert load fractions ``[layers, E]`` (rows sum to 1).
        title: Figure title. Default: ``"expert utilization (load x E)"``.
        blocks: Block index of each row (the ``L<i>`` of the logged keys). Default: ``0 .. layers - 1``.

    Returns:
        A matplotlib ``Figure`` not registered with pyplot (save it with :func:`lightning_epfl.utilities.save_figure`).
    """
    util = (load.detach().double().cpu() * load.shape[1]).numpy()
    fig = new_figure((max(4.0, 0.35 * load.shape[1] + 2.0), max(2.5, 0.3 * load.shape[0] + 1.5)))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(util, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("block")
    rows = list(range(load.shape[0]))
    ax.set_yticks(rows, [str(b) for b in (blocks if blocks is not None else rows)])
    ax.set_title(title or "expert utilization (load x E)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


class ExpertUtilizationMonitor(Callback):
    r"""Log per-layer expert load, dead experts, router entropy and routing specialization (arXiv:2402.13089).

    Reads what each :class:`~lightning_epfl.modules.moe.MoEMLP` stores after its forward (``last_aux``) through
    forward hooks, so it works whatever consumes the auxiliary losses.

    Training, every ``log_every_n_steps`` optimizer steps (after the step; logged at the step index Lightning logs
    that batch's own training metrics at), for the MoE layer of block ``i`` (the first ``max_logged_layers`` MoE
    layers), from the step's last forward (mean over processes): ``moe/L{i}/util_min``,
    ``moe/L{i}/util_max`` (utilization = load · E, 1 = a balanced share), ``moe/L{i}/dead`` (experts with utilization
    below ``dead_threshold``) and ``moe/L{i}/entropy`` (mean router entropy in nats); ``detail="detailed"`` adds
    ``moe/L{i}/util/e{j}`` per expert. They go straight to the trainer's loggers at that step and to
    :attr:`last_metrics`.

    Validation, accumulated over the whole validation set (contingency tables summed over processes by
    :class:`~lightning_epfl.metrics.RoutingNMI`), logged at its end with ``pl_module.log``:
    ``moe/L{i}/nmi_domain`` (top-1 expert of each valid position vs the batch's ``domain_key`` entry, when batches
    have it) and ``moe/L{i}/nmi_token_class`` (vs the 7 byte classes of
    :func:`~lightning_epfl.functional.moe.byte_token_classes`, with ``token_classes="bytes"`` and a byte-level
    tokenizer). A heatmap of the validation load per layer (``expert_load_step<N>.png``, one per validation, none
    replaced) is written atomically to ``dirpath``
    (default: the trainer's ``log_dir``) and each validation's values are kept in :attr:`history` (checkpointed).

    Args:
        log_every_n_steps: Training logging period in optimizer steps (``>= 1``). Default 50.
        detail: ``"brief"`` or ``"detailed"`` (per-expert utilization keys).
        dead_threshold: An expert is dead when its utilization is below this (``>= 0``). Default 0.1.
        domain_key: Key of the per-sequence domain ids in dict batches.
        token_classes: ``"bytes"`` (the 7 byte classes) or ``None`` (no token-class NMI).
        max_logged_layers: Layers logged at most (``>= 1``; the first ones). Default 32.
        dirpath: Folder of the heatmap; ``None``: the trainer's ``log_dir`` (or ``default_root_dir``).
        plot: Write the heatmap.

    Raises:
        MisconfigurationException: In ``__init__`` for a value outside the ranges above; at fit / validation start if
            the model has no MoE layer.
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        detail: Literal["brief", "detailed"] = "brief",
        dead_threshold: float = 0.1,
        domain_key: str = "domain",
        token_classes: Literal["bytes"] | None = "bytes",
        max_logged_layers: int = 32,
        dirpath: str | None = None,
        plot: bool = True,
    ) -> None:
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise MisconfigurationException(
                f"ExpertUtilizationMonitor: `log_every_n_steps` must be an integer >= 1, got {log_every_n_steps!r}."
            )
        if detail not in ("brief", "detailed"):
            raise MisconfigurationException(
                f"ExpertUtilizationMonitor: `detail` must be one of ['brief', 'detailed'], got {detail!r}."
            )
        if not isinstance(dead_threshold, (int, float)) or dead_threshold < 0:
            raise MisconfigurationException(
                f"ExpertUtilizationMonitor: `dead_threshold` must be a number >= 0, got {dead_threshold!r}."
            )
        if token_classes not in ("bytes", None):
            raise MisconfigurationException(
                f"ExpertUtilizationMonitor: `token_classes` must be one of ['bytes', None], got {token_classes!r}."
            )
        if isinstance(max_logged_layers, bool) or not isinstance(max_logged_layers, int) or max_logged_layers < 1:
            raise MisconfigurationException(
                f"ExpertUtilizationMonitor: `max_logged_layers` must be an integer >= 1, got {max_logged_layers!r}."
            )
        self.log_every_n_steps = log_every_n_steps
        self.detail = detail
        self.dead_threshold = float(dead_threshold)
        self.domain_key = domain_key
        self.token_classes = token_classes
        self.max_logged_layers = max_logged_layers
        self.dirpath = dirpath
        self.plot = plot

        self.history: list[dict[str, Any]] = []
        self.last_metrics: dict[str, float] = {}
        self._layers: list[MoEMLP] = []
        self._handles: list[Any] = []
        self._train_stats: dict[int, tuple[Tensor, Tensor]] = {}
        self._batch: Any = None
        self._collecting = False
        self._nmi_domain: list[RoutingNMI] = []
        self._nmi_token: list[RoutingNMI] = []
        self._val_load: list[Tensor] = []
        self._num_domains = _MAX_DOMAINS
        self._byte_tokens = True
        self._last_logged_step = -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(domain_key=self.domain_key, dirpath=self.dirpath)

    # ------------------------------------------------------------------ layers and hooks
    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handles:
            return
        self._layers = moe_layers(pl_module)
        if not self._layers:
            raise MisconfigurationException(
                "ExpertUtilizationMonitor found no MoE layer in the model (set `moe` on CausalLMModule, or use "
                "`replace_mlps_with_moe`)."
            )
        for i, layer in enumerate(self._layers[: self.max_logged_layers]):
            self._handles.append(layer.register_forward_hook(self._make_hook(i)))
        datamodule = getattr(trainer, "datamodule", None)
        names = getattr(datamodule, "domain_names", None)
        self._num_domains = max(len(names), 1) if names else _MAX_DOMAINS
        tokenizer = getattr(datamodule, "tokenizer", None)
        self._byte_tokens = tokenizer is None or type(tokenizer).__name__ == "ByteTokenizer"
        if self.token_classes == "bytes" and not self._byte_tokens:
            rank_zero_warn(
                "ExpertUtilizationMonitor: `token_classes='bytes'` needs a byte-level tokenizer; the token-class NMI "
                "is skipped.",
                category=RuntimeWarning,
            )

    def _make_hook(self, i: int) -> Any:
        def hook(module: MoEMLP, args: Any, output: Any) -> None:
            aux = module.last_aux
            if aux is None:
                return
            if self._collecting:
                self._update_validation(i, module, aux)
            elif module.training:
                self._train_stats[i] = (aux.load.detach(), aux.entropy.detach())

        return hook

    def _detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _key(self, i: int) -> str:
        """Key prefix of the ``i``-th MoE layer: ``moe/L<block index>``."""
        return f"moe/L{getattr(self._layers[i], 'layer_index', i)}"

    def _metric_lists(self) -> None:
        n = len(self._layers[: self.max_logged_layers])
        if len(self._nmi_domain) != n:
            self._nmi_domain = [RoutingNMI(layer.num_experts, self._num_domains) for layer in self._layers[:n]]
            self._nmi_token = [RoutingNMI(layer.num_experts, len(BYTE_TOKEN_CLASSES)) for layer in self._layers[:n]]
            self._val_load = [torch.zeros(layer.num_experts, dtype=torch.float64) for layer in self._layers[:n]]

    def _update_validation(self, i: int, module: MoEMLP, aux: Any) -> None:
        batch = self._batch
        top1 = aux.unit_indices[..., 0].cpu()
        valid = torch.ones_like(top1, dtype=torch.bool) if aux.token_mask is None else aux.token_mask.cpu()
        chosen = aux.unit_indices.cpu()[valid]  # every top-k choice, as the training load counts them
        self._val_load[i] += torch.bincount(chosen.reshape(-1), minlength=module.num_experts).double()
        if not isinstance(batch, dict):
            return
        domains = batch.get(self.domain_key)
        if domains is not None:
            ids = torch.as_tensor(domains).reshape(-1).cpu().long()
            if ids.numel() == top1.shape[0] and int(ids.max()) < self._num_domains and int(ids.min()) >= 0:
                self._nmi_domain[i].update(top1, ids[:, None].expand_as(top1), valid)
        input_ids = batch.get("input_ids")
        if self.token_classes == "bytes" and self._byte_tokens and input_ids is not None:
            ids = torch.as_tensor(input_ids).cpu()
            if ids.shape == top1.shape and (ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < 256)):
                self._nmi_token[i].update(top1, byte_token_classes(ids), valid)

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer, pl_module)
        self._metric_lists()
        for metric in self._nmi_domain + self._nmi_token:
            metric.reset()
        for load in self._val_load:
            load.zero_()

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch = batch
        self._collecting = True

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch = None
        self._collecting = False

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collecting = False
        if trainer.sanity_checking or not self._val_load:
            return
        record: dict[str, Any] = {"step": trainer.global_step, "nmi_domain": [], "nmi_token_class": [], "load": []}
        loads = []
        for i in range(len(self._val_load)):
            load = trainer.strategy.reduce(self._val_load[i].clone(), reduce_op="sum")
            load = load / load.sum().clamp_min(1)
            loads.append(load.float())
            record["load"].append(load.tolist())
            for name, metric in (("nmi_domain", self._nmi_domain[i]), ("nmi_token_class", self._nmi_token[i])):
                if not metric.update_called:
                    record[name].append(None)
                    continue
                value = float(metric.compute())
                record[name].append(value)
                pl_module.log(f"{self._key(i)}/{name}", value, batch_size=1)
        self.history.append(record)
        if self.plot and loads:
            self._save_plot(trainer, torch.stack(loads) if len({len(x) for x in loads}) == 1 else None)

    @rank_zero_only
    def _save_plot(self, trainer: pl.Trainer, loads: Tensor | None) -> None:
        if loads is None:
            return
        folder = self.dirpath or trainer.log_dir or trainer.default_root_dir
        blocks = [getattr(layer, "layer_index", i) for i, layer in enumerate(self._layers[: len(loads)])]
        fig = plot_expert_load(loads, f"validation expert utilization, step {trainer.global_step}", blocks)
        save_figure(fig, os.path.join(folder, f"expert_load_step{trainer.global_step}.png"))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.log_every_n_steps or step == self._last_logged_step or not self._train_stats:
            return
        self._last_logged_step = step
        metrics: dict[str, float] = {}
        for i in sorted(self._train_stats):
            load, entropy = self._train_stats[i]
            stats = trainer.strategy.reduce(torch.cat([load.float(), entropy.float().reshape(1)]), reduce_op="mean")
            util = stats[:-1] * load.numel()
            metrics[f"{self._key(i)}/util_min"] = float(util.min())
            metrics[f"{self._key(i)}/util_max"] = float(util.max())
            metrics[f"{self._key(i)}/dead"] = float((util < self.dead_threshold).sum())
            metrics[f"{self._key(i)}/entropy"] = float(stats[-1])
            if self.detail == "detailed":
                for j, value in enumerate(util.tolist()):
                    metrics[f"{self._key(i)}/util/e{j}"] = value
        self._train_stats = {}
        self.last_metrics = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # at the step Lightning logs this batch's training metrics at
                logger.log_metrics(metrics, step=step - 1)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach_hooks()
        self._batch = None
        self._train_stats = {}

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "last_logged_step": self._last_logged_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self._last_logged_step = int(state_dict.get("last_logged_step", -1))
