r"""
Routing specialization metric
=============================

:class:`RoutingNMI`: the normalized mutual information between the expert a mixture-of-experts router picks and a
label of the routed unit (the domain of the sequence, the character class of the token), as used to measure
topical vs syntactic specialization of experts (Fan, Messmer & Jaggi, arXiv:2402.13089). The state is the
``[E, C]`` contingency table, summed over processes; the value is
:func:`~lightning_epfl.functional.moe.normalized_mutual_information` of the table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_epfl.functional.moe import normalized_mutual_information

__all__ = ["RoutingNMI"]


def _routing_nmi_check_inputs(
    experts: Tensor, labels: Tensor, mask: Tensor | None, num_experts: int, num_classes: int
) -> None:
    if experts.shape != labels.shape:
        raise ValueError(
            f"`experts` and `labels` must have the same shape, got {tuple(experts.shape)} and {tuple(labels.shape)}."
        )
    if experts.is_floating_point() or labels.is_floating_point():
        raise TypeError(f"`experts` and `labels` must be integer tensors, got {experts.dtype} and {labels.dtype}.")
    if mask is not None and mask.shape != experts.shape:
        raise ValueError(f"`mask` must have shape {tuple(experts.shape)}, got {tuple(mask.shape)}.")
    if experts.numel():
        if int(experts.min()) < 0 or int(experts.max()) >= num_experts:
            raise ValueError(f"`experts` must lie in 0..{num_experts - 1}.")
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"`labels` must lie in 0..{num_classes - 1}.")


def _routing_nmi_update(
    experts: Tensor, labels: Tensor, num_experts: int, num_classes: int, mask: Tensor | None = None
) -> Tensor:
    """The ``[E, C]`` contingency table (int64) of the ``(expert, label)`` pairs, masked pairs left out."""
    idx = experts.reshape(-1).long() * num_classes + labels.reshape(-1).long()
    if mask is not None:
        idx = idx[mask.reshape(-1).bool()]
    return torch.bincount(idx, minlength=num_experts * num_classes).reshape(num_experts, num_classes)


class RoutingNMI(Metric):
    r"""Normalized mutual information between expert choice and a class label (arithmetic normalization).

    ``update(experts, labels, mask=None)`` adds the pairs to an ``[E, C]`` contingency table (``experts`` and
    ``labels`` integer tensors of the same shape, e.g. ``[B, T]`` top-1 experts and byte classes, ``mask`` the valid
    positions); ``compute()`` returns the float64 NMI of the table, equal to
    ``sklearn.metrics.normalized_mutual_info_score`` of the two label vectors. Empty rows / columns are ignored.

    Args:
        num_experts: ``E``.
        num_classes: ``C``; a label must be in ``0..C-1``.
        kwargs: Options of ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    Raises:
        ValueError: In ``__init__`` for non-positive sizes; in ``update`` for shape mismatches or out-of-range ids.
        TypeError: In ``update`` for floating-point ids.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    contingency: Tensor

    def __init__(self, num_experts: int, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_experts < 1 or num_classes < 1:
            raise ValueError(f"`num_experts` and `num_classes` must be >= 1, got {num_experts} and {num_classes}.")
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.add_state("contingency", torch.zeros(num_experts, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, experts: Tensor, labels: Tensor, mask: Tensor | None = None) -> None:
        """Add the ``(expert, label)`` pairs of ``experts`` / ``labels`` (same shape) where ``mask`` is true."""
        _routing_nmi_check_inputs(experts, labels, mask, self.num_experts, self.num_classes)
        table = _routing_nmi_update(experts, labels, self.num_experts, self.num_classes, mask)
        self.contingency += table.to(self.contingency.device)

    def compute(self) -> Tensor:
        """The NMI (float64 scalar in ``[0, 1]``)."""
        return normalized_mutual_information(self.contingency)
