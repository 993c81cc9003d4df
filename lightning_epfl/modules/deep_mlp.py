"""Deep MLP classifier for grokking
==================================

A plain ``depth``-layer perceptron whose parameters are all multiplied by an init scale ``α`` after PyTorch's
default initialisation, trained with MSE on one-hot targets: the protocol of Fan, Pascanu & Jaggi, *Deep Grokking:
Would Deep Neural Networks Generalize Better?* (arXiv:2405.19454, Sec. 3), itself after Liu et al., *Omnigrok*
(arXiv:2210.01117), where a large ``α`` plus weight decay makes an MLP memorise its small training set long before
its held-out accuracy rises.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}
_LOSSES = ("mse", "cross_entropy")


class DeepMLPClassifier(LightningModule):
    """MLP classifier ``in_features → width → … → width → num_classes`` with ``depth`` ``nn.Linear`` layers.

    The activation is applied functionally between linear layers, so forward hooks on ``linears[i]`` see the
    pre-activation features (what the paper's rank is computed on). After the default ``nn.Linear``
    initialisation every parameter (weights and biases) is multiplied by ``init_scale`` (the paper's ``α``).

    With ``loss="mse"`` the loss is ``mean((f(x) - onehot(y))²)`` over batch × classes (Omnigrok / Deep Grokking);
    with ``loss="cross_entropy"`` it is the usual softmax cross entropy. Inputs of any shape ``(B, ...)`` are
    flattened to ``(B, in_features)``; the output has shape ``(B, num_classes)``.

    Logged: ``train/loss``, ``train/acc``, ``train/weight_norm`` (L2 norm of all parameters), ``val/loss``,
    ``val/acc``, ``test/loss``, ``test/acc``. Use ``precision="64-true"`` for the paper's float64 training.

    Args:
        in_features: Input dimension (64 for the 8×8 digits).
        num_classes: Number of classes.
        depth: Number of ``nn.Linear`` layers (hidden layers + output layer), the paper's ``L``. At least 2. This
            family has one width, so ``depth``/``width`` replace the ``hidden_sizes`` list of ``MLPClassifier``
            (``hidden_sizes = [width] * (depth - 1)``): depth is the quantity the grokking experiments vary.
        width: Hidden width. Positive.
        activation: ``"relu"`` (paper), ``"gelu"`` or ``"tanh"``.
        init_scale: Multiplier ``α > 0`` applied to every parameter after default init (paper: 8; digits: 4).
        loss: ``"mse"`` on one-hot targets (paper) or ``"cross_entropy"``.
        optimizer: Optimizer factory (LightningCLI injection); default ``torch.optim.AdamW`` (lr 1e-3,
            weight decay 0.01, the paper's optimizer).

    Raises:
        MisconfigurationException: If ``depth < 2``, ``width < 1``, ``in_features < 1``, ``num_classes < 2``,
            ``init_scale <= 0`` or ``activation``/``loss`` is not one of the allowed values.
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        depth: int = 8,
        width: int = 128,
        activation: Literal["relu", "gelu", "tanh"] = "relu",
        init_scale: float = 1.0,
        loss: Literal["mse", "cross_entropy"] = "mse",
        optimizer: OptimizerCallable = torch.optim.AdamW,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise MisconfigurationException(f"`depth` must be >= 2 (hidden + output Linear layers), got {depth}.")
        if width < 1 or in_features < 1:
            raise MisconfigurationException(
                f"`width` and `in_features` must be >= 1, got width={width}, in_features={in_features}."
            )
        if num_classes < 2:
            raise MisconfigurationException(f"`num_classes` must be >= 2, got {num_classes}.")
        if activation not in _ACTIVATIONS:
            raise MisconfigurationException(f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {activation!r}.")
        if loss not in _LOSSES:
            raise MisconfigurationException(f"`loss` must be one of {list(_LOSSES)}, got {loss!r}.")
        if not init_scale > 0:
            raise MisconfigurationException(f"`init_scale` must be > 0, got {init_scale}.")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer = optimizer
        self.activation = activation
        self.loss_name = loss
        self.num_classes = num_classes
        sizes = [in_features] + [width] * (depth - 1) + [num_classes]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        with torch.no_grad():
            for p in self.linears.parameters():
                p.mul_(init_scale)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Map inputs ``(B, ...)`` (flattened to ``(B, in_features)``) to logits ``(B, num_classes)``."""
        act = _ACTIVATIONS[self.activation]
        h = x.flatten(1).to(self.linears[0].weight.dtype)
        for i, linear in enumerate(self.linears):
            h = linear(h)
            if i < len(self.linears) - 1:
                h = act(h)
        return h

    def loss_fn(self, logits: Tensor, y: Tensor) -> Tensor:
        """Loss of logits ``(B, C)`` against integer labels ``(B,)``: MSE on one-hot (mean over B×C) or CE."""
        if self.loss_name == "mse":
            return F.mse_loss(logits, F.one_hot(y, self.num_classes).to(logits.dtype))
        return F.cross_entropy(logits, y)

    def weight_norm(self) -> Tensor:
        """L2 norm of all parameters concatenated (a scalar tensor)."""
        return torch.sqrt(sum(p.detach().pow(2).sum() for p in self.parameters()))

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        on_step = stage == "train"
        sync = not on_step  # epoch-level evaluation values are averaged over processes
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=not on_step, prog_bar=True, sync_dist=sync)
        self.log(f"{stage}/acc", acc, on_step=on_step, on_epoch=not on_step, prog_bar=True, sync_dist=sync)
        return loss

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._shared_step(batch, "train")
        self.log("train/weight_norm", self.weight_norm(), on_step=True, on_epoch=False)
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.parameters())
