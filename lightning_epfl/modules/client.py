"""Client modules
================

The one-client module contract of the collaborative core and a small MLP that follows it. A :class:`ClientModule`
trains on its own like any LightningModule; under a :class:`~lightning_epfl.strategies.CollaborativeStrategy` its
trainable parameters are stacked over clients and the strategy calls :meth:`ClientModule.client_loss` /
:meth:`ClientModule.client_metrics` through ``torch.func``, then :meth:`ClientModule.metrics_from_sums` to turn the
per-client sums into the metrics it logs (so ``val/acc`` means the same with and without the strategy: the mean over
clients of each client's accuracy).

The MLP's batches are tuples ``(x, y)`` or ``(x, y, mask)``; ``mask`` (float, shape ``[B]``) marks real examples in
a padded batch (1) and padding (0). Other client modules may use dict batches (``CausalLMModule``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_epfl.utilities import step_scheduler_config


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


class ClientModule(LightningModule):
    """Base class documenting the collaborative client contract.

    Subclasses implement two **pure** hooks (no ``self.log``, no in-place buffer updates, no ``.item()``), so that
    the strategy can evaluate them under ``torch.func.vmap`` with per-client weights:

    * :meth:`client_loss` ``(batch) -> Tensor``: scalar mean loss over the leading batch dimension (must work at
      batch size 1);
    * :meth:`client_metrics` ``(batch) -> dict[str, Tensor]``: per-batch **sums** (``loss_sum``, ``correct``,
      ``count``; any ``<name>_sum`` plus the count key :attr:`count_key`) so that aggregation over batches and
      clients is exact;
    * :meth:`metrics_from_sums` turns the summed statistics into metrics (``loss_sum / count`` -> ``loss``,
      ``correct / count`` -> ``acc``); override it for other metrics.

    The default ``training_step``/``validation_step``/``test_step`` call these hooks, so the same module trains alone
    (metric keys ``train/loss``, ``val/loss``, ``val/acc``, ``test/...``).

    Args:
        optimizer: Optimizer factory (LightningCLI dependency injection). Under a collaborative strategy it sees the
            stacked ``[n_local, ...]`` parameters; element-wise optimizers then act as ``n`` independent ones.
        lr_scheduler: Optional scheduler factory, stepped every optimizer step (``interval="step"``).
    """

    def __init__(
        self, optimizer: OptimizerCallable = torch.optim.SGD, lr_scheduler: LRSchedulerCallable | None = None
    ) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

    count_key: str = "count"
    """Key of :meth:`client_metrics` holding the number of items the sums run over."""

    def client_loss(self, batch: Any) -> Tensor:
        """Return the scalar mean loss of one client's batch (pure function of parameters and batch)."""
        raise NotImplementedError

    def client_metrics(self, batch: Any) -> dict[str, Tensor]:
        """Return per-batch sums (``loss_sum``, ``correct``, ``count``) for one client's batch."""
        raise NotImplementedError

    def metrics_from_sums(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Metrics from summed statistics: ``<name>_sum / count`` -> ``<name>``, ``correct / count`` -> ``acc``.

        Args:
            sums: The keys of :meth:`client_metrics`, each a tensor of any shape (``[n]`` per client under the
                strategy, scalars for one batch).

        Returns:
            ``{metric name: tensor of the same shape}``.
        """
        count = sums[self.count_key].clamp_min(1)
        out = {k[: -len("_sum")]: v / count for k, v in sums.items() if k.endswith("_sum")}
        if "correct" in sums:
            out["acc"] = sums["correct"] / count
        return out

    def _log_metrics(self, stage: str, batch: Any) -> None:
        m = self.client_metrics(batch)
        count = int(m[self.count_key])
        for name, value in self.metrics_from_sums(m).items():
            self.log(f"{stage}/{name}", value, prog_bar=stage == "val", sync_dist=True, batch_size=max(count, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.client_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._log_metrics("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._log_metrics("test", batch)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        return step_scheduler_config(optimizer, None if self.lr_scheduler is None else self.lr_scheduler(optimizer))


class MLPClassifier(ClientModule):
    """Multi-layer perceptron classifier following the :class:`ClientModule` contract.

    Inputs ``x`` of shape ``[B, in_features]`` (any trailing shape is flattened), integer labels ``y`` of shape
    ``[B]``, optional ``mask`` of shape ``[B]``. The loss is the (masked) mean cross-entropy in nats.

    Args:
        in_features: Input dimension (64 for the 8x8 digits).
        hidden_sizes: Widths of the hidden layers (``[]`` gives multinomial logistic regression).
        num_classes: Number of classes.
        activation: ``"relu"`` or ``"tanh"``.
        optimizer: Optimizer factory; pass ``lr`` in YAML (``torch.optim.SGD``'s own default lr is 1e-3).
        lr_scheduler: Optional scheduler factory, stepped every optimizer step.

    Raises:
        MisconfigurationException: If a size is not positive or ``activation`` is unknown.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden_sizes: list[int] | None = None,
        num_classes: int = 10,
        activation: Literal["relu", "tanh"] = "relu",
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        hidden_sizes = [32] if hidden_sizes is None else list(hidden_sizes)
        if in_features < 1 or num_classes < 2 or any(h < 1 for h in hidden_sizes):
            raise MisconfigurationException(
                "`in_features` and `hidden_sizes` must be >= 1 and `num_classes` >= 2, got "
                f"in_features={in_features}, hidden_sizes={hidden_sizes}, num_classes={num_classes}."
            )
        if activation not in ("relu", "tanh"):
            raise MisconfigurationException(f"`activation` must be 'relu' or 'tanh', got {activation!r}.")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        act = nn.ReLU if activation == "relu" else nn.Tanh
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), act()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, num_classes]`` for inputs ``[B, in_features]``."""
        return self.net(x.flatten(1))

    def client_loss(self, batch: Any) -> Tensor:
        x, y = batch[0], batch[1]
        mask = batch[2] if len(batch) > 2 else None
        return _masked_mean(F.cross_entropy(self(x), y, reduction="none"), mask)

    def client_metrics(self, batch: Any) -> dict[str, Tensor]:
        x, y = batch[0], batch[1]
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        hits = (logits.argmax(-1) == y).to(losses.dtype)
        mask = batch[2].to(losses.dtype) if len(batch) > 2 else torch.ones_like(losses)
        return {"loss_sum": (losses * mask).sum(), "correct": (hits * mask).sum(), "count": mask.sum()}


class LogisticRegression(ClientModule):
    """Binary logistic regression (one linear layer, binary cross-entropy) following the :class:`ClientModule` contract.

    Inputs ``x`` of shape ``[B, num_features]``, labels ``y`` in ``{0, 1}`` of shape ``[B]``, optional ``mask``
    ``[B]``. The loss is the (masked) mean binary cross-entropy in nats; accuracy thresholds the logit at 0. Weight
    decay belongs to the optimizer (``SGD(weight_decay=...)``: decoupled from the data, so outside any clipping).

    Args:
        num_features: Input dimension (30 for breast cancer, 123 for a9a).
        bias: Learn an intercept.
        optimizer: Optimizer factory; pass ``lr`` in YAML.
        lr_scheduler: Optional scheduler factory, stepped every optimizer step.

    Raises:
        MisconfigurationException: If ``num_features < 1``.
    """

    def __init__(
        self,
        num_features: int = 30,
        bias: bool = True,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        if num_features < 1:
            raise MisconfigurationException(f"LogisticRegression: `num_features` must be >= 1, got {num_features}.")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.linear = nn.Linear(num_features, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B]`` for inputs ``[B, num_features]``."""
        return self.linear(x.flatten(1)).squeeze(-1)

    def _losses(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch[0], batch[1]
        logits = self(x)
        losses = F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="none")
        mask = batch[2].to(losses.dtype) if len(batch) > 2 else torch.ones_like(losses)
        return logits, losses, mask

    def client_loss(self, batch: Any) -> Tensor:
        _, losses, mask = self._losses(batch)
        return (losses * mask).sum() / mask.sum().clamp_min(1.0)

    def client_metrics(self, batch: Any) -> dict[str, Tensor]:
        logits, losses, mask = self._losses(batch)
        hits = ((logits > 0).to(torch.long) == batch[1]).to(losses.dtype)
        return {"loss_sum": (losses * mask).sum(), "correct": (hits * mask).sum(), "count": mask.sum()}
