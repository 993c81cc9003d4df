r"""
Uniform weight averaging
^^^^^^^^^^^^^^^^^^^^^^^^

The two operations behind windowed stochastic weight averaging (Hägele et al., arXiv:2405.18392, Sec. 4.1; Izmailov
et al., arXiv:1803.05407): an in-place running mean of snapshots, :math:`m_c = m_{c-1} + (\theta_c - m_{c-1}) / c`,
and the count-weighted mean of several closed windows, :math:`\sum_i c_i A_i / \sum_i c_i`. No Lightning import.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["running_mean_", "weighted_average"]


def running_mean_(avg: list[Tensor], new: Sequence[Tensor], count: int) -> None:
    r"""Fold snapshot ``new`` into the running mean ``avg`` in place: ``avg += (new - avg) / count``.

    Uses one ``torch._foreach_lerp_`` over all tensors. ``new`` is cast to each accumulator's dtype and device first,
    so a bfloat16 model can be averaged in a float32 (or float64) accumulator.

    Args:
        avg: Accumulators (any shapes), the mean of the ``count - 1`` snapshots seen so far. Modified in place.
        new: The snapshot, one tensor per accumulator with the same shape.
        count: Number of snapshots *including* ``new`` (``>= 1``); ``count == 1`` copies ``new`` into ``avg``.

    Raises:
        ValueError: If ``count < 1`` or the lists differ in length or shapes.
    """
    if count < 1:
        raise ValueError(f"`count` must be >= 1 (snapshots including the new one), got {count}.")
    if len(avg) != len(new):
        raise ValueError(f"`avg` has {len(avg)} tensors but `new` has {len(new)}.")
    for a, b in zip(avg, new):
        if a.shape != b.shape:
            raise ValueError(f"Shape mismatch between `avg` {tuple(a.shape)} and `new` {tuple(b.shape)}.")
    if not avg:
        return
    cast = [b.to(device=a.device, dtype=a.dtype) for a, b in zip(avg, new)]
    if count == 1:
        torch._foreach_copy_(avg, cast)
    else:
        torch._foreach_lerp_(avg, cast, 1.0 / count)


def weighted_average(states: Sequence[dict[str, Tensor]], counts: Sequence[int]) -> dict[str, Tensor]:
    r"""Count-weighted mean of state dicts, :math:`\sum_i c_i A_i / \sum_i c_i` (a horizon of closed windows).

    If every ``A_i`` is the mean of ``c_i`` snapshots, the result is the mean of all ``sum(counts)`` snapshots.

    Args:
        states: State dicts with the same keys and shapes (floating tensors are averaged; other tensors, e.g. integer
            counters, are taken from the *last* state).
        counts: Positive weights, one per state (snapshot counts).

    Returns:
        A new dict (fresh tensors, no aliasing with ``states``) in the dtype of ``states[0]``.

    Raises:
        ValueError: If ``states`` is empty, lengths differ, a count is not positive or the keys differ.
    """
    if not states:
        raise ValueError("`states` must hold at least one state dict.")
    if len(states) != len(counts):
        raise ValueError(f"`states` has {len(states)} entries but `counts` has {len(counts)}.")
    if any(c <= 0 for c in counts):
        raise ValueError(f"`counts` must all be positive, got {list(counts)}.")
    keys = list(states[0])
    for s in states[1:]:
        if list(s) != keys:
            raise ValueError("All `states` must have the same keys in the same order.")
    total = float(sum(counts))
    out: dict[str, Tensor] = {}
    for k in keys:
        ref = states[0][k]
        if not torch.is_floating_point(ref):
            out[k] = states[-1][k].clone()
            continue
        acc = torch.zeros_like(ref)
        for s, c in zip(states, counts):
            acc.add_(s[k].to(dtype=ref.dtype, device=ref.device), alpha=c / total)
        out[k] = acc
    return out
