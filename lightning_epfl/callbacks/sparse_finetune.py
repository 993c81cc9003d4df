"""Sparse fine-tuning: fixed magnitude masks on the linear layers, re-applied after every optimizer step."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_epfl.export.sparse_quant import SparseQuantConfig, target_linears
from lightning_epfl.functional.sparsity import magnitude_mask


class SparseFinetune(Callback):
    """Prunes the target linears once at fit start and keeps them pruned while training.

    At :meth:`on_fit_start` a keep-mask ``m`` is computed per target linear from its current (float) weights with
    :func:`~lightning_epfl.functional.sparsity.magnitude_mask` and applied (``W ← m ⊙ W``); a step post-hook on every
    optimizer of ``trainer.optimizers`` re-applies ``W ← m ⊙ W`` after each ``optimizer.step()``, so pruned weights
    stay exactly 0. Target linears are those of ``pl_module.model`` (if it is a module) or of ``pl_module``, minus
    ``skip_modules`` (:func:`~lightning_epfl.export.sparse_quant.target_linears`). The masks are the callback's
    state: a resumed run re-uses them instead of recomputing masks from the trained weights. Logged every training
    step: ``sparsity/achieved``, the fraction of zeros over all target weights.

    It takes the mask fields one by one (as :class:`~lightning_epfl.export.SparseQuantConfig` names them), not a
    config object; give :class:`~lightning_epfl.export.SparseQuantExport` the same values to quantize what it
    produced without pruning further.

    Args:
        sparsity: Fraction removed for ``pattern="unstructured"``, in ``[0, 1)``. Default ``0.5``.
        pattern: ``"unstructured"`` or ``"n:m"`` (default).
        n: Weights kept per group of ``m`` (``1 <= n <= m``). Default ``2``.
        m: Group length along the input dimension; must divide every target layer's input size. Default ``4``.
        scope: ``"row"`` (default) or ``"tensor"`` (unstructured top-k per row or per tensor).
        skip_modules: Linear layers left dense, by qualified-name suffix. Default ``["lm_head"]``.

    Raises:
        MisconfigurationException: At construction for an invalid argument (the message names it); at fit start if
            ``m`` does not divide a layer's input size or loaded masks do not match the layers.
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        pattern: Literal["unstructured", "n:m"] = "n:m",
        n: int = 2,
        m: int = 4,
        scope: Literal["row", "tensor"] = "row",
        skip_modules: list[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(sparsity, SparseQuantConfig):
            raise MisconfigurationException(
                "SparseFinetune takes the mask fields one by one (sparsity=..., pattern=..., n=..., m=..., scope=..., "
                "skip_modules=...), not a SparseQuantConfig."
            )
        skip_modules = ["lm_head"] if skip_modules is None else skip_modules
        try:
            self.config = SparseQuantConfig(
                sparsity=sparsity, pattern=pattern, n=n, m=m, scope=scope, skip_modules=skip_modules, fmt="none"
            )
        except ValueError as err:
            raise MisconfigurationException(f"SparseFinetune: {err}".replace("SparseQuantConfig: ", "")) from err
        self.masks: dict[str, Tensor] = {}
        self._layers: dict[str, nn.Linear] = {}
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ masks
    def _apply(self) -> None:
        with torch.no_grad():
            for name, layer in self._layers.items():
                mask = self.masks[name]
                if mask.device != layer.weight.device:
                    mask = self.masks[name] = mask.to(layer.weight.device)
                layer.weight.mul_(mask)

    def achieved_sparsity(self) -> float:
        """Fraction of zeros over all target weights (``0.0`` before fit start)."""
        zeros = sum(int((layer.weight == 0).sum()) for layer in self._layers.values())
        total = sum(layer.weight.numel() for layer in self._layers.values())
        return zeros / total if total else 0.0

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        root = pl_module.model if isinstance(getattr(pl_module, "model", None), nn.Module) else pl_module
        self._layers = target_linears(root, self.config)
        if not self._layers:
            raise MisconfigurationException("SparseFinetune: the module has no nn.Linear to prune.")
        if self.masks:
            if set(self.masks) != set(self._layers) or any(
                tuple(self.masks[k].shape) != tuple(layer.weight.shape) for k, layer in self._layers.items()
            ):
                raise MisconfigurationException("SparseFinetune: the loaded masks do not match the target layers.")
        else:
            c = self.config
            masks = {}
            for name, layer in self._layers.items():
                try:
                    masks[name] = magnitude_mask(
                        layer.weight.detach().float(), c.sparsity, pattern=c.pattern, n=c.n, m=c.m, scope=c.scope
                    )
                except ValueError as err:
                    raise MisconfigurationException(f"SparseFinetune: layer {name!r}: {err}") from err
            self.masks = masks
        self._apply()
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self._apply()))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log("sparsity/achieved", self.achieved_sparsity(), on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"masks": {layer name: bool tensor (CPU)}}``."""
        return {"masks": {name: mask.detach().cpu() for name, mask in self.masks.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Stores the masks of :meth:`state_dict`; the next :meth:`on_fit_start` applies them."""
        self.masks = {name: mask.to(torch.bool) for name, mask in state_dict.get("masks", {}).items()}
