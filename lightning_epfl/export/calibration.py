"""Calibration data shared by the exports: token ids from any batch layout, cut to a sequence budget."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor


def input_ids_of(batch: Any) -> Tensor:
    """The ``input_ids`` ``[B, T]`` of a batch: a tensor, a dict with ``input_ids`` or a tuple starting with them."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["input_ids"]
    return batch[0]


def calibration_sequences(
    batches: Iterable[Any] | None, samples: int, seq_len: int, owner: str
) -> list[tuple[Tensor, Tensor | None]]:
    """``(input_ids, attention_mask)`` pairs, each cut to ``seq_len`` tokens, ``samples`` sequences in all at most.

    A 1-D batch is one sequence; empty batches are dropped; the mask is ``None`` unless a dict batch holds one.

    Raises:
        ValueError: If a batch's ids are not ``[B, T]`` (the message starts with ``owner``).
    """
    out: list[tuple[Tensor, Tensor | None]] = []
    count = 0
    for batch in batches or []:
        ids = input_ids_of(batch)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"{owner}: calibration input_ids must be [B, T], got {tuple(ids.shape)}.")
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        take = min(ids.shape[0], samples - count)
        ids = ids[:take, :seq_len]
        if mask is not None:
            mask = mask[:take, :seq_len]
        if ids.numel() > 0:
            out.append((ids, mask))
            count += take
        if count >= samples:
            break
    return out
